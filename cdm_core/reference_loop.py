"""The plain single-process reference loop: distill a teacher into a few-step student with torch only.

    d = build_distiller(teacher, cdm, optim, student_steps, velocity_of)   # cdm_core.distiller
    for it in range(student_steps * update_ratio):  d.step(it, prompts[batch(it)], empty, shape)

Prompt batches are drawn from a generator seeded by (seed, iteration), so a run is reproducible and
can be resumed at any iteration. Workflows (Ray Train + DeepSpeed) build and run the same step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cdm_core.conditioning import Cond
from cdm_core.distiller import Distiller
from cdm_core.optim import OptimConfig
from cdm_core.seeds import batch_seed, prompt_stream
from cdm_core.step import StepResult


@dataclass(frozen=True)
class LoopConfig:
    """The loop around the step: batch, length, and the optimiser (spec values by default)."""

    batch_size: int = 16
    student_steps: int = 1000
    optim: OptimConfig = field(default_factory=OptimConfig)


def prompt_batch(prompts: Cond, batch: int, stream: int, iteration: int) -> Cond:
    """Iteration ``iteration``'s prompts of stream ``stream`` (:func:`cdm_core.seeds.prompt_stream`)."""
    g = torch.Generator().manual_seed(batch_seed(stream, iteration))
    return prompts.index(torch.randint(0, len(prompts), (batch,), generator=g))


def run_loop(
    d: Distiller,
    loop: LoopConfig,
    prompts: Cond,
    uncond: Cond,
    image_shape: tuple[int, ...],
    start_iteration: int = 0,
    callback: Callable[[StepResult, float], bool | None] | None = None,
    device: torch.device | str = "cpu",
) -> int:
    """Run until ``loop.student_steps`` student steps; ``callback(result, seconds)`` after each iteration may
    return True to stop early. Returns the next iteration index."""
    total_iters = loop.student_steps * d.cdm.update_ratio
    b = loop.batch_size
    empty = uncond.expand(b).to(device) if len(uncond) == 1 else uncond.to(device)
    stream = prompt_stream(d.cdm.seed)
    it = start_iteration
    while it < total_iters:
        t0 = time.time()
        cond = prompt_batch(prompts, b, stream, it).to(device)
        res = d.step(it, cond, empty, (b, *image_shape), device=device)
        it += 1
        if callback is not None and callback(res, time.time() - t0):
            break
    return it
