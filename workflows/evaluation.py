"""``cdm eval``: sample a model folder with a sampler spec and score it like the papers do.

    cdm eval workflows/assets/teacher-tiny --steps 4 --guidance 1 --out outputs/eval-teacher-4
    cdm eval outputs/student --steps 4 --n-samples 5000 --seeds 0,1,2

The eval set: ``n_samples`` images per seed, class ``i % 10`` with the held-out paraphrase
``i % 4`` (prompts never seen in training), noise from ``torch.Generator().manual_seed(seed)``. FD
depends on N, so compare numbers only at the same ``n_samples``. ``mse_to_teacher100`` compares to the
teacher's ``reference_steps``-step output from the same noise and prompt (cached on disk).
"""

from __future__ import annotations

import functools
import hashlib
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cdm_core.conditioning import Cond
from cdm_core.metrics import (PixelReference, adherence, feature_stats, frechet_distance, high_frequency_energy, mse,
                              pixel_panel, precision_recall, selection_score)
from cdm_core.models.sd3 import SD3Velocity
from cdm_core.sampling import sample_euler
from cdm_core.schedule import inference_levels
from workflows.config import DEFAULT_EVALUATOR, DEFAULT_JUDGE2, DEFAULT_TEACHER, EvalConfig
from workflows.embeddings import cache_dir, empty_prompt, encode_prompts
from workflows.files import save_atomic, write_text_atomic
from workflows.evaluator import Evaluator
from workflows.model_folder import load_transformer, read_meta
from workflows.progress import console
from workflows.prompts import HELDOUT_TEMPLATES, heldout_prompts

# judge 1 (fd, adherence, precision, recall), judge 2 (the same with a 2), the pixel panel, and the combined
# selection score (cdm_core.metrics.selection_score) that picks checkpoints and recipes on validation seeds
PIXEL_REFERENCE = Path(__file__).resolve().parent / "assets" / "pixel_reference.json"
# bump when a metric's definition changes: cached evaluations (evaluate_cached) are keyed by it
METRICS_VERSION = 1
METRICS = ("fd", "adherence", "precision", "recall", "hf_gap", "mse_to_teacher100",
           "fd2", "adherence2", "precision2", "recall2",
           "near_white", "near_black", "edge_energy", "intensity_w1", "class_mean_gap", "selection_score")


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


@torch.no_grad()
def generate(model, es: EvalSet, levels: torch.Tensor, guidance: float, batch: int, device) -> torch.Tensor:
    v_fn = SD3Velocity(model)
    out = []
    for i in range(0, es.noise.shape[0], batch):
        sl = slice(i, i + batch)
        x = sample_euler(v_fn, es.noise[sl].to(device), levels.to(device), es.cond.index(sl).to(device),
                         es.uncond.index(sl).to(device), guidance)
        out.append(x.float().cpu())
    return torch.cat(out)


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
    model = load_transformer(teacher, device)
    meta = read_meta(teacher)
    console.print(f"computing the teacher's {steps}-step reference for seed {seed} (cached at {path})")
    ref = generate(model, es, inference_levels(steps, meta.shift), 1.0, batch, device)
    store_reference(teacher, es, seed, steps, ref)
    return ref


@functools.lru_cache(maxsize=1)
def pixel_reference() -> PixelReference:
    """The pixel panel of the real test split, shipped as ``workflows/assets/pixel_reference.json`` (so that
    workers and evaluations need no dataset); computed from the dataset when the file is missing.

    Regenerate: ``python -c "from workflows.evaluation import write_pixel_reference; write_pixel_reference()"``.
    """
    if PIXEL_REFERENCE.exists():
        return PixelReference.from_dict(json.loads(PIXEL_REFERENCE.read_text()))
    from workflows.fashion_mnist import load_split

    return PixelReference.from_images(*load_split("test"))


def write_pixel_reference(path: str | Path | None = None) -> Path:
    """Compute the real test split's pixel panel from the dataset and write it (default: the shipped asset)."""
    from workflows.fashion_mnist import load_split

    return write_text_atomic(json.dumps(PixelReference.from_images(*load_split("test")).to_dict()) + "\n",
                             path or PIXEL_REFERENCE)


def judge(ev: Evaluator, images: torch.Tensor, labels: torch.Tensor, suffix: str = "") -> dict:
    """One judge's FD, precision / recall (k = 3) and adherence, keys suffixed (``fd2`` for the second)."""
    feats, logits = ev.features_and_logits(images.clamp(-1, 1))
    prec, rec = precision_recall(ev.pr_features, feats[: ev.pr_features.shape[0]], k=3)
    return {f"fd{suffix}": frechet_distance(feature_stats(feats), ev.reference),
            f"adherence{suffix}": adherence(logits, labels), f"precision{suffix}": prec, f"recall{suffix}": rec}


def score(ev: Evaluator, images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None,
          ev2: Evaluator | None = None) -> dict:
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


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 10) -> Path:
    """Images (B, 1, H, W) in [-1, 1] -> one PNG, ``nrow`` per row."""
    from PIL import Image

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]
    b, h, w = x.shape
    rows = (b + nrow - 1) // nrow
    canvas = torch.zeros((rows * (h + 2), nrow * (w + 2)), dtype=torch.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        canvas[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = x[i]
    img = Image.fromarray(canvas.numpy(), mode="L").resize((canvas.shape[1] * 3, canvas.shape[0] * 3), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return Path(path)


def evaluate_folder(model_dir: str | Path, cfg: EvalConfig, out_dir: str | Path | None = None,
                    teacher: str | Path = DEFAULT_TEACHER, evaluator: str | Path = DEFAULT_EVALUATOR,
                    model: torch.nn.Module | None = None, judge2: str | Path | None = DEFAULT_JUDGE2) -> dict:
    """Evaluate a model folder (or an in-memory ``model`` with that folder's meta) over ``cfg.seeds`` with
    both judges (``judge2=None`` skips the second) and the pixel panel."""
    dev = torch.device(cfg.device)
    meta = read_meta(model_dir)
    shift = cfg.shift if cfg.shift is not None else meta.shift
    levels = inference_levels(cfg.steps, shift)
    net = model if model is not None else load_transformer(model_dir, dev)
    ev = Evaluator.load(evaluator)
    ev2 = Evaluator.load(judge2) if judge2 is not None else None
    per_seed, wall, timed = [], 0.0, 0
    first = None
    for seed in cfg.seeds:
        es = eval_set(cfg.n_samples, seed, (meta.channels, meta.image_size, meta.image_size))
        t0 = time.time()
        is_reference = (model is None and cfg.steps == cfg.reference_steps and cfg.guidance == 1.0
                        and shift == meta.shift and Path(model_dir).resolve() == Path(teacher).resolve())
        cached = _reference_path(teacher, es, seed, cfg.steps) if is_reference else None
        if cached is not None and cached.exists():  # the teacher's own reference run, already on disk
            imgs = torch.load(cached, weights_only=True)
        else:
            imgs = generate(net, es, levels, cfg.guidance, cfg.batch_size, dev)
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


def evaluate_cached(model_dir: str | Path, cfg: EvalConfig, out_dir: str | Path | None = None,
                    teacher: str | Path = DEFAULT_TEACHER, evaluator: str | Path = DEFAULT_EVALUATOR,
                    judge2: str | Path | None = DEFAULT_JUDGE2) -> dict:
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
