"""Typed configuration: pydantic models loaded from YAML presets plus ``--set a.b=c`` overrides.

Invalid values fail at load time with :class:`ConfigError`, whose message names the field and the
allowed range, e.g. ``model.patch_size: Input should be greater than or equal to 1 (got 0)``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
ASSET_DIR = Path(__file__).resolve().parent / "assets"
DEFAULT_TEACHER = ASSET_DIR / "teacher-tiny"
DEFAULT_EVALUATOR = ASSET_DIR / "evaluator"  # the first judge (cnn)
DEFAULT_JUDGE2 = ASSET_DIR / "judge2"  # the second, independent judge (resnet)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModelConfig(Strict):
    """Shape of the built-in SD3-class teacher (see ``cdm_core.models.sd3.tiny_sd3_config``)."""

    sample_size: int = Field(32, ge=8, le=256)
    channels: int = Field(1, ge=1, le=16)
    patch_size: int = Field(4, ge=1, le=16)
    num_layers: int = Field(4, ge=1, le=48)
    num_heads: int = Field(4, ge=1, le=64)
    head_dim: int = Field(16, ge=4, le=256)


class TeacherTrainConfig(Strict):
    """``cdm teacher train``: rectified flow on Fashion-MNIST with prompt dropout for CFG."""

    model: TinyModelConfig = TinyModelConfig()
    steps: int = Field(20000, ge=1, le=10_000_000)
    max_minutes: float = Field(
        0.0, ge=0.0, description="wall-time budget (0 = none); the lr decay is paced to end within it"
    )
    batch_size: int = Field(128, ge=1, le=65536)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    warmup_steps: int = Field(500, ge=0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    grad_clip: float = Field(1.0, gt=0.0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    cfg_dropout: float = Field(0.1, ge=0.0, le=1.0)
    time_sampling: Literal["uniform", "logit_normal"] = "uniform"
    shift: float = Field(3.0, gt=0.0, le=100.0, description="inference time shift stored with the model")
    seed: int = Field(0, ge=0)
    device: str = "cpu"
    checkpoint_every: int = Field(1000, ge=1)
    log_every: int = Field(100, ge=1)
    data_dir: str | None = None
    init_from: str | None = Field(None, description="start from this teacher folder's weights (fine-tuning)")


class EvalConfig(Strict):
    """``cdm eval``: a model folder sampled with a sampler spec, scored by the evaluator."""

    steps: int = Field(4, ge=1, le=1000)
    guidance: float = Field(1.0, ge=0.0, le=30.0)
    shift: float | None = Field(None, gt=0.0, le=100.0, description="None = the model's own scheduler shift")
    n_samples: int = Field(5000, ge=10, le=1_000_000)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    batch_size: int = Field(500, ge=1, le=100_000)
    reference_steps: int = Field(100, ge=0, le=1000, description="teacher steps for mse_to_teacher100 (0 = skip)")
    device: str = "cpu"


M = TypeVar("M", bound=BaseModel)


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{key}: {p} is not a section")
        d = nxt
    d[parts[-1]] = value


def parse_overrides(items: list[str] | None) -> dict:
    """``["a.b=3", "c=x"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"--set {item!r}: empty key")
        _set_dotted(out, key.strip(), yaml.safe_load(raw))
    return out


def deep_merge(base: dict, over: dict) -> dict:
    """``base`` updated by ``over``, nested mappings merged key by key (neither input is changed)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def set_values(data: dict, params: dict[str, Any]) -> dict:
    """``data`` (a dumped config) with the dotted-path ``params`` set, e.g. ``{"cdm.alpha": 2.0}`` (a sweep's
    trial, the recipe a sweep found); neither input is changed."""
    for path, v in params.items():
        over: dict = {}
        _set_dotted(over, path, v)
        data = deep_merge(data, over)
    return data


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        got = e.get("input")
        suffix = "" if e["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{loc}: {msg}{suffix}")
    return "; ".join(lines)


def build(model: type[M], data: dict) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def resolve_preset(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    cand = PRESET_DIR / f"{name_or_path}.yaml"
    if cand.exists():
        return cand
    known = sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"config: unknown preset or file {str(name_or_path)!r} (presets: {', '.join(known)})")


def read_mapping(path: Path) -> dict:
    """A YAML file holding a mapping (empty file = {}); anything else is a ConfigError naming the file."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping at the top level")
    return data


def load_config(model: type[M], preset: str | Path | None, overrides: list[str] | None = None) -> M:
    """Preset YAML (or none: defaults) + overrides -> validated config."""
    data = read_mapping(resolve_preset(preset)) if preset else {}
    return build(model, deep_merge(data, parse_overrides(overrides)))


def config_hash(cfg: BaseModel, exclude: set[str] | dict | None = None) -> str:
    blob = json.dumps(cfg.model_dump(mode="json", exclude=exclude), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (MLflow params cannot be nested)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
