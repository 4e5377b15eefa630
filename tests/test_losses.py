"""CDM losses: analytic gradients w.r.t. x0_hat (a missing stop-gradient fails these), Tweedie form of the
DM direction, zero gradients when student = real = fake and alpha = 0."""

import copy

import pytest
import torch

from cdm_core import flow
from cdm_core.conditioning import Cond
from cdm_core.losses import ca_loss, dm_loss, fake_loss, matching_loss

D = torch.float64
B, SHAPE = 3, (2, 4, 4)
NUMEL = 2 * 4 * 4


def _cond(b=B, dtype=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Cond(torch.randn(b, 5, 6, generator=g, dtype=dtype), torch.randn(b, 6, generator=g, dtype=dtype))


class LinearVelocity(torch.nn.Module):
    """A small, exactly differentiable velocity model: v = W x + a(t) + P pooled (per channel)."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(NUMEL, NUMEL, generator=g, dtype=D) * 0.1)
        self.a = torch.nn.Parameter(torch.randn(NUMEL, generator=g, dtype=D) * 0.1)
        self.p = torch.nn.Parameter(torch.randn(6, NUMEL, generator=g, dtype=D) * 0.1)

    def forward(self, x, t, cond):
        h = x.flatten(1) @ self.w.T + torch.tanh(t)[:, None] * self.a + cond.pooled @ self.p
        return h.reshape(x.shape)


def _x0_eps_tau(seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, *SHAPE, generator=g, dtype=D)
    eps = torch.randn(B, *SHAPE, generator=g, dtype=D)
    tau = torch.rand(B, generator=g, dtype=D) * 0.9 + 0.05
    return x0, eps, tau


def _n(d_ref, x0):
    return (d_ref - x0).abs().flatten(1).mean(1).clamp_min(0.1)


def test_matching_loss_gradient_is_minus_two_delta_over_n_b_numel():
    x0, eps, tau = _x0_eps_tau()
    x0_hat = x0.clone().requires_grad_(True)
    delta = torch.randn_like(x0)
    d_ref = x0 + 0.5 * torch.randn_like(x0)
    res = matching_loss(x0_hat, delta, d_ref, tau)
    res.loss.backward()
    n = _n(d_ref, x0)
    expected = -2 * delta / (n.reshape(B, 1, 1, 1) * B * NUMEL)
    torch.testing.assert_close(x0_hat.grad, expected)
    # the loss value equals the mean squared update direction
    torch.testing.assert_close(res.loss, ((delta / n.reshape(B, 1, 1, 1)) ** 2).flatten(1).mean(1).mean())


def test_normaliser_floor():
    x0, _, tau = _x0_eps_tau()
    res = matching_loss(x0.clone().requires_grad_(True), torch.ones_like(x0), x0.clone(), tau)
    assert torch.all(res.normalizer == 0.1)


def test_dm_gradient_matches_tweedie_direction():
    x0, eps, tau = _x0_eps_tau(2)
    real, fake, cond = LinearVelocity(1), LinearVelocity(2), _cond()
    x0_hat = x0.clone().requires_grad_(True)
    res = dm_loss(x0_hat, real, fake, cond, eps, tau)
    res.loss.backward()
    z = flow.interpolate(x0, eps, tau)
    with torch.no_grad():
        v_r, v_f = real(z, tau, cond), fake(z, tau, cond)
    delta = -flow.expand_t(tau, z) * (v_r - v_f)  # Tweedie: D_R - D_F
    n = _n(flow.x0_from_velocity(z, tau, v_r), x0)
    torch.testing.assert_close(x0_hat.grad, -2 * delta / (n.reshape(B, 1, 1, 1) * B * NUMEL))


def test_ca_gradient_is_alpha_times_cfg_direction():
    x0, eps, tau = _x0_eps_tau(3)
    real, cond, uncond = LinearVelocity(1), _cond(seed=1), _cond(seed=2)
    x0_hat = x0.clone().requires_grad_(True)
    alpha = 7.0
    ca_loss(x0_hat, real, cond, uncond, eps, tau, alpha).loss.backward()
    z = flow.interpolate(x0, eps, tau)
    with torch.no_grad():
        d_c = flow.x0_from_velocity(z, tau, real(z, tau, cond))
        d_u = flow.x0_from_velocity(z, tau, real(z, tau, uncond))
    n = _n(d_c, x0).reshape(B, 1, 1, 1)
    torch.testing.assert_close(x0_hat.grad, -2 * alpha * (d_c - d_u) / (n * B * NUMEL))


def test_gradient_reaches_student_only_through_x0_hat():
    """dL/dtheta = (dL/dx0_hat) . dx0_hat/dtheta with x0_hat = x - t v_theta (chain rule, float64)."""
    x0, eps, tau = _x0_eps_tau(4)
    student, real, fake, cond = LinearVelocity(3), LinearVelocity(1), LinearVelocity(2), _cond()
    x, t = flow.interpolate(x0, eps, tau), tau
    x0_hat = flow.x0_from_velocity(x, t, student(x, t, cond))
    leaf = x0_hat.detach().requires_grad_(True)
    dm_loss(leaf, real, fake, cond, eps, tau).loss.backward()
    dm_loss(x0_hat, real, fake, cond, eps, tau).loss.backward()
    x0_hat2 = flow.x0_from_velocity(x, t, student(x, t, cond))
    (g_expected,) = torch.autograd.grad((x0_hat2 * leaf.grad).sum(), student.w)
    torch.testing.assert_close(student.w.grad, g_expected)


@pytest.mark.parametrize("loss", ["ca", "dm"])
def test_zero_gradient_when_student_real_fake_coincide_and_alpha_zero(loss):
    x0, eps, tau = _x0_eps_tau(5)
    student = LinearVelocity(7)
    real, fake = copy.deepcopy(student), copy.deepcopy(student)
    cond, uncond = _cond(), _cond(seed=3)
    x = flow.interpolate(x0, eps, tau)
    x0_hat = flow.x0_from_velocity(x, tau, student(x, tau, cond))
    if loss == "ca":
        res = ca_loss(x0_hat, real, cond, uncond, eps, tau, alpha=0.0)
    else:
        res = dm_loss(x0_hat, real, fake, cond, eps, tau)
    res.loss.backward()
    for p in student.parameters():
        assert torch.count_nonzero(p.grad) == 0


def test_fake_loss_is_velocity_regression_and_detaches_x0():
    x0, eps, tau = _x0_eps_tau(6)
    fake, cond = LinearVelocity(2), _cond()
    x0_req = x0.clone().requires_grad_(True)
    res = fake_loss(fake, x0_req, eps, tau, cond)
    z = flow.interpolate(x0, eps, tau)
    expected = ((fake(z, tau, cond) - (eps - x0)) ** 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(res.loss, expected)
    res.loss.backward()
    assert x0_req.grad is None and fake.w.grad is not None


def test_final_target_measures_the_direction_at_the_final_sample_but_keeps_n_and_target_local():
    """``target: final``: z is built from the rollout's final estimate; the normaliser and the target base stay
    at sg(x0_hat'), so the gradient is ``-2 Delta_final / (n_local B numel)`` (not a regression onto it)."""
    x0, eps, tau = _x0_eps_tau()
    final = x0 + 0.3 * torch.randn_like(x0)
    real, fake = LinearVelocity(1), LinearVelocity(2)
    cond = _cond()
    x0_hat = x0.clone().requires_grad_(True)
    dm_loss(x0_hat, real, fake, cond, eps, tau, z_base=final).loss.backward()
    with torch.no_grad():
        z = flow.interpolate(final, eps, tau)
        d_r = flow.x0_from_velocity(z, tau, real(z, tau, cond))
        d_f = flow.x0_from_velocity(z, tau, fake(z, tau, cond))
        n = _n(d_r, x0)
    torch.testing.assert_close(x0_hat.grad, -2 * (d_r - d_f) / (n.reshape(B, 1, 1, 1) * B * NUMEL))


def test_normaliser_floor_is_configurable():
    x0, _, tau = _x0_eps_tau()
    d_ref = x0 + 0.02
    assert torch.all(matching_loss(x0.clone(), torch.ones_like(x0), d_ref, tau).normalizer == 0.1)
    torch.testing.assert_close(
        matching_loss(x0.clone(), torch.ones_like(x0), d_ref, tau, floor=0.001).normalizer,
        torch.full((B,), 0.02, dtype=D),
    )
