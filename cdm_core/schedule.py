"""Noise-level schedules: inference levels, the dynamic continuous schedule and fixed DMD2 anchors.

All levels follow the flow convention (1 = noise, 0 = data) and are shifted with
``sigma = shift s / (1 + (shift - 1) s)`` after they are drawn (forgetting the shift is a known source
of SD3 artifacts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdm_core.flow import shift_time


def inference_levels(steps: int, shift: float = 3.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[shift(1 - k/K) for k < K] + [0]``: K+1 levels. K=4, shift 3 -> [1, .9, .75, .5, 0].

    Set explicitly rather than through ``FlowMatchEulerDiscreteScheduler.set_timesteps(K)``, whose
    levels differ.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    sig = shift_time(s, shift)
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)]).to(dtype)


def unshifted_levels(steps: int) -> list[float]:
    """The K levels before the shift, ``[1 - k/K for k < K]`` (K=4: [1, .75, .5, .25]): what a diffusers
    ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)`` takes to reproduce :func:`inference_levels`
    (the scheduler applies its own shift)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [1.0 - k / steps for k in range(steps)]


@dataclass(frozen=True)
class Schedule:
    """Anchor levels of one iteration: ``sigmas`` (N+1,) decreasing from 1 to a terminal 0.

    ``sigmas[:N]`` are the N anchors the student may be trained at; ``n`` = N.
    """

    sigmas: torch.Tensor
    n: int
    kind: str


def dynamic_schedule(
    step_seed: int, n_max: int, s_min: float = 0.25, s_max: float = 0.95, shift: float = 3.0
) -> Schedule:
    """CDM's dynamic continuous schedule.

    ``N ~ U{1..n_max}``; ``s = [1] + sorted_desc(U(s_min, s_max) for N-1 draws)``; shift; append 0.
    """
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    if not 0.0 < s_min < s_max < 1.0:
        raise ValueError(f"need 0 < s_min < s_max < 1, got {s_min}, {s_max}")
    g = torch.Generator().manual_seed(step_seed)
    n = int(torch.randint(1, n_max + 1, (1,), generator=g))
    draws = s_min + (s_max - s_min) * torch.rand(n - 1, generator=g, dtype=torch.float64)
    s = torch.cat([torch.ones(1, dtype=torch.float64), draws.sort(descending=True).values])
    sig = torch.cat([shift_time(s, shift), torch.zeros(1, dtype=torch.float64)])
    return Schedule(sig.float(), n, "dynamic")


def fixed_schedule(steps: int = 4, shift: float = 3.0) -> Schedule:
    """DMD2-style fixed discrete anchors: the student's own inference levels (4 steps: [1, .9, .75, .5])."""
    sig = inference_levels(steps, shift)
    return Schedule(sig, steps, "fixed")


def pick_anchors(schedule: Schedule, batch: int, generator: torch.Generator) -> torch.Tensor:
    """One anchor index ``i ~ U{0..N-1}`` per sample, shape (batch,), int64 on CPU."""
    return torch.randint(0, schedule.n, (batch,), generator=generator)
