"""The plain single-process reference loop: distill a teacher into a few-step student with torch only.

    student, fake = copies of the teacher; real = the frozen teacher
    for it in range(student_steps * update_ratio):  CDMStep(it, prompts[batch(it)], empty, shape)

Prompt batches are drawn from a generator seeded by (seed, iteration), so a run is reproducible and
can be resumed at any iteration. Workflows (Ray Train + DeepSpeed) run the same :class:`CDMStep`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch

from cdm_core.conditioning import Cond
from cdm_core.ema import EMA
from cdm_core.step import CDMConfig, CDMStep, StepResult
from cdm_core.trainable import TorchTrainable, warmup_adamw


@dataclass(frozen=True)
class LoopConfig:
    """Optimisation around the CDM step (spec: AdamW 1e-5 / 5e-6, betas (0.9, 0.999), wd 1e-4,
    100 warm-up steps, clip 1.0, EMA 0.999)."""

    batch_size: int = 16
    student_steps: int = 1000
    lr_student: float = 1e-5
    lr_fake: float = 5e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    ema_decay: float = 0.999
    lr_decay: str = "none"  # none | cosine (to min_lr_ratio at the last student step; the fake in step)
    min_lr_ratio: float = 0.0


@dataclass
class Distiller:
    step: CDMStep
    student: TorchTrainable
    fake: TorchTrainable
    ema: EMA
    cdm: CDMConfig
    loop: LoopConfig


def build_distiller(teacher: torch.nn.Module, cdm: CDMConfig, loop: LoopConfig,
                    velocity_of: Callable[[torch.nn.Module], Callable]) -> Distiller:
    """Student and fake teacher start as copies of ``teacher``; the teacher itself is frozen."""
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    fake = copy.deepcopy(teacher).train().requires_grad_(True)
    teacher.eval().requires_grad_(False)
    so, ss = warmup_adamw(student, loop.lr_student, loop.betas, loop.weight_decay, loop.warmup_steps,
                          loop.student_steps, loop.lr_decay, loop.min_lr_ratio)
    fo, fs = warmup_adamw(fake, loop.lr_fake, loop.betas, loop.weight_decay, loop.warmup_steps,
                          loop.student_steps * cdm.update_ratio, loop.lr_decay, loop.min_lr_ratio)
    st = TorchTrainable(student, so, velocity_of, loop.max_grad_norm, ss)
    ft = TorchTrainable(fake, fo, velocity_of, loop.max_grad_norm, fs)
    ema = EMA(student, loop.ema_decay)
    return Distiller(CDMStep(cdm, st, ft, velocity_of(teacher), ema), st, ft, ema, cdm, loop)


def prompt_batch(prompts: Cond, batch: int, seed: int, iteration: int) -> Cond:
    g = torch.Generator().manual_seed(seed * 1_000_003 + iteration * 31 + 99)
    return prompts.index(torch.randint(0, len(prompts), (batch,), generator=g))


def run_loop(d: Distiller, prompts: Cond, uncond: Cond, image_shape: tuple[int, ...], start_iteration: int = 0,
             callback: Callable[[StepResult, float], bool | None] | None = None,
             device: torch.device | str = "cpu") -> int:
    """Run until ``loop.student_steps`` student steps; ``callback(result, seconds)`` after each iteration may
    return True to stop early. Returns the next iteration index."""
    total_iters = d.loop.student_steps * d.cdm.update_ratio
    b = d.loop.batch_size
    empty = uncond.expand(b).to(device) if len(uncond) == 1 else uncond.to(device)
    it = start_iteration
    while it < total_iters:
        t0 = time.time()
        cond = prompt_batch(prompts, b, d.cdm.seed, it).to(device)
        res = d.step(it, cond, empty, (b, *image_shape), device=device)
        it += 1
        if callback is not None and callback(res, time.time() - t0):
            break
    return it
