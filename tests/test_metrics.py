"""The evaluator on real data: FD ~0 between halves of the test split, large for noise; adherence
high on real images; the metric functions on known inputs."""

import torch

from cdm_core.metrics import (
    adherence,
    feature_stats,
    frechet_distance,
    high_frequency_energy,
    precision_recall,
)


def _stratified_halves(labels: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a, b = [], []
    for c in range(10):
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        a.append(idx[: idx.numel() // 2])
        b.append(idx[idx.numel() // 2 :])
    a, b = torch.cat(a), torch.cat(b)
    # shuffle so that any prefix keeps the class mix
    return a[torch.randperm(a.numel(), generator=g)], b[torch.randperm(b.numel(), generator=g)]


def test_fd_is_near_zero_for_real_halves_and_large_for_noise(test_split, evaluator):
    images, labels = test_split
    ia, ib = _stratified_halves(labels)
    fa, _ = evaluator.features_and_logits(images[ia])
    fb, _ = evaluator.features_and_logits(images[ib])
    fd_halves = frechet_distance(feature_stats(fa), feature_stats(fb))
    noise = torch.randn(ia.numel(), *images.shape[1:], generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    fn, _ = evaluator.features_and_logits(noise)
    fd_noise = frechet_distance(feature_stats(fn), feature_stats(fb))
    # one class only: a "mode-collapsed" generator
    fc, _ = evaluator.features_and_logits(images[labels == 3][:2000])
    fd_one_class = frechet_distance(feature_stats(fc), feature_stats(fb))
    assert fd_halves < 0.02 * fd_noise, (fd_halves, fd_noise)
    assert fd_halves < 0.1 * fd_one_class, (fd_halves, fd_one_class)


def test_adherence_is_high_on_real_test_images(test_split, evaluator):
    images, labels = test_split
    _, logits = evaluator.features_and_logits(images)
    assert adherence(logits, labels) > 0.85
    shuffled = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(1))]
    assert adherence(logits, shuffled) < 0.2


def test_precision_recall_on_real_vs_collapsed(test_split, evaluator):
    images, labels = test_split
    ia, ib = _stratified_halves(labels, seed=1)
    fa, _ = evaluator.features_and_logits(images[ia][:2000])
    fb, _ = evaluator.features_and_logits(images[ib][:2000])
    p, r = precision_recall(fa, fb, k=3)
    assert p > 0.6 and r > 0.6
    fc, _ = evaluator.features_and_logits(images[labels == 7][:500])
    p_c, r_c = precision_recall(fa, fc, k=3)
    assert p_c > 0.6 and r_c < 0.3  # one class: realistic but no coverage


def test_frechet_distance_matches_closed_form_for_gaussians():
    torch.manual_seed(0)
    d = 4
    a = feature_stats(torch.randn(200000, d, dtype=torch.float64))
    b = feature_stats(torch.randn(200000, d, dtype=torch.float64) * 2 + 1)
    # identity vs 4*I covariance, mean shift 1 per dim: d + d*(1 + 4 - 2*2) = 2d
    assert abs(frechet_distance(a, b) - 2 * d) < 0.1
    assert frechet_distance(a, a) < 1e-9


def test_high_frequency_energy_orders_smooth_below_noise():
    k = torch.arange(32, dtype=torch.float64)
    smooth = torch.cos(2 * torch.pi * k / 32).reshape(1, 1, 1, 32).expand(4, 1, 32, 32)  # 1/32 cycles/px
    noise = torch.randn(4, 1, 32, 32)
    assert high_frequency_energy(smooth) < 0.05 < high_frequency_energy(noise)


def test_teacher_reference_is_kept_from_its_own_run_and_not_taken_from_another_shift(tmp_path, monkeypatch):
    # the teacher's own 3-step guidance-1 run is its 3-step reference (MSE 0) and is stored for later rows;
    # the same steps at another shift are not the reference (MSE > 0)
    monkeypatch.setenv("CDM_CACHE_DIR", str(tmp_path))
    from workflows.config import DEFAULT_TEACHER, EvalConfig, build
    from workflows.evaluation import eval_set, evaluate_folder, teacher_reference

    c = dict(steps=3, n_samples=20, seeds=[0], reference_steps=3, batch_size=20)
    own = evaluate_folder(DEFAULT_TEACHER, build(EvalConfig, c))
    assert own["mse_to_teacher100"]["mean"] == 0.0
    stored = list(tmp_path.glob("ref-*-s0-n20-k3.pt"))
    assert len(stored) == 1
    es = eval_set(20, 0, (1, 32, 32))
    again = teacher_reference(DEFAULT_TEACHER, es, 0, 3, 20, "cpu")  # from the store, not recomputed
    stored[0].unlink()
    fresh = teacher_reference(DEFAULT_TEACHER, es, 0, 3, 20, "cpu")
    assert torch.equal(again, fresh)
    other = evaluate_folder(DEFAULT_TEACHER, build(EvalConfig, {**c, "shift": 1.0}))
    assert other["mse_to_teacher100"]["mean"] > 1e-4
