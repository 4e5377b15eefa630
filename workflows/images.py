"""Samples -> pixels: uint8 arrays, grids and PNGs (evaluation grids, training sample grids, ``cdm sample``,
serving). Model outputs are in [-1, 1], shape (B, C, H, W)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid(imgs: np.ndarray, ncol: int, gap: int = 2) -> np.ndarray:
    """(B, H, W, C) -> one (rows*H, ncol*W, C) image, row-major, ``gap`` pixels between cells."""
    b, h, w, c = imgs.shape
    rows = (b + ncol - 1) // ncol
    out = np.zeros((rows * (h + gap) - gap, ncol * (w + gap) - gap, c), dtype=np.uint8)
    for i in range(b):
        r, q = divmod(i, ncol)
        out[r * (h + gap) : r * (h + gap) + h, q * (w + gap) : q * (w + gap) + w] = imgs[i]
    return out


def png_bytes(img: np.ndarray, size: int | None = None, scale: int = 1) -> bytes:
    """One (H, W, C) uint8 image -> PNG bytes, nearest-upscaled to width ``size`` (square) or by ``scale``."""
    from PIL import Image

    im = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    if size and size != im.width:
        im = im.resize((size, size), Image.NEAREST)
    elif scale != 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 10) -> Path:
    """Samples (B, C, H, W) in [-1, 1] -> one PNG, ``nrow`` per row, a 1-pixel frame round each, 3x upscaled."""
    framed = np.pad(to_uint8(images), ((0, 0), (1, 1), (1, 1), (0, 0)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(png_bytes(grid(framed, nrow, gap=0), scale=3))
    return Path(path)
