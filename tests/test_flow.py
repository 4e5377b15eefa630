"""Flow conventions: float64 round trips and identities (CDM_SPEC.md, Conventions)."""

import torch

from cdm_core import flow
from cdm_core.schedule import inference_levels

D = torch.float64


def _batch(seed=0, b=5):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 2, 4, 4, generator=g, dtype=D)
    eps = torch.randn(b, 2, 4, 4, generator=g, dtype=D)
    t = torch.rand(b, generator=g, dtype=D) * 0.98 + 0.01
    return x0, eps, t


def test_velocity_x0_eps_round_trip():
    x0, eps, t = _batch()
    x_t = flow.interpolate(x0, eps, t)
    v = flow.velocity_target(x0, eps)
    torch.testing.assert_close(flow.x0_from_velocity(x_t, t, v), x0)
    torch.testing.assert_close(flow.eps_from_velocity(x_t, t, v), eps)
    torch.testing.assert_close(flow.velocity_from_x0(x_t, t, x0), v)


def test_euler_rollout_of_exact_linear_flow_lands_on_x0():
    x0, eps, _ = _batch(1)
    v_fn = lambda x, t, c: flow.velocity_target(x0, eps)  # noqa: E731  exact velocity of the straight path
    x = eps
    levels = inference_levels(7, shift=3.0, dtype=D)
    for k in range(7):
        x = flow.euler_step(x, levels[k], levels[k + 1], v_fn(x, levels[k], None))
    torch.testing.assert_close(x, x0)


def test_tweedie_identity():
    x0, eps, t = _batch(2)
    x_t = flow.interpolate(x0, eps, t)
    v_real, v_fake = torch.randn_like(x_t), torch.randn_like(x_t)
    d_real = flow.x0_from_velocity(x_t, t, v_real)
    d_fake = flow.x0_from_velocity(x_t, t, v_fake)
    torch.testing.assert_close(d_real - d_fake, -flow.expand_t(t, x_t) * (v_real - v_fake))


def test_shift_and_inference_levels():
    lv = inference_levels(4, shift=3.0, dtype=D)
    torch.testing.assert_close(lv, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0], dtype=D))
    assert flow.shift_time(0.3, 1.0) == 0.3
    lv1 = inference_levels(100, shift=1.0, dtype=D)
    assert lv1.numel() == 101 and torch.all(lv1[1:] < lv1[:-1])


def test_flow_matching_loss_is_zero_for_exact_velocity():
    x0, eps, t = _batch(3)
    v_fn = lambda x, tt, c: flow.velocity_target(x0, eps)  # noqa: E731
    assert float(flow.flow_matching_loss(v_fn, x0, eps, t, None)) == 0.0


def test_diffusers_scheduler_reproduces_the_4_step_levels_with_explicit_sigmas():
    """The exported scheduler config (shift 3) + set_timesteps(sigmas=[1, .75, .5, .25]) = our levels;
    set_timesteps(4) alone does not (hence the explicit sigmas in cdm_model.json)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    s.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    torch.testing.assert_close(s.sigmas.double(), inference_levels(4, 3.0, dtype=D), atol=1e-6, rtol=0)
    s.set_timesteps(4)
    assert not torch.allclose(s.sigmas.double(), inference_levels(4, 3.0, dtype=D), atol=1e-3)
