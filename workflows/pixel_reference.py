"""The pixel panel of the real test split (``cdm_core.metrics.PixelReference``), shipped as an asset so that
workers and evaluations need no dataset."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from cdm_core.metrics import PixelReference
from workflows.files import write_text_atomic

PIXEL_REFERENCE = Path(__file__).resolve().parent / "assets" / "pixel_reference.json"


@functools.lru_cache(maxsize=1)
def pixel_reference() -> PixelReference:
    """The pixel panel of the real test split, shipped as ``workflows/assets/pixel_reference.json`` (so that
    workers and evaluations need no dataset); computed from the dataset when the file is missing.

    Regenerate: ``python -c "from workflows.pixel_reference import write_pixel_reference; write_pixel_reference()"``.
    """
    if PIXEL_REFERENCE.exists():
        return PixelReference.from_dict(json.loads(PIXEL_REFERENCE.read_text()))
    from workflows.fashion_mnist import load_split

    return PixelReference.from_images(*load_split("test"))


def write_pixel_reference(path: str | Path | None = None) -> Path:
    """Compute the real test split's pixel panel from the dataset and write it (default: the shipped asset)."""
    from workflows.fashion_mnist import load_split

    return write_text_atomic(
        json.dumps(PixelReference.from_images(*load_split("test")).to_dict()) + "\n", path or PIXEL_REFERENCE
    )
