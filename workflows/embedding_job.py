"""The prompt-embedding job: prompts -> token states + pooled vectors, on Ray Data actors that hold the text
encoder, once per (teacher, prompt list), cached on the job's storage. Training workers only read the file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from workflows.files import save_atomic


def encoder_for(teacher: Path | None):
    """The teacher's prompt encoder: a pipeline folder's own text encoders, else the built-in MiniLM."""
    from workflows.pipeline_folders import PipelineTextEncoder, is_pipeline_folder

    if teacher is not None and is_pipeline_folder(teacher):
        return PipelineTextEncoder(teacher)
    from workflows.text_encoder import TextEncoder

    return TextEncoder()


class _PromptEncoder:
    """Ray Data actor: prompt batch -> token states + pooled vectors (loads the encoder once)."""

    def __init__(self, teacher: str | None = None):
        self.enc = encoder_for(Path(teacher) if teacher else None)

    def __call__(self, batch):
        import numpy as np

        c = self.enc.encode([str(p) for p in batch["prompt"]])
        return {
            "idx": batch["idx"],
            "tokens": c.tokens.numpy().astype(np.float32),
            "pooled": c.pooled.numpy().astype(np.float32),
        }


def prompt_embeddings(prompts: list[str], teacher_hash: str, storage: Path, teacher: Path | None = None) -> Path:
    """Embeddings of the prompts and of the empty prompt, computed once per (teacher, prompts) with Ray Data
    (``teacher``: the teacher folder, whose own text encoders a pipeline folder uses; None = the built-in one)."""
    h = hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:16]
    path = storage / "embeddings" / f"emb-{teacher_hash}-{h}.pt"
    if path.exists():
        return path
    import numpy as np
    import ray.data

    items = [{"idx": i, "prompt": p} for i, p in enumerate(prompts + [""])]
    batch = 256  # one block per encoder batch: a block per handful of prompts only adds actor calls
    ds = ray.data.from_items(items, override_num_blocks=-(-len(items) // batch)).map_batches(
        _PromptEncoder,
        fn_constructor_args=(str(teacher) if teacher else None,),
        batch_size=batch,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
    )
    rows = sorted(ds.take_all(), key=lambda r: int(r["idx"]))
    tokens = torch.from_numpy(np.stack([r["tokens"] for r in rows]))
    pooled = torch.from_numpy(np.stack([r["pooled"] for r in rows]))
    save_atomic(
        {
            "tokens": tokens[:-1],
            "pooled": pooled[:-1],
            "empty_tokens": tokens[-1:],
            "empty_pooled": pooled[-1:],
            "prompts": prompts,
        },
        path,
    )
    return path
