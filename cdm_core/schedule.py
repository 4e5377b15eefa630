"""Noise-level schedules: inference levels, the dynamic continuous schedule and fixed DMD2 anchors.

All levels follow the flow convention (1 = noise, 0 = data) and are shifted with
``sigma = shift s / (1 + (shift - 1) s)`` after they are drawn (forgetting the shift is a known source
of SD3 artifacts).
"""

from __future__ import annotations

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
