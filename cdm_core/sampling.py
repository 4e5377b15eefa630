"""K-step Euler sampling with optional classifier-free guidance: the one few-step sampler.

``x_{k+1} = x_k + (sigma_{k+1} - sigma_k) v(x_k, sigma_k)`` over explicit levels
``sigma_0 = 1 > sigma_1 > ... > sigma_K = 0`` (see :func:`cdm_core.schedule.inference_levels`).
With guidance ``w != 1`` each step costs two NFE: ``v = v_u + w (v_c - v_u)``. :func:`sample` derives the
levels from (steps, shift); evaluation, validation, sample grids, ``cdm sample`` and serving all call it.
"""

from __future__ import annotations

import torch

from cdm_core.conditioning import Cond
from cdm_core.flow import VelocityFn, cfg_velocity, euler_step
from cdm_core.schedule import inference_levels


@torch.no_grad()
def sample_euler(
    v_fn: VelocityFn,
    noise: torch.Tensor,
    levels: torch.Tensor,
    cond: Cond,
    uncond: Cond | None = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """Integrate from ``noise`` (at ``levels[0]``) down to ``levels[-1]``.

    noise: (B, C, H, W); levels: (K+1,) decreasing, ending at 0; cond/uncond: batch B.
    Returns the final sample, shape of ``noise``.
    """
    if levels.ndim != 1 or levels.numel() < 2:
        raise ValueError("levels must be a 1-D tensor of K+1 >= 2 decreasing noise levels")
    use_cfg = guidance != 1.0
    if use_cfg and uncond is None:
        raise ValueError("guidance != 1 needs the unconditional (empty-prompt) embedding")
    x = noise
    b = x.shape[0]
    for k in range(levels.numel() - 1):
        t = levels[k].to(x).expand(b)
        s = levels[k + 1].to(x).expand(b)
        if use_cfg:
            v_both = v_fn(torch.cat([x, x]), torch.cat([t, t]), Cond.cat([cond, uncond]))
            v = cfg_velocity(v_both[:b], v_both[b:], guidance)
        else:
            v = v_fn(x, t, cond)
        x = euler_step(x, t, s, v)
    return x


def sample(
    v_fn: VelocityFn,
    noise: torch.Tensor,
    steps: int,
    shift: float,
    cond: Cond,
    uncond: Cond | None = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """``steps``-step Euler from ``noise`` over :func:`~cdm_core.schedule.inference_levels` ``(steps, shift)``."""
    return sample_euler(v_fn, noise, inference_levels(steps, shift).to(noise.device), cond, uncond, guidance)
