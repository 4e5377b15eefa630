"""Rectified-flow conventions shared by the teacher, student and fake teacher.

Same as diffusers' SD3 / ``FlowMatchEulerDiscreteScheduler``:

- interpolation   ``x_t = (1 - t) x0 + t eps``,  ``t in [0, 1]``, ``t = 1`` is pure noise;
- velocity        ``v = eps - x0`` (what the network predicts); it is fed ``timestep = 1000 t``;
- denoiser        ``D(x_t, t) = x_t - t v(x_t, t)``;
- Euler step      ``x_s = x_t + (s - t) v(x_t, t)``;
- time shift      ``sigma = shift s / (1 + (shift - 1) s)``;
- Tweedie         ``D_real - D_fake = -t (v_real - v_fake)``.

Times are tensors broadcastable against the batch: shape ``(B,)`` is expanded to ``(B, 1, 1, 1)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor
# v(x_t, t, cond) -> velocity with the shape of x_t. ``t`` has shape (B,) and lives in [0, 1].
VelocityFn = Callable[[Tensor, Tensor, object], Tensor]

TIMESTEP_SCALE = 1000.0


def expand_t(t: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a time of shape () or (B,) against a batch ``like`` of shape (B, ...)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


def interpolate(x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
    """``x_t = (1 - t) x0 + t eps``."""
    t = expand_t(t, x0)
    return (1.0 - t) * x0 + t * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """``v = eps - x0``, the regression target of a rectified-flow model."""
    return eps - x0


def x0_from_velocity(x_t: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
    """Clean estimate ``x0_hat = x_t - t v``."""
    return x_t - expand_t(t, x_t) * v


def eps_from_velocity(x_t: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
    """Noise estimate ``eps_hat = x_t + (1 - t) v``."""
    return x_t + (1.0 - expand_t(t, x_t)) * v


def velocity_from_x0(x_t: Tensor, t: Tensor | float, x0: Tensor) -> Tensor:
    """Inverse of :func:`x0_from_velocity`: ``v = (x_t - x0) / t`` (``t > 0``)."""
    return (x_t - x0) / expand_t(t, x_t)


def euler_step(x_t: Tensor, t: Tensor | float, s: Tensor | float, v: Tensor) -> Tensor:
    """``x_s = x_t + (s - t) v``."""
    return x_t + (expand_t(s, x_t) - expand_t(t, x_t)) * v


def shift_time(s: Tensor | float, shift: float) -> Tensor | float:
    """SD3's resolution shift ``sigma = shift s / (1 + (shift - 1) s)``; identity for shift 1."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def denoise(v_fn: VelocityFn, x_t: Tensor, t: Tensor, cond: object) -> Tensor:
    """``D(x_t, t, c) = x_t - t v(x_t, t, c)`` for a velocity callable."""
    return x0_from_velocity(x_t, t, v_fn(x_t, t, cond))


def cfg_velocity(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance on velocities: ``v_u + w (v_c - v_u)``; ``w = 1`` is no guidance."""
    return v_uncond + scale * (v_cond - v_uncond)


def flow_matching_loss(v_fn: VelocityFn, x0: Tensor, eps: Tensor, t: Tensor, cond: object) -> Tensor:
    """Rectified-flow regression ``mean |v(x_t, t, c) - (eps - x0)|^2`` with ``x_t = (1-t) x0 + t eps``.

    x0, eps: (B, ...); t: (B,). Returns a scalar (per-sample mean, then batch mean).
    """
    x_t = interpolate(x0, eps, t)
    err = v_fn(x_t, t, cond) - velocity_target(x0, eps)
    return err.pow(2).flatten(1).mean(1).mean()
