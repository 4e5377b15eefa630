"""What rank 0 of a distillation job looks at while it trains: validation metrics and sample grids.

Validation: ``cdm.sampler_steps``-step samples of the EMA student on the held-out prompts with noise seed
``eval.val_seed`` (never a test seed), scored by both judges and the pixel panel like the final evaluation.
Sample grids: the first 10 training prompts x 4 fixed seeds, logged to MLflow as PNG artifacts.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from cdm_core.sampling import sample


class Validator:
    """``validator(model)`` -> ``val_*`` metrics of a module (the EMA student: ``worker_roles.ema_model``).
    With ``base`` (the teacher's module) the teacher's few-step
    samples on the same validation set are scored once, and every call also returns ``val_worst_judge``
    (``cdm_core.metrics.worst_judge_score`` against them)."""

    def __init__(self, cfg, family, shape: tuple[int, int, int], dev, base=None):
        from workflows.config import DEFAULT_EVALUATOR, DEFAULT_JUDGE2
        from workflows.evaluation import eval_set
        from workflows.evaluator import Evaluator

        self.es = eval_set(cfg.eval.val_n_samples, cfg.eval.val_seed, shape)
        self.steps, self.shift = cfg.cdm.sampler_steps, cfg.cdm.shift
        self.family = family
        self.ev = Evaluator.load(DEFAULT_EVALUATOR)
        self.ev2 = Evaluator.load(DEFAULT_JUDGE2)
        self.dev = dev
        self.base = self._score(base) if base is not None else None

    @torch.no_grad()
    def _score(self, model) -> dict[str, float]:
        from workflows.evaluation import generate, score

        model = model.to(self.dev)
        was_training = model.training
        model.eval()
        imgs = generate(self.family.velocity(model), self.es, self.steps, self.shift, 1.0, 500, self.dev)
        model.train(was_training)
        return {k: float(v) for k, v in score(self.ev, imgs, self.es.labels, None, self.ev2).items()}

    def __call__(self, model) -> dict[str, float]:
        from cdm_core.metrics import worst_judge_score
        from workflows.pixel_reference import pixel_reference

        out = self._score(model)
        if self.base is not None:
            b = self.base
            out["worst_judge"] = worst_judge_score(out["fd"], out["fd2"], out, pixel_reference(), b["fd"], b["fd2"])
        return {f"val_{k}": v for k, v in out.items()}


@torch.no_grad()
def log_sample_grid(
    c, run_id: str, model, family, student_steps: int, prompts, empty, shape, dev, steps: int, shift: float, decode=None
) -> None:
    """Samples of ``model`` (the EMA student) for the first 10 prompts x 4 seeds at the student's sampler levels,
    as a PNG artifact (``decode``: latents -> images, for a pipeline folder's VAE)."""
    from workflows.images import save_grid

    k = min(10, len(prompts))
    rows = torch.arange(k).repeat(4)
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn((rows.numel(), *shape[1:]), generator=g).to(dev)
    x = sample(
        family.velocity(model.to(dev)),
        noise,
        steps,
        shift,
        prompts.index(rows).to(dev),
        empty.expand(rows.numel()).to(dev),
    )
    x = decode(x) if decode is not None else x.float().cpu()
    with tempfile.TemporaryDirectory() as d:
        p = save_grid(x, Path(d) / f"samples_step_{student_steps:08d}.png", nrow=k)
        c.log_artifact(run_id, str(p), "samples")
