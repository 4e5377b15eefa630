"""Schedules: N range, anchors inside the shifted range, shared N for equal seeds; the rollout."""

import torch

from cdm_core import flow
from cdm_core.rollout import backward_simulation
from cdm_core.schedule import dynamic_schedule, fixed_schedule, pick_anchors
from cdm_core.seeds import schedule_seed


def test_dynamic_schedule_distribution():
    n_max, s_min, s_max, shift = 28, 0.25, 0.95, 3.0
    lo, hi = flow.shift_time(s_min, shift), flow.shift_time(s_max, shift)
    ns = []
    for step in range(2000):
        s = dynamic_schedule(schedule_seed(0, step), n_max, s_min, s_max, shift)
        sig = s.sigmas
        assert sig.numel() == s.n + 1 and sig[0] == 1.0 and sig[-1] == 0.0
        assert torch.all(sig[1:] <= sig[:-1])
        inner = sig[1:-1]
        assert torch.all((inner >= lo - 1e-6) & (inner <= hi + 1e-6))
        ns.append(s.n)
    ns = torch.tensor(ns)
    assert ns.min() == 1 and ns.max() == n_max
    counts = torch.bincount(ns, minlength=n_max + 1)[1:].float()
    assert counts.min() > 0.5 * counts.mean()  # roughly uniform over 1..n_max


def test_same_seed_same_schedule_on_every_rank_and_different_across_steps():
    a = dynamic_schedule(schedule_seed(3, 17), 28)
    b = dynamic_schedule(schedule_seed(3, 17), 28)
    assert a.n == b.n and torch.equal(a.sigmas, b.sigmas)
    ns = {dynamic_schedule(schedule_seed(3, k), 28).n for k in range(50)}
    assert len(ns) > 10


def test_fixed_schedule_is_the_inference_levels():
    s = fixed_schedule(4, 3.0)
    torch.testing.assert_close(s.sigmas, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    a = pick_anchors(s, 1000, torch.Generator().manual_seed(0))
    assert set(a.tolist()) == {0, 1, 2, 3}


def test_rollout_matches_full_rollout_and_stops_early():
    d = torch.float64
    w = torch.randn(8, 8, dtype=d, generator=torch.Generator().manual_seed(0)) * 0.2
    calls = []

    def v(x, t, c):
        calls.append(1)
        return (x.flatten(1) @ w.T).reshape(x.shape) * (1 + t[:, None, None, None])

    sig = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0], dtype=d)
    eps = torch.randn(3, 2, 2, 2, dtype=d, generator=torch.Generator().manual_seed(1))
    anchors = torch.tensor([0, 2, 1])
    r = backward_simulation(v, eps, sig, anchors, None)
    assert len(calls) == 3 and r.nfe == 3  # deepest anchor is 2
    # manual full rollout
    x, states = eps, []
    for k in range(5):
        vk = v(x, sig[k].expand(3), None)
        states.append((x.clone(), vk.clone()))
        x = flow.euler_step(x, sig[k], sig[k + 1], vk)
    for b, i in enumerate(anchors.tolist()):
        torch.testing.assert_close(r.x[b], states[i][0][b])
        torch.testing.assert_close(r.v[b], states[i][1][b])
        torch.testing.assert_close(r.t[b], sig[i])
        torch.testing.assert_close(r.x0_hat[b], states[i][0][b] - sig[i] * states[i][1][b])
    r_full = backward_simulation(v, eps, sig, anchors, None, need_final=True)
    torch.testing.assert_close(r_full.final_x0_hat, states[4][0] - sig[4] * states[4][1])
    torch.testing.assert_close(r_full.x, r.x)


def test_rollout_depth_can_be_synchronised_without_changing_the_states():
    d = torch.float64
    v = lambda x, t, c: x * (0.5 + t[:, None, None, None])  # noqa: E731
    sig = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0], dtype=d)
    eps = torch.randn(3, 1, 2, 2, dtype=d, generator=torch.Generator().manual_seed(2))
    anchors = torch.tensor([0, 1, 1])
    local = backward_simulation(v, eps, sig, anchors, None)
    synced = backward_simulation(v, eps, sig, anchors, None, sync_depth=lambda k: 3)  # another rank needs 3
    assert local.nfe == 2 and synced.nfe == 4
    torch.testing.assert_close(local.x, synced.x)
    torch.testing.assert_close(local.v, synced.v)
