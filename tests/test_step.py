"""The CDM iteration on tiny real SD3 transformers: determinism, TTUR, zero gradient at the fixed point,
every ablation flag on the same path, the non-finite guard."""

import copy

import pytest
import torch

from cdm_core.conditioning import Cond
from cdm_core.ema import EMA
from cdm_core.models import SD3Family, tiny_sd3_config
from cdm_core.optim import warmup_adamw
from cdm_core.step import CDMConfig, CDMStep
from cdm_core.trainable import TorchTrainable
from workflows.model_folder import new_model

V = SD3Family.velocity

SHAPE = (4, 1, 8, 8)


def _model(seed=0):
    torch.manual_seed(seed)
    return new_model(
        "sd3",
        tiny_sd3_config(sample_size=8, patch_size=2, num_layers=1, num_heads=2, head_dim=8, text_dim=12, pooled_dim=12),
    )


def _cond(seed=0):
    g = torch.Generator().manual_seed(seed)
    return Cond(torch.randn(4, 3, 12, generator=g), torch.randn(4, 12, generator=g))


def _make(cfg, seed=0, fake_lr=5e-6, teacher=None):
    teacher = teacher or _model(seed)
    student, fake = copy.deepcopy(teacher), copy.deepcopy(teacher)
    so, ss = warmup_adamw(student, 1e-3, warmup_steps=1)
    fo = (
        torch.optim.SGD(fake.parameters(), lr=fake_lr)
        if fake_lr == 0
        else warmup_adamw(fake, fake_lr, warmup_steps=1)[0]
    )
    st = TorchTrainable(student, so, V, lr_scheduler=ss)
    ft = TorchTrainable(fake, fo, V)
    ema = EMA(student, 0.999)
    return CDMStep(cfg, st, ft, V(teacher.requires_grad_(False)), ema), student, fake, ema


def _run(step, iters, cond=None, uncond=None):
    cond = cond or _cond(0)
    uncond = uncond or _cond(1)
    return [step(i, cond, uncond, SHAPE) for i in range(iters)]


def test_same_seed_gives_bitwise_same_steps():
    cfg = CDMConfig(n_max=4, alpha=1.0, seed=5)
    s1, st1, fk1, e1 = _make(cfg)
    s2, st2, fk2, e2 = _make(cfg)
    r1, r2 = _run(s1, 4), _run(s2, 4)
    assert [r.metrics for r in r1] == [r.metrics for r in r2]
    for a, b in zip(
        list(st1.parameters()) + list(fk1.parameters()) + list(e1.shadow.parameters()),
        list(st2.parameters()) + list(fk2.parameters()) + list(e2.shadow.parameters()),
    ):
        assert torch.equal(a, b)
    s3, st3, _, _ = _make(CDMConfig(n_max=4, alpha=1.0, seed=6))
    _run(s3, 4)
    assert any(not torch.equal(a, b) for a, b in zip(st1.parameters(), st3.parameters()))


def test_update_ratio_and_student_changes():
    cfg = CDMConfig(n_max=3, alpha=1.0, update_ratio=2)
    step, student, fake, ema = _make(cfg)
    before = copy.deepcopy(student.state_dict())
    res = _run(step, 4)
    assert [r.student_updated for r in res] == [False, True, False, True]
    assert step.student_steps == 2 and ema.num_updates == 2
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    for key in ("loss/ca", "loss/dm", "loss/cdm", "loss/fake", "norm/dm", "grad_norm/student", "schedule/n"):
        assert key in res[1].metrics


def test_student_gradient_is_zero_when_all_three_coincide_and_alpha_zero():
    cfg = CDMConfig(n_max=3, alpha=0.0, update_ratio=1, fake_blend=None)
    step, student, fake, _ = _make(cfg, fake_lr=0.0)
    grads = {}
    orig_apply = step.student.apply

    def capture(loss):
        loss.backward(retain_graph=True)
        grads.update({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
        student.zero_grad(set_to_none=True)
        return orig_apply(loss)

    step.student.apply = capture
    res = _run(step, 1)
    assert res[0].student_updated and grads
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())
    assert res[0].metrics["loss/student"] == 0.0


@pytest.mark.parametrize(
    "flags",
    [
        dict(schedule="fixed", use_cdm=False),
        dict(use_cdm=False),
        dict(off_trajectory="gaussian"),
        dict(target="final"),
        dict(off_trajectory="gaussian", gaussian_base="anchor"),
        dict(fake_mix=0.5, norm_floor=0.01),
        dict(fake_final=0.5, fake_mix=0.5, use_cdm=False),
        dict(use_ca=False, use_dm=False),
        dict(use_ca=True, use_dm=False, use_cdm=False),
        dict(w_ca=0.5, w_dm=2.0, w_cdm=0.1, alpha=0.25, update_ratio=3),
    ],
)
def test_every_ablation_runs_on_the_same_path(flags):
    cfg = CDMConfig(n_max=3, **flags)
    step, student, _, _ = _make(cfg)
    res = _run(step, cfg.update_ratio)
    m = res[-1].metrics
    assert res[-1].student_updated
    assert ("loss/ca" in m) == cfg.use_ca and ("loss/dm" in m) == cfg.use_dm and ("loss/cdm" in m) == cfg.use_cdm
    assert all(torch.isfinite(p).all() for p in student.parameters())
    if cfg.schedule == "fixed":
        assert m["schedule/n"] == 4


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="schedule"):
        CDMConfig(schedule="cosine")
    with pytest.raises(ValueError, match="at least one"):
        CDMConfig(use_ca=False, use_dm=False, use_cdm=False)


