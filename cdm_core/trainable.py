"""How a loss is applied to a trainable network: the small protocol the CDM step drives.

A :class:`Trainable` exposes its velocity (with gradient), its parameters (for the EMA and the
fake->student blend) and ``apply(loss)`` (backward, non-finite guard, clip, optimizer step). Plain
modules with torch optimizers use :class:`TorchTrainable`; the workflows layer wraps DeepSpeed engines
and LoRA adapters in the same protocol, so the maths is the same object everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, runtime_checkable

import torch

from cdm_core.conditioning import Cond


@dataclass(frozen=True)
class ApplyResult:
    grad_norm: float
    skipped: bool  # True when the gradient was non-finite and the step was not taken


@runtime_checkable
class Trainable(Protocol):
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor: ...

    def parameters(self) -> Iterable[torch.nn.Parameter]: ...

    def apply(self, loss: torch.Tensor) -> ApplyResult: ...


class TorchTrainable:
    """A module + torch optimizer (+ optional LR scheduler) behind the :class:`Trainable` protocol.

    ``velocity_of`` turns the module into ``v(x_t, t, cond)`` (e.g. ``cdm_core.models.SD3Velocity``).
    ``apply``: backward; gradients with NaN/inf are zeroed by ``nan_to_num``, and if the total norm is
    still non-finite the step is skipped; clip to ``max_grad_norm``; step; zero grads.
    """

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 velocity_of: Callable[[torch.nn.Module], Callable], max_grad_norm: float = 1.0,
                 lr_scheduler=None):
        self.module = module
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.max_grad_norm = max_grad_norm
        self._v = velocity_of(module)

    def velocity(self, x_t, t, cond):
        return self._v(x_t, t, cond)

    def parameters(self):
        return self.module.parameters()

    def apply(self, loss: torch.Tensor) -> ApplyResult:
        loss.backward()
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, float("inf")) if params else torch.tensor(0.0)
        skipped = not bool(torch.isfinite(norm))
        if skipped:
            for p in params:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
            norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
            skipped = not bool(torch.isfinite(norm))
        if not skipped:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            self.optimizer.step()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return ApplyResult(float(norm), skipped)

    def state_dict(self) -> dict:
        out = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.lr_scheduler is not None:
            out["lr_scheduler"] = self.lr_scheduler.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])


@torch.no_grad()
def blend_parameters(target: Iterable[torch.nn.Parameter], source: Iterable[torch.nn.Parameter], decay: float) -> None:
    """``target <- decay * target + (1 - decay) * source`` (the fake -> student blend)."""
    for p_t, p_s in zip(target, source):
        p_t.lerp_(p_s.detach().to(p_t.dtype), 1.0 - decay)


def lr_factor(k: int, warmup_steps: int, total_steps: int | None = None, decay: str = "none",
              min_ratio: float = 0.0) -> float:
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


def warmup_adamw(module: torch.nn.Module, lr: float, betas=(0.9, 0.999), weight_decay: float = 1e-4,
                 warmup_steps: int = 100, total_steps: int | None = None, decay: str = "none",
                 min_ratio: float = 0.0) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with linear warm-up (and optionally cosine decay), as the spec's student and fake optimizers."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: lr_factor(k, warmup_steps, total_steps, decay, min_ratio))
