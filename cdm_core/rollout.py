"""Backward simulation: roll the *current* student from noise along the anchor levels (no gradient).

``x_0 = eps;  v_k = G(x_k, sigma_k, c);  x_{k+1} = x_k + (sigma_{k+1} - sigma_k) v_k``.
Each sample b has its anchor index ``i_b``; the rollout stops at the deepest index needed
(``max_b i_b``, or N-1 when the final clean estimate is wanted), which gives the same values as the
full rollout at a fraction of the cost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cdm_core.conditioning import Cond
from cdm_core.flow import VelocityFn, euler_step, expand_t, x0_from_velocity


@dataclass(frozen=True)
class Rollout:
    """Per-sample states at the picked anchors (all detached).

    x: (B, ...) ``x_i``; t: (B,) ``sigma_i``; v: (B, ...) ``v_i = G(x_i, sigma_i)``;
    x0_hat: (B, ...) ``x_i - sigma_i v_i``; final_x0_hat: (B, ...) or None, the clean estimate at the
    last anchor N-1 (the student's sample); nfe: student forwards spent.
    """

    x: torch.Tensor
    t: torch.Tensor
    v: torch.Tensor
    x0_hat: torch.Tensor
    final_x0_hat: torch.Tensor | None
    nfe: int


@torch.no_grad()
def backward_simulation(
    student: VelocityFn,
    eps: torch.Tensor,
    sigmas: torch.Tensor,
    anchors: torch.Tensor,
    cond: Cond,
    need_final: bool = False,
    sync_depth: Callable[[int], int] | None = None,
) -> Rollout:
    """Roll out ``student`` from ``eps`` over ``sigmas`` (N+1,) and gather the states at ``anchors`` (B,).

    ``sync_depth`` maps this rank's deepest index to the one every rank uses (e.g. an all-reduce MAX):
    where parameters are partitioned (ZeRO-3) every forward is a collective, so all ranks must run the
    same number of them. Rolling out further never changes the gathered states.
    """
    n = sigmas.numel() - 1
    if anchors.numel() != eps.shape[0]:
        raise ValueError("one anchor index per sample is needed")
    if int(anchors.max()) >= n or int(anchors.min()) < 0:
        raise ValueError(f"anchor indices must lie in [0, {n - 1}]")
    sig = sigmas.to(eps.device, eps.dtype)
    anchors = anchors.to(eps.device)
    last = n - 1 if need_final else int(anchors.max())
    if sync_depth is not None:
        last = min(n - 1, int(sync_depth(last)))
    b = eps.shape[0]
    x = eps
    x_at, v_at = torch.empty_like(eps), torch.empty_like(eps)
    final = None
    for k in range(last + 1):
        t = sig[k].expand(b)
        v = student(x, t, cond)
        hit = anchors == k
        if hit.any():
            x_at[hit] = x[hit]
            v_at[hit] = v[hit]
        if k == n - 1:
            final = x0_from_velocity(x, t, v)
        if k < last:
            x = euler_step(x, t, sig[k + 1].expand(b), v)
    t_at = sig[anchors]
    return Rollout(x_at, t_at, v_at, x_at - expand_t(t_at, x_at) * v_at, final if need_final else None, last + 1)
