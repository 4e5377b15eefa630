"""The optimiser around the CDM step: AdamW with linear warm-up and optional cosine decay.

Spec values (CDM_SPEC.md): AdamW, lr 1e-5 (student) / 5e-6 (fake), betas (0.9, 0.999), weight decay 1e-4,
100 warm-up steps, gradient clip 1.0, EMA 0.999. The fake teacher's lr is ``lr_student * fake_lr_ratio``
and its schedule spans ``update_ratio`` times as many optimizer steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from cdm_core.knobs import knob


@dataclass(frozen=True)
class OptimConfig:
    lr_student: float = knob(1e-5, gt=0.0, le=1.0)
    fake_lr_ratio: float = knob(0.5, gt=0.0, le=100.0, description="lr_fake = lr_student * fake_lr_ratio")
    beta1: float = knob(0.9, ge=0.0, lt=1.0)
    beta2: float = knob(0.999, ge=0.0, lt=1.0)
    weight_decay: float = knob(1e-4, ge=0.0, le=1.0)
    warmup_steps: int = knob(100, ge=0)
    max_grad_norm: float = knob(1.0, gt=0.0)
    ema_decay: float = knob(0.999, ge=0.0, lt=1.0)
    lr_decay: Literal["none", "cosine"] = knob(
        "none", description="after warm-up: constant, or cosine to min_lr_ratio at the last student step"
    )
    min_lr_ratio: float = knob(0.0, ge=0.0, le=1.0)

    def __post_init__(self):
        if self.lr_decay not in ("none", "cosine"):
            raise ValueError(f"lr_decay must be none or cosine, got {self.lr_decay!r}")
        if not self.lr_student > 0 or not self.fake_lr_ratio > 0:
            raise ValueError("lr_student and fake_lr_ratio must be > 0")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0 and 0.0 <= self.ema_decay < 1.0):
            raise ValueError("beta1, beta2 and ema_decay must be in [0, 1)")

    @property
    def lr_fake(self) -> float:
        return self.lr_student * self.fake_lr_ratio

    @property
    def betas(self) -> tuple[float, float]:
        return (self.beta1, self.beta2)

    def to_dict(self) -> dict:
        return asdict(self)


def lr_factor(
    k: int, warmup_steps: int, total_steps: int | None = None, decay: str = "none", min_ratio: float = 0.0
) -> float:
    """Multiplier of the base lr at optimizer step ``k``: linear warm-up ``(k+1)/warmup``, then constant
    (``decay="none"``) or a cosine from 1 down to ``min_ratio`` at ``total_steps`` (``decay="cosine"``)."""
    if decay not in ("none", "cosine"):
        raise ValueError(f"lr decay must be none or cosine, got {decay!r}")
    w = max(1, warmup_steps)
    if k + 1 < w:
        return (k + 1) / w
    if decay == "none" or not total_steps or total_steps <= w:
        return 1.0
    p = min(1.0, (k + 1 - w) / (total_steps - w))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def warmup_adamw(
    module: torch.nn.Module,
    lr: float,
    betas=(0.9, 0.999),
    weight_decay: float = 1e-4,
    warmup_steps: int = 100,
    total_steps: int | None = None,
    decay: str = "none",
    min_ratio: float = 0.0,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with linear warm-up (and optionally cosine decay), as the spec's student and fake optimizers."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: lr_factor(k, warmup_steps, total_steps, decay, min_ratio)
    )


def adamw_for(module: torch.nn.Module, optim: OptimConfig, lr: float, total_steps: int):
    """:func:`warmup_adamw` with the config's betas, weight decay, warm-up and decay."""
    return warmup_adamw(
        module, lr, optim.betas, optim.weight_decay, optim.warmup_steps, total_steps, optim.lr_decay, optim.min_lr_ratio
    )
