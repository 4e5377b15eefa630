"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, padded 28 -> 32, scaled to [-1, 1]."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

DEFAULT_DIR = Path(os.environ.get("CDM_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetMissing(RuntimeError):
    pass


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00":
        raise ValueError(f"{path} is not an IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(split: str, root: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 32, 32) float32 in [-1, 1] (zero padding maps to -1) and labels (N,) int64."""
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    root = Path(root or DEFAULT_DIR)
    img_name, lbl_name = FILES[split]
    if not (root / img_name).exists():
        raise DatasetMissing(
            f"Fashion-MNIST not found under {root}: install Debian's package "
            "(`apt-get install dataset-fashion-mnist`, done by `make setup`) or set CDM_FASHION_MNIST_DIR"
        )
    images = torch.from_numpy(_read_idx(root / img_name).copy()).float() / 127.5 - 1.0
    labels = torch.from_numpy(_read_idx(root / lbl_name).copy()).long()
    images = torch.nn.functional.pad(images.unsqueeze(1), (2, 2, 2, 2), value=-1.0)
    return images, labels
