"""Search space: YAML over any ``DistillConfig`` field by dotted path -> a validated Ray Tune param space.

    space:
      cdm.n_max: [4, 8, 16]                      # a list: tune.choice (tune.grid_search under `grid`)
      cdm.alpha: {uniform: [0.0, 1.0]}
      optim.lr_student: {loguniform: [1.0e-5, 3.0e-4]}
      optim.fake_lr_ratio: {choice: [0.5, 1.0]}
      cdm.update_ratio: {randint: [1, 4]}        # both ends included
      cdm.schedule: {grid: [dynamic, fixed]}     # always a grid axis (random searcher only)

Keys may also be nested (``cdm: {alpha: {uniform: [0, 1]}}``), so ``--set space.cdm.alpha=[0,0.5]`` works.
Everything is checked before any trial starts: the field exists and may be swept, the range is not
empty, and every extreme value passes ``DistillConfig``'s own validation (its allowed ranges).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from workflows.config import ConfigError, build, set_values
from workflows.distill_config import DistillConfig

KINDS = ("values", "choice", "grid", "uniform", "loguniform", "randint")
LIST_KINDS = ("values", "choice", "grid")
# fields a sweep owns or that would break trial identity/lineage if they varied per trial
NOT_SWEEPABLE = (
    "name",
    "storage_path",
    "teacher",
    "prompts",
    "mlflow",
    "eval",
    "train.student_steps",
    "train.checkpoint_every",
    "scaling",
)


@dataclass(frozen=True)
class Param:
    path: str
    kind: str  # one of KINDS ("values" = a plain list)
    args: tuple

    @property
    def is_list(self) -> bool:
        return self.kind in LIST_KINDS

    def extremes(self) -> list:
        return list(self.args) if self.is_list else [self.args[0], self.args[1]]

    def describe(self) -> str:
        if self.is_list:
            return f"{'grid' if self.kind == 'grid' else 'choice'} {list(self.args)}"
        lo, hi = self.args
        return f"{self.kind} [{lo}, {hi}]" + (" (inclusive)" if self.kind == "randint" else "")

    def tune_domain(self, grid: bool):
        from ray import tune

        if self.is_list:
            return tune.grid_search(list(self.args)) if grid or self.kind == "grid" else tune.choice(list(self.args))
        lo, hi = self.args
        if self.kind == "uniform":
            return tune.uniform(lo, hi)
        if self.kind == "loguniform":
            return tune.loguniform(lo, hi)
        return tune.randint(lo, hi + 1)  # Tune's upper bound is exclusive


def _leaf_paths(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    out = {}
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out[prefix + name] = None  # a section
            out.update(_leaf_paths(ann, f"{prefix}{name}."))
        else:
            out[prefix + name] = f
    return out


FIELDS = _leaf_paths(DistillConfig)


def _is_spec(v: Any) -> bool:
    return isinstance(v, list) or (isinstance(v, dict) and len(v) == 1 and next(iter(v)) in KINDS)


def _flatten_space(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not _is_spec(v) and FIELDS.get(key) is None:  # a section (or unknown)
            if not v:
                raise ConfigError(f"search space: {key}: empty entry (give a list or one of {', '.join(KINDS)})")
            out.update(_flatten_space(v, key + "."))
        else:
            out[key] = v
    return out


def _number(path: str, v: Any, integer: bool = False) -> float | int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise ConfigError(f"search space: {path}: bound {v!r} is not {'an integer' if integer else 'a number'}")
    if isinstance(v, float) and not math.isfinite(v):
        raise ConfigError(f"search space: {path}: bound {v!r} is not finite")
    return v


def _parse_param(path: str, spec: Any) -> Param:
    if path not in FIELDS:
        raise ConfigError(f"search space: {path}: unknown field (not a field of the distillation config)")
    if FIELDS[path] is None:
        raise ConfigError(f"search space: {path}: is a config section, not a field")
    if any(path == b or path.startswith(b + ".") for b in NOT_SWEEPABLE):
        raise ConfigError(
            f"search space: {path}: cannot be swept (the sweep config owns it; not sweepable: "
            f"{', '.join(NOT_SWEEPABLE)})"
        )
    if isinstance(spec, list):
        kind, args = "values", spec
    elif isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in KINDS:
        kind, args = next(iter(spec.items()))
    else:
        raise ConfigError(
            f"search space: {path}: expected a list of values or a mapping with one of "
            f"{', '.join(KINDS)} (got {spec!r})"
        )
    if kind in LIST_KINDS:
        if not isinstance(args, list) or not args:
            raise ConfigError(f"search space: {path}: {kind} needs a non-empty list of values (got {args!r})")
        if len({repr(a) for a in args}) != len(args):
            raise ConfigError(f"search space: {path}: {kind} lists a value twice ({args!r})")
        return Param(path, kind, tuple(args))
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"search space: {path}: {kind} needs [low, high] (got {args!r})")
    lo, hi = (_number(path, a, integer=kind == "randint") for a in args)
    if lo > hi or (lo == hi and kind != "randint"):
        raise ConfigError(f"search space: {path}: empty range [{lo}, {hi}] (low must be below high)")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"search space: {path}: loguniform needs low > 0 (got {lo})")
    return Param(path, kind, (lo, hi))


def apply(base: DistillConfig | dict, params: dict[str, Any]) -> DistillConfig:
    """The trial's config: ``base`` with the dotted-path ``params`` set (validated)."""
    data = base.model_dump(mode="json") if isinstance(base, BaseModel) else dict(base)
    return build(DistillConfig, set_values(data, params))


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]

    @property
    def paths(self) -> list[str]:
        return [p.path for p in self.params]

    def to_tune(self, grid: bool) -> dict:
        return {p.path: p.tune_domain(grid) for p in self.params}

    def grid(self) -> list[dict]:
        """Every combination of the list axes (grid searcher), in Tune's expansion order (last key fastest)."""
        axes = [p for p in self.params if p.is_list]
        return [dict(zip([p.path for p in axes], combo)) for combo in itertools.product(*[p.args for p in axes])]

    def grid_axes(self) -> list[Param]:
        return [p for p in self.params if p.kind == "grid"]


def parse_space(raw: Any, base: DistillConfig, searcher: str) -> Space:
    """YAML mapping -> :class:`Space`, raising :class:`ConfigError` naming the field for any problem."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("search space: space: give at least one field to sweep (a mapping of field: spec)")
    params = tuple(_parse_param(path, spec) for path, spec in _flatten_space(raw).items())
    for p in params:
        for v in p.extremes():  # the config's own ranges and types, one field at a time, others at base
            try:
                apply(base, {p.path: v})
            except ConfigError as e:
                raise ConfigError(f"search space: {p.path}: value {v!r} is not allowed ({e})") from None
    if searcher == "grid":
        bad = [p.path for p in params if not p.is_list]
        if bad:
            raise ConfigError(
                f"search space: {bad[0]}: the grid searcher needs a list of values "
                f"(use searcher.kind random or optuna for ranges)"
            )
    if searcher == "optuna":
        bad = [p.path for p in params if p.kind == "grid"]
        if bad:
            raise ConfigError(f"search space: {bad[0]}: optuna cannot take grid axes (use a list or choice)")
    return Space(params)