def test_non_finite_gradient_skips_the_step():
    m = torch.nn.Linear(3, 3)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    t = TorchTrainable(m, opt, lambda mod: lambda x, tt, c: mod(x))
    before = copy.deepcopy(m.state_dict())
    r = t.apply((m(torch.ones(1, 3)) * float("inf")).sum())
    # a non-finite loss is replaced by a zero loss (finite zero gradients): the step cannot move or poison the weights
    assert r.skipped
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(torch.isfinite(p).all() for p in m.parameters()) and r.grad_norm == 0.0


def test_anchor_indices_and_noise_come_from_different_streams():
    from cdm_core.seeds import rank_seed

    assert len({rank_seed(3, 0, 7, stream) for stream in range(3)}) == 3
    # the anchor stream no longer replays the noise stream's first draws
    g0 = torch.Generator().manual_seed(rank_seed(3, 0, 7, 0))
    g1 = torch.Generator().manual_seed(rank_seed(3, 0, 7, 1))
    assert not torch.equal(torch.rand(8, generator=g0), torch.rand(8, generator=g1))


def test_fake_mix_trains_the_fake_teacher_on_off_trajectory_estimates():
    # fake_mix 0 and 1 draw the same noise; only the fake teacher's training samples differ
    runs = {}
    for mix in (0.0, 1.0):
        step, _, fake, _ = _make(CDMConfig(n_max=3, alpha=1.0, update_ratio=2, fake_mix=mix))
        res = _run(step, 1)
        runs[mix] = (res[0].metrics["loss/fake"], [p.detach().clone() for p in fake.parameters()])
    assert runs[0.0][0] != runs[1.0][0]
    assert any(not torch.equal(a, b) for a, b in zip(runs[0.0][1], runs[1.0][1]))


def test_fake_final_trains_the_fake_teacher_on_the_rollouts_final_sample():
    # fake_final 1 feeds the fake teacher the student's final samples: the rollout then reaches the last anchor
    seen = {}
    for share in (0.0, 1.0):
        step, _, fake, _ = _make(
            CDMConfig(schedule="fixed", alpha=1.0, update_ratio=2, fake_final=share, use_cdm=False)
        )
        res = _run(step, 1)
        seen[share] = (res[0].metrics, [p.detach().clone() for p in fake.parameters()])
    assert seen[0.0][0]["loss/fake"] != seen[1.0][0]["loss/fake"]
    assert seen[1.0][0]["nfe/rollout"] == seen[1.0][0]["schedule/n"] >= seen[0.0][0]["nfe/rollout"]
    assert any(not torch.equal(a, b) for a, b in zip(seen[0.0][1], seen[1.0][1]))
    with pytest.raises(ValueError, match="fake_final"):
        CDMConfig(fake_final=1.5)


def _teacher_levels(cfg, iters=6):
    """The noise levels the real teacher was queried at: CA's (cond + uncond, a batch of 2B) and DM's (B)."""
    step, *_ = _make(cfg)
    real, seen = step.real, {"ca": [], "dm": []}

    def recording(x, t, c):
        seen["ca" if x.shape[0] == 2 * SHAPE[0] else "dm"].append(t.detach().clone())
        return real(x, t, c)

    step.real = recording
    _run(step, iters)
    return {k: torch.cat(v) for k, v in seen.items()}


def test_ca_tau_max_clamps_ca_alone():
    base = dict(schedule="fixed", use_cdm=False, alpha=1.0, update_ratio=1, tau_max=0.9)
    capped = _teacher_levels(CDMConfig(**base, ca_tau_max=0.3))
    assert capped["ca"].max() <= 0.3 + 1e-6
    assert capped["dm"].max() > 0.3  # DM still samples [tau_min, tau_max]
    free = _teacher_levels(CDMConfig(**base))
    assert free["ca"].max() > 0.3  # without it CA's clamp is tau_max
    with pytest.raises(ValueError, match="ca_tau_max"):
        CDMConfig(tau_min=0.2, ca_tau_max=0.1)


def test_lr_decay_is_warmup_then_cosine_to_the_floor():
    from cdm_core.optim import lr_factor

    assert lr_factor(0, 10) == pytest.approx(0.1) and lr_factor(500, 10) == 1.0
    assert lr_factor(9, 10, 110, "cosine") == 1.0
    assert lr_factor(59, 10, 110, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(109, 10, 110, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 10, 110, "cosine", 0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="cosine"):
        lr_factor(50, 10, 110, "linear")
