"""A distillation job's checkpoints: their layout, discovery, validation, and what goes in and out of one.

    <storage>/<job key>/step_00000050/
        meta.json          {iteration, student_steps, samples_seen, world_size, zero_stage, config_hash, resumes}
        student/ckpt/...   DeepSpeed shards of the student (every rank)
        fake/ckpt/...      DeepSpeed shards of the fake teacher (every rank)
        ema.pt             the student EMA (rank 0)
        best.json          eval.keep_best: the best validation so far {student_steps, metric, value, val_*}
        best_ema.pt        ... and its EMA

Ray Train names the folders (``checkpoint_dir_name``) and keeps ``train.num_to_keep`` of them. The driver
checks the newest one before it starts workers; the export reads ``ema.pt`` or ``best_ema.pt`` of one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ENGINE_TAG = "ckpt"  # DeepSpeed's tag folder inside student/ and fake/
PARTS = ("student", "fake")
META, EMA, BEST_META, BEST_EMA = "meta.json", "ema.pt", "best.json", "best_ema.pt"


def dir_name(student_steps: int) -> str:
    return f"step_{student_steps:08d}"


def all_checkpoints(job_dir: Path) -> list[Path]:
    """The job's checkpoint folders, oldest first."""
    return sorted(p for p in Path(job_dir).glob("step_*") if p.is_dir())


def latest(job_dir: Path) -> Path | None:
    cands = all_checkpoints(job_dir)
    return cands[-1] if cands else None


def read_meta(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / META).read_text())


def check(ckpt: Path) -> None:
    """Fail (RuntimeError naming the folder) when a checkpoint is unusable; before any worker starts."""
    try:
        m = read_meta(ckpt)
        int(m["student_steps"]), int(m["iteration"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RuntimeError(
            f"checkpoint {ckpt} is corrupt: meta.json unreadable ({type(e).__name__}: {e}); "
            f"delete {ckpt} to resume from the one before"
        ) from None
    for part in PARTS:
        states = list((Path(ckpt) / part / ENGINE_TAG).glob("*model_states.pt"))
        if not states:
            raise RuntimeError(
                f"checkpoint {ckpt} is corrupt: no {part} model states; delete it to resume from the one before"
            )
        for f in states:
            try:
                torch.load(f, map_location="cpu", weights_only=False)
            except Exception as e:
                raise RuntimeError(
                    f"checkpoint {ckpt} is corrupt: {f.name} does not load ({type(e).__name__}); "
                    "delete it to resume from the one before"
                ) from None
    if not (Path(ckpt) / EMA).exists():
        raise RuntimeError(f"checkpoint {ckpt} is corrupt: {EMA} is missing")


def complete_at(job_dir: Path, student_steps: int) -> Path | None:
    """The checkpoint of ``student_steps`` if it is complete, else the newest complete one (None: none is)."""
    cands = list(reversed(all_checkpoints(job_dir)))
    exact = [p for p in cands if p.name == dir_name(student_steps)]
    for ck in exact + [p for p in cands if p not in exact]:
        try:
            check(ck)
            return ck
        except RuntimeError:
            continue
    return None


def best(ckpt: Path) -> dict | None:
    """``best.json`` of a checkpoint (eval.keep_best), or None."""
    p = Path(ckpt) / BEST_META
    return json.loads(p.read_text()) if p.exists() else None


def load_ema_state(ckpt: Path, which: str = EMA) -> dict:
    return torch.load(Path(ckpt) / which, map_location="cpu", weights_only=False)


def save(
    d: Path,
    rank: int,
    student_engine,
    fake_engine,
    ema_state: dict | None,
    meta: dict | None,
    best_meta: dict | None = None,
    best_ema_state: dict | None = None,
    frozen_base: bool = False,
) -> None:
    """Write one rank's part of a checkpoint into folder ``d`` (rank 0 also the EMA, meta and best).
    ``frozen_base`` (LoRA mode): the engines leave the frozen base out; it is the teacher folder."""
    d = Path(d)
    student_engine.save_checkpoint(str(d / "student"), tag=ENGINE_TAG, exclude_frozen_parameters=frozen_base)
    fake_engine.save_checkpoint(str(d / "fake"), tag=ENGINE_TAG, exclude_frozen_parameters=frozen_base)
    if rank == 0:
        torch.save(ema_state, d / EMA)
        if best_meta is not None:
            torch.save(best_ema_state, d / BEST_EMA)
            (d / BEST_META).write_text(json.dumps(best_meta))
        (d / META).write_text(json.dumps(meta))


def load(
    d: Path, rank: int, student_engine, fake_engine, frozen_base: bool = False
) -> tuple[dict, dict, dict | None, dict | None]:
    """Load a checkpoint folder into the engines; returns (meta, ema state, best meta, best EMA state)."""
    d = Path(d)
    try:
        meta = read_meta(d)
        student_engine.load_checkpoint(str(d / "student"), tag=ENGINE_TAG, load_module_strict=not frozen_base)
        fake_engine.load_checkpoint(str(d / "fake"), tag=ENGINE_TAG, load_module_strict=not frozen_base)
        ema_state = load_ema_state(d)
        best_meta = best(d) if rank == 0 else None
        best_ema_state = load_ema_state(d, BEST_EMA) if best_meta is not None else None
    except Exception as e:
        raise RuntimeError(f"checkpoint {d} is corrupt or incompatible: {type(e).__name__}: {e}") from None
    return meta, ema_state, best_meta, best_ema_state
