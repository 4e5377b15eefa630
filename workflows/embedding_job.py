"""The prompt-embedding job: prompts -> token states + pooled vectors, on Ray Data actors that hold the text
encoders, once per (teacher, prompts), cached on the job's storage as a sharded store that training workers read
part by part (``workflows.prompt_store``); no worker holds a text encoder.

The driver streams the prompt file once (``workflows.prompt_files.scan``: validation, count, the start of every
chunk) and hands Ray Data one small item per chunk; each actor reads its chunk from the file, encodes it and writes
``part-NNNNN.pt`` itself. Store layout, ``<storage>/embeddings/emb-<teacher hash>-<prompts hash>-<rows>-<dtype>/``:

- ``part-00000.pt`` ...: ``tokens`` (n, L, D), ``pooled`` (n, P), ``prompts`` (n strings), ``ROWS_PER_PART`` each
  (the last one fewer), in the training's compute dtype (bf16 halves the T5 states of a pipeline folder);
- ``empty.pt``: the empty prompt's embedding (the unconditional branch of CFG);
- ``index.json``: the parts in order with their rows and bytes, the total, the source; written last, and the
  folder is renamed into place whole, so a store either exists complete or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from workflows.files import save_atomic
from workflows.progress import console

ROWS_PER_PART = 256
INDEX = "index.json"


def encoder_for(teacher: Path | None, device: str = "cpu"):
    """The teacher's prompt encoder: a pipeline folder's own text encoders, else the built-in MiniLM."""
    from workflows.pipeline_folders import PipelineTextEncoder, is_pipeline_folder

    if teacher is not None and is_pipeline_folder(teacher):
        return PipelineTextEncoder(teacher, device)
    from workflows.text_encoder import TextEncoder

    return TextEncoder(device=device)


class _PartEncoder:
    """Ray Data actor: chunk numbers -> parts written to the store (loads the encoders once)."""

    def __init__(self, scan_state: dict, teacher: str | None, folder: str, dtype: str):
        from workflows.prompt_files import Scan

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.enc = encoder_for(Path(teacher) if teacher else None, device)
        self.scan = Scan(**scan_state)
        self.folder = Path(folder)
        self.dtype = getattr(torch, dtype)

    def __call__(self, batch):
        from workflows.prompt_files import read_chunk

        out = {"part": [], "rows": [], "bytes": []}
        for k in batch["part"]:
            k = int(k)
            prompts = [""] if k < 0 else read_chunk(self.scan, k)
            c = self.enc.encode(prompts)
            name = "empty.pt" if k < 0 else f"part-{k:05d}.pt"
            blob = {"tokens": c.tokens.to(self.dtype), "pooled": c.pooled.to(self.dtype), "prompts": prompts}
            save_atomic(blob, self.folder / name)
            out["part"].append(k)
            out["rows"].append(len(prompts))
            out["bytes"].append((self.folder / name).stat().st_size)
        return out


def store_dir(storage: Path, teacher_hash: str, key: str) -> Path:
    return storage / "embeddings" / f"emb-{teacher_hash}-{key}"


def prompt_embeddings(
    prompts,
    teacher_hash: str,
    storage: Path,
    teacher: Path | None = None,
    rows_per_part: int = ROWS_PER_PART,
    actors: int = 1,
    use_gpu: bool = False,
    dtype: str = "float32",
) -> Path:
    """The store of the prompts' embeddings (``prompts``: a prompt file or ``builtin``, or its ``Scan`` when the
    caller has already validated it with ``chunk == rows_per_part``), computed once per
    (teacher, prompts) with Ray Data (``teacher``: the teacher folder, whose own text encoders a pipeline folder
    uses; None = the built-in one). ``actors`` encoder actors, one GPU each with ``use_gpu``; stored in ``dtype``
    (the training's compute dtype: bf16 halves a T5 store)."""
    from workflows.prompt_files import Scan, scan

    if isinstance(prompts, Scan) and prompts.chunk == rows_per_part:
        s = prompts
    else:
        s = scan(prompts.spec if isinstance(prompts, Scan) else prompts, rows_per_part)
    final = store_dir(storage, teacher_hash, f"{s.sha256[:16]}-{rows_per_part}-{dtype}")
    if (final / INDEX).exists():
        return final
    import ray.data

    t0 = time.time()
    parts = -(-s.n // rows_per_part)
    console.print(
        f"\\[cdm] embedding {s.n} prompts ({parts} parts of {rows_per_part}"
        + (f"; {s.skipped_blank} blank skipped" if s.skipped_blank else "")
        + f") with {actors} encoder actor(s) into {final}"
    )
    tmp = final.with_name(final.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: getattr(s, k) for k in ("spec", "fmt", "field", "chunk", "n", "skipped_blank", "starts", "sha256")}
    items = [{"part": k} for k in range(parts)] + [{"part": -1}]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), max(1, 4 * actors))).map_batches(
        _PartEncoder,
        fn_constructor_args=(state, str(teacher) if teacher else None, str(tmp), dtype),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=0 if use_gpu else 1,
        num_gpus=1 if use_gpu else 0,
    )
    done = {int(r["part"]): (int(r["rows"]), int(r["bytes"])) for r in ds.take_all()}
    missing = sorted(set(range(-1, parts)) - set(done))
    if missing or sum(done[k][0] for k in range(parts)) != s.n:
        raise RuntimeError(f"embedding job: parts {missing} missing or rows short in {tmp} (rerun to recompute)")
    index = {
        "prompts": s.spec,
        "prompts_sha256": s.sha256,
        "teacher_hash": teacher_hash,
        "total": s.n,
        "rows_per_part": rows_per_part,
        "dtype": dtype,
        "parts": [{"file": f"part-{k:05d}.pt", "rows": done[k][0], "bytes": done[k][1]} for k in range(parts)],
        "bytes": sum(b for _, b in done.values()),
    }
    (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    try:
        tmp.rename(final)
    except OSError:  # another job finished the same store first: theirs is complete, drop ours
        if not (final / INDEX).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    console.print(f"\\[cdm] embeddings: {s.n} prompts, {index['bytes'] / 2**20:.1f} MiB in {time.time() - t0:.0f} s")
    return final
