"""Writes that readers never see half done, also when several processes write the same file at once."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch


def _write_atomic(write, path: str | Path) -> Path:
    """``write(tmp)`` to a temporary name unique to this call, then rename over ``path`` (last writer wins)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_atomic(obj, path: str | Path) -> Path:
    """``torch.save`` of ``obj`` to ``path``, never seen half written."""
    return _write_atomic(lambda tmp: torch.save(obj, tmp), path)


def write_text_atomic(text: str, path: str | Path) -> Path:
    """``text`` written to ``path``, never seen half written."""
    return _write_atomic(lambda tmp: tmp.write_text(text), path)
