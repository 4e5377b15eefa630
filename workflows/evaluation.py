"""``cdm eval``: sample a model folder with a sampler spec and score it like the papers do.

    cdm eval workflows/assets/teacher-tiny --steps 4 --guidance 1 --out outputs/eval-teacher-4
    cdm eval outputs/student --steps 4 --n-samples 5000 --seeds 0,1,2

The eval set: ``n_samples`` images per seed, class ``i % 10`` with the held-out paraphrase
``i % 4`` (prompts never seen in training), noise from ``torch.Generator().manual_seed(seed)``. FD
depends on N, so compare numbers only at the same ``n_samples``. ``mse_to_teacher100`` compares to the
teacher's ``reference_steps``-step output from the same noise and prompt (cached on disk).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cdm_core.conditioning import Cond
from cdm_core.metrics import (
    adherence,
    feature_stats,
    frechet_distance,
    high_frequency_energy,
    mse,
    pixel_panel,
    precision_recall,
    selection_score,
)
from workflows.config import DEFAULT_EVALUATOR, DEFAULT_JUDGE2, DEFAULT_TEACHER, EvalConfig
from workflows.embeddings import cache_dir, empty_prompt, encode_prompts
from workflows.evaluator import Evaluator
from workflows.files import save_atomic, write_text_atomic
from workflows.images import save_grid
from workflows.model_folder import load_model
from workflows.pixel_reference import pixel_reference
from workflows.progress import console
from workflows.prompts import HELDOUT_TEMPLATES, heldout_prompts
from workflows.sampler import generate as sample_batches

# judge 1 (fd, adherence, precision, recall), judge 2 (the same with a 2), the pixel panel, and the combined
# selection score (cdm_core.metrics.selection_score) that picks checkpoints and recipes on validation seeds
# bump when a metric's definition changes: cached evaluations (evaluate_cached) are keyed by it
METRICS_VERSION = 1
METRICS = (
    "fd",
    "adherence",
    "precision",
    "recall",
    "hf_gap",
    "mse_to_teacher100",
    "fd2",
    "adherence2",
    "precision2",
    "recall2",
    "near_white",
    "near_black",
    "edge_energy",
    "intensity_w1",
    "class_mean_gap",
    "selection_score",
)


@dataclass
class EvalSet:
    noise: torch.Tensor
    labels: torch.Tensor
    cond: Cond
    uncond: Cond


def eval_set(n: int, seed: int, shape: tuple[int, int, int] = (1, 32, 32)) -> EvalSet:
    table = encode_prompts([p for p, _ in heldout_prompts()])
    empty = empty_prompt()
    i = torch.arange(n)
    labels = i % 10
    rows = labels * len(HELDOUT_TEMPLATES) + (i // 10) % len(HELDOUT_TEMPLATES)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *shape), generator=g)
    return EvalSet(noise, labels, table.index(rows), empty.expand(n))


def folder_hash(folder: str | Path) -> str:
    """Content hash of a model folder's weights and configs (lineage tag, cache key)."""
    h = hashlib.sha256()
    p = Path(folder)
    for f in sorted(p.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".json", ".bin"):
            h.update(str(f.relative_to(p)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def generate(v_fn, es: EvalSet, steps: int, shift: float, guidance: float, batch: int, device) -> torch.Tensor:
    """The eval set's images from a velocity callable: the one few-step sampler over its noise and prompts."""
    return sample_batches(v_fn, es.noise, es.cond, es.uncond, steps, shift, guidance, batch, device)


def _reference_path(teacher: str | Path, es: EvalSet, seed: int, steps: int) -> Path:
    return cache_dir() / f"ref-{folder_hash(teacher)}-s{seed}-n{es.noise.shape[0]}-k{steps}.pt"


def store_reference(teacher: str | Path, es: EvalSet, seed: int, steps: int, images: torch.Tensor) -> None:
    """Keep ``images`` (the teacher's own ``steps``-step, guidance-1 output on ``es``) as its reference."""
    save_atomic(images.cpu(), _reference_path(teacher, es, seed, steps))


def teacher_reference(teacher: str | Path, es: EvalSet, seed: int, steps: int, batch: int, device) -> torch.Tensor:
    """The teacher's ``steps``-step, guidance-1 output on the eval set, cached by content hash."""
    path = _reference_path(teacher, es, seed, steps)
    if path.exists():
        return torch.load(path, weights_only=True)
    m = load_model(teacher, device)
    console.print(f"computing the teacher's {steps}-step reference for seed {seed} (cached at {path})")
    ref = generate(m.velocity(), es, steps, m.meta.shift, 1.0, batch, device)
    store_reference(teacher, es, seed, steps, ref)
    return ref


def judge(ev: Evaluator, images: torch.Tensor, labels: torch.Tensor, suffix: str = "") -> dict:
    """One judge's FD, precision / recall (k = 3) and adherence, keys suffixed (``fd2`` for the second)."""
    feats, logits = ev.features_and_logits(images.clamp(-1, 1))
    prec, rec = precision_recall(ev.pr_features, feats[: ev.pr_features.shape[0]], k=3)
    return {
        f"fd{suffix}": frechet_distance(feature_stats(feats), ev.reference),
        f"adherence{suffix}": adherence(logits, labels),
        f"precision{suffix}": prec,
        f"recall{suffix}": rec,
    }


def score(
    ev: Evaluator,
    images: torch.Tensor,
    labels: torch.Tensor,
    reference: torch.Tensor | None,
    ev2: Evaluator | None = None,
) -> dict:
    """Both judges (the second when given), the pixel panel against the real test split, and with both judges
    the selection score."""
    images = images.clamp(-1, 1)
    out = judge(ev, images, labels)
    out["hf_gap"] = abs(high_frequency_energy(images) - ev.hf_real)
    if ev2 is not None:
        out.update(judge(ev2, images, labels, "2"))
    ref = pixel_reference()
    panel = pixel_panel(images, labels, ref)
    out.update(panel)
    if ev2 is not None:
        out["selection_score"] = selection_score(out["fd"], out["fd2"], panel, ref)
    if reference is not None:
        out["mse_to_teacher100"] = mse(images, reference.clamp(-1, 1))
    return out


def summarize(per_seed: list[dict]) -> dict:
    out = {}
    for k in METRICS:
        vals = [d[k] for d in per_seed if k in d]
        if vals:
            out[k] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0}
    return out


def _shown(path: str | Path) -> str:
    """A judge's folder as recorded in results: relative to the repository when it lies inside it."""
    root = Path(__file__).resolve().parent.parent
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


def evaluate_folder(
    model_dir: str | Path,
    cfg: EvalConfig,
    out_dir: str | Path | None = None,
    teacher: str | Path = DEFAULT_TEACHER,
    evaluator: str | Path = DEFAULT_EVALUATOR,
    model: torch.nn.Module | None = None,
    judge2: str | Path | None = DEFAULT_JUDGE2,
) -> dict:
    """Evaluate a model folder (or an in-memory ``model`` with that folder's meta) over ``cfg.seeds`` with
    both judges (``judge2=None`` skips the second) and the pixel panel."""
    dev = torch.device(cfg.device)
    handle = load_model(model_dir, dev, module=model)
    meta = handle.meta
    shift = cfg.shift if cfg.shift is not None else meta.shift
    v_fn = handle.velocity()
    ev = Evaluator.load(evaluator)
    ev2 = Evaluator.load(judge2) if judge2 is not None else None
    per_seed, wall, timed = [], 0.0, 0
    first = None
    for seed in cfg.seeds:
        es = eval_set(cfg.n_samples, seed, handle.shape)
        t0 = time.time()
        is_reference = (
            model is None
            and cfg.steps == cfg.reference_steps
            and cfg.guidance == 1.0
            and shift == meta.shift
            and Path(model_dir).resolve() == Path(teacher).resolve()
        )
        cached = _reference_path(teacher, es, seed, cfg.steps) if is_reference else None
        if cached is not None and cached.exists():  # the teacher's own reference run, already on disk
            imgs = torch.load(cached, weights_only=True)
        else:
            imgs = generate(v_fn, es, cfg.steps, shift, cfg.guidance, cfg.batch_size, dev)
            wall += time.time() - t0
            timed += imgs.shape[0]
        ref = None
        if cfg.reference_steps:
            if is_reference:
                ref = imgs  # this run is the teacher's reference: keep it for the other rows
                store_reference(teacher, es, seed, cfg.reference_steps, imgs)
            else:
                ref = teacher_reference(teacher, es, seed, cfg.reference_steps, cfg.batch_size, dev)
        s = score(ev, imgs, es.labels, ref, ev2)
        console.print(f"eval seed {seed}: " + " ".join(f"{k}={v:.4g}" for k, v in s.items()))
        per_seed.append(s)
        if first is None:
            first = imgs
    result = {
        "model": str(model_dir),
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "shift": shift,
        "nfe": cfg.steps * (2 if cfg.guidance != 1.0 else 1),
        "n_samples": cfg.n_samples,
        "seeds": list(cfg.seeds),
        **summarize(per_seed),
        "per_seed": per_seed,
        "s_per_image": wall / timed if timed else None,  # None: every image came from the reference cache
        "device": str(dev),
        "judges": {"fd": _shown(evaluator), "fd2": _shown(judge2) if judge2 is not None else None},
    }
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        # eval-set image i has class i % 10: the first 100 form 10 rows with one class per column
        grid = first[:100]
        save_grid(grid, out / "grid.png")
        result["outputs"] = {"json": str(out / "eval.json"), "grid": str(out / "grid.png")}
    return result


def evaluate_cached(
    model_dir: str | Path,
    cfg: EvalConfig,
    out_dir: str | Path | None = None,
    teacher: str | Path = DEFAULT_TEACHER,
    evaluator: str | Path = DEFAULT_EVALUATOR,
    judge2: str | Path | None = DEFAULT_JUDGE2,
) -> dict:
    """:func:`evaluate_folder` of a model folder whose result is cached by the contents of the folder, the
    judges and the eval config (the teacher's rows of ``cdm run``: 100 NFE on 1,000 images is minutes on CPU)."""
    h = hashlib.sha256(f"{METRICS_VERSION}:{cfg.model_dump_json()}".encode())
    for f in (model_dir, evaluator, judge2, teacher if cfg.reference_steps else None):
        h.update((folder_hash(f) if f is not None else "-").encode())
    for f in (evaluator, judge2):  # the judges' reference statistics, which folder_hash does not cover
        if f is not None and (Path(f) / "reference.pt").exists():
            h.update((Path(f) / "reference.pt").read_bytes())
    h.update(json.dumps(pixel_reference().to_dict()).encode())
    path = cache_dir() / f"eval-{h.hexdigest()[:20]}.json"
    if path.exists():
        res = json.loads(path.read_text())
        console.print(f"evaluation of {model_dir} ({cfg.steps} steps, guidance {cfg.guidance}) from the cache {path}")
    else:
        res = evaluate_folder(model_dir, cfg, None, teacher, evaluator, judge2=judge2)
        write_text_atomic(json.dumps(res), path)
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "eval.json").write_text(json.dumps(res, indent=2) + "\n")
    return res
