"""CDM's losses: CFG augmentation (CA), distribution matching (DM), the off-trajectory CDM term and the
fake teacher's denoising loss (CDM_SPEC.md, "One iteration").

All matching losses share one form. With ``x0_hat`` the student's clean estimate (B, C, H, W), a
direction ``Delta`` and a per-sample normaliser ``n = max(mean|D_ref - sg(x0_hat)|, floor)``:

    L = mean_b mean_e (x0_hat - sg(x0_hat + Delta / n))^2

so ``dL/dx0_hat = -2 Delta / (n * B * numel)`` where numel = C*H*W: the gradient reaches the student
only through ``x0_hat = x - t v_theta``, and one descent step moves ``x0_hat`` along ``Delta / n``.
Per-sample means first, then the batch mean; no 0.5 factor. Teachers are called without gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdm_core.conditioning import Cond
from cdm_core.flow import VelocityFn, expand_t, interpolate, velocity_target, x0_from_velocity

NORM_FLOOR = 0.1


@dataclass(frozen=True)
class LossResult:
    """loss: scalar; normalizer: (B,) the ``n`` used; direction_rms: scalar RMS of ``Delta / n`` (the update
    direction on ``x0_hat``, i.e. the gradient up to ``-2 / (B numel)``); tau: (B,) noise levels used."""

    loss: torch.Tensor
    normalizer: torch.Tensor
    direction_rms: torch.Tensor
    tau: torch.Tensor

    def log(self, name: str) -> dict[str, float]:
        return {
            f"loss/{name}": float(self.loss.detach()),
            f"norm/{name}": float(self.normalizer.mean()),
            f"dir_rms/{name}": float(self.direction_rms),
        }


def _sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def normalized_direction(
    a: torch.Tensor, delta: torch.Tensor, d_ref: torch.Tensor, floor: float = NORM_FLOOR
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Delta / n, n)``, ``n = max(mean|d_ref - a|, floor)`` (B,): where one descent step moves ``x0_hat``."""
    n = _sample_mean((d_ref - a).abs()).clamp_min(floor)
    return torch.nan_to_num(delta / expand_t(n, delta), nan=0.0, posinf=0.0, neginf=0.0), n


def matching_loss(
    x0_hat: torch.Tensor, delta: torch.Tensor, d_ref: torch.Tensor, tau: torch.Tensor, floor: float = NORM_FLOOR
) -> LossResult:
    """``mean_b mean_e (x0_hat - sg(a + nan_to_num(Delta / n)))^2``, ``n = max(mean|d_ref - a|, floor)``,
    ``a = sg(x0_hat)``.

    x0_hat: (B, ...) with gradient; delta, d_ref: (B, ...) without. ``floor`` is in the data's units (0.1 suits
    SD3's unit-variance latents; pixel space on [-1, 1] needs a smaller one, see CDMConfig.norm_floor).
    """
    a = x0_hat.detach()
    direction, n = normalized_direction(a, delta, d_ref, floor)
    target = (a + direction).detach()
    loss = _sample_mean((x0_hat - target) ** 2).mean()
    return LossResult(loss, n.detach(), direction.pow(2).mean().sqrt().detach(), tau)


def ca_loss(
    x0_hat: torch.Tensor,
    real: VelocityFn,
    cond: Cond,
    uncond: Cond,
    eps: torch.Tensor,
    tau: torch.Tensor,
    alpha: float,
    floor: float = NORM_FLOOR,
) -> LossResult:
    """CFG augmentation. ``z = (1-tau) sg(x0_hat) + tau eps``; ``Dc = D_R(z, tau, c)``, ``Du = D_R(z, tau, empty)``;
    ``Delta = alpha (Dc - Du)``; ``n = max(mean|Dc - sg(x0_hat)|, floor)``.

    tau: (B,), drawn from U(0, t) clamped to [0.02, 0.98] (cleaner than the anchor). Cond and uncond go
    through the teacher in one batch of 2B.
    """
    delta, d_c = ca_delta(x0_hat, real, cond, uncond, eps, tau, alpha)
    return matching_loss(x0_hat, delta, d_c, tau, floor=floor)


@torch.no_grad()
def ca_delta(
    x0_hat: torch.Tensor, real: VelocityFn, cond: Cond, uncond: Cond, eps: torch.Tensor, tau: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CA's ``(Delta, D_c)``: ``alpha (D_c - D_u)`` at ``z = (1-tau) sg(x0_hat) + tau eps``, and ``D_c``, its
    normaliser's reference."""
    z = interpolate(x0_hat.detach(), eps, tau)
    b = z.shape[0]
    v = real(torch.cat([z, z]), torch.cat([tau, tau]), Cond.cat([cond, uncond]))
    d_c = x0_from_velocity(z, tau, v[:b])
    d_u = x0_from_velocity(z, tau, v[b:])
    return alpha * (d_c - d_u), d_c


def dm_loss(
    x0_hat: torch.Tensor,
    real: VelocityFn,
    fake: VelocityFn,
    cond: Cond,
    eps: torch.Tensor,
    tau: torch.Tensor,
    z_base: torch.Tensor | None = None,
    floor: float = NORM_FLOOR,
) -> LossResult:
    """Distribution matching. ``z = (1-tau) b + tau eps`` with ``b = sg(x0_hat)`` (or ``z_base``);
    ``Delta = D_R(z, tau, c) - D_F(z, tau, c)`` (conditional only, no CFG; by Tweedie
    ``= -tau (v_R - v_F)``); ``n = max(mean|D_R - sg(x0_hat)|, floor)``; target ``sg(x0_hat + Delta / n)``.

    Also the CDM term, called at the off-trajectory clean estimate ``x0_hat' = x' - t' G(x', t', c)``.
    ``z_base`` (the "final" target ablation: the rollout's last clean estimate) only moves the point where
    the direction is measured; normaliser and target stay at ``sg(x0_hat)``, as in the authors' code.
    """
    delta, d_real = dm_delta(x0_hat if z_base is None else z_base, real, fake, cond, eps, tau)
    return matching_loss(x0_hat, delta, d_real, tau, floor=floor)


@torch.no_grad()
def dm_delta(
    base: torch.Tensor, real: VelocityFn, fake: VelocityFn, cond: Cond, eps: torch.Tensor, tau: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """DM's ``(Delta, D_R)``: ``D_R(z, tau, c) - D_F(z, tau, c)`` at ``z = (1-tau) sg(base) + tau eps``, and
    ``D_R``, its normaliser's reference."""
    z = interpolate(base.detach(), eps, tau)
    d_real = x0_from_velocity(z, tau, real(z, tau, cond))
    d_fake = x0_from_velocity(z, tau, fake(z, tau, cond))
    return d_real - d_fake, d_real


def fake_loss(fake: VelocityFn, x0: torch.Tensor, eps: torch.Tensor, tau: torch.Tensor, cond: Cond) -> LossResult:
    """Fake teacher (critic) regression on the student's samples:
    ``z = (1-tau) sg(x0) + tau eps``; ``L = mean_b mean_e (F(z, tau, c) - (eps - sg(x0)))^2``."""
    x0 = x0.detach()
    z = interpolate(x0, eps, tau)
    err = fake(z, tau, cond) - velocity_target(x0, eps)
    loss = _sample_mean(err**2).mean()
    ones = torch.ones(x0.shape[0], device=x0.device)
    return LossResult(loss, ones, err.detach().pow(2).mean().sqrt(), tau)
