"""Typed config of a sweep (``cdm sweep``): a base distillation preset plus overrides, a search space,
a searcher, an early-stopping scheduler and a budget. See ``configs/sweep-tiny.yaml``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from workflows.config import ConfigError, Strict, build, deep_merge, parse_overrides, read_mapping, resolve_preset
from workflows.distill_config import DistillConfig

# val_worst_judge (the default): the more sceptical judge's FD relative to the few-step teacher's, plus the pixel
# panel; val_selection_score sums both judges' log FD. The reported test figures are never the selecting ones
METRICS = (
    "val_worst_judge",
    "val_selection_score",
    "val_fd",
    "val_fd2",
    "val_adherence",
    "val_precision",
    "val_recall",
    "val_hf_gap",
)
LOWER_IS_BETTER = ("val_worst_judge", "val_selection_score", "val_fd", "val_fd2", "val_hf_gap")


class ValidationSection(Strict):
    """The metric a sweep optimises is measured on the validation set, never on the test seeds."""

    every: int = Field(10, ge=1, le=1_000_000, description="student steps per validation round")
    n_samples: int = Field(500, ge=10, le=1_000_000)
    seed: int = Field(100, ge=0, description="noise seed of the validation set (test seeds: base eval.seeds)")


class SearcherSection(Strict):
    kind: Literal["grid", "random", "optuna"] = "random"
    seed: int = Field(0, ge=0, description="sampler seed (random, optuna)")


class SchedulerSection(Strict):
    kind: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1, le=100_000, description="validation rounds before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1.0, le=100.0)


class BudgetSection(Strict):
    num_samples: int | None = Field(
        None, ge=1, le=100_000, description="trials (random/optuna; default 8); grid: repeats of the grid (default 1)"
    )
    max_concurrent_trials: int = Field(1, ge=1, le=10_000)
    trial_cpus: float = Field(0.25, gt=0.0, le=512, description="CPUs of a trial's driver (workers: base scaling)")
    max_failures: int = Field(0, ge=0, le=100, description="Tune retries of a failed trial")
    time_budget_s: float = Field(
        0.0,
        ge=0.0,
        description="seconds after which Tune stops the sweep, running "
        "trials included; the best so far is exported (0 = no limit)",
    )


class SweepConfig(Strict):
    name: str = Field("sweep", min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_.-]+$")
    preset: str = Field("tiny", min_length=1, description="base distillation preset name or YAML path")
    base: dict[str, Any] = Field(default_factory=dict, description="overrides of the base preset (nested)")
    metric: Literal[METRICS] = "val_worst_judge"  # type: ignore[valid-type]
    mode: Literal["min", "max"] = "min"
    validation: ValidationSection = ValidationSection()
    space: dict[str, Any] = Field(default_factory=dict)
    searcher: SearcherSection = SearcherSection()
    scheduler: SchedulerSection = SchedulerSection()
    budget: BudgetSection = BudgetSection()

    @model_validator(mode="after")
    def _mode(self):
        best_low = self.metric in LOWER_IS_BETTER
        if (self.mode == "min") != best_low:
            raise ValueError(
                f"mode {self.mode!r} optimises {self.metric} the wrong way (use {'min' if best_low else 'max'})"
            )
        return self


def load_sweep(config: str | Path, overrides: list[str] | None = None) -> tuple[SweepConfig, DistillConfig]:
    """Sweep YAML (preset name like ``sweep-tiny`` or a path) + ``a.b=c`` overrides -> (sweep, base config).

    The base config is the preset with ``base`` applied, the validation settings copied into its
    ``eval`` section, and its storage and tracking paths made absolute (trials run in other directories).
    """
    path = resolve_preset(config)
    data = read_mapping(path)
    sweep = build(SweepConfig, deep_merge(data, parse_overrides(overrides)))
    preset = sweep.preset
    if preset.endswith((".yaml", ".yml")) and not Path(preset).is_absolute():
        rel = path.parent / preset
        preset = str(rel) if rel.exists() else preset
    try:
        cfg = build(DistillConfig, deep_merge(read_mapping(resolve_preset(preset)), sweep.base))
    except ConfigError as e:
        raise ConfigError(f"base: {e}") from None
    if sweep.validation.seed in cfg.eval.seeds:
        raise ConfigError(
            f"validation.seed: {sweep.validation.seed} is one of the test seeds {cfg.eval.seeds} "
            "(base eval.seeds): the sweep must not optimise on the test set"
        )
    if cfg.train.student_steps < sweep.validation.every:
        raise ConfigError(
            f"validation.every: {sweep.validation.every} is more than the base's "
            f"train.student_steps ({cfg.train.student_steps}): no trial would report"
        )
    if sweep.scheduler.kind == "asha":
        rounds = cfg.train.student_steps // sweep.validation.every
        if sweep.scheduler.grace_period > rounds:
            raise ConfigError(
                f"scheduler.grace_period: {sweep.scheduler.grace_period} rounds is more than the "
                f"{rounds} validation rounds of a trial"
            )
    from workflows.lineage import tracking_uri

    data = cfg.model_dump(mode="json")
    data["storage_path"] = str(Path(cfg.storage_path).expanduser().resolve())
    data["mlflow"]["tracking_uri"] = tracking_uri(cfg.mlflow.tracking_uri)
    for k in ("teacher", "prompts"):
        if data[k] != "builtin":
            data[k] = str(Path(data[k]).expanduser().resolve())
    data["eval"].update(
        val_every=sweep.validation.every,
        val_n_samples=sweep.validation.n_samples,
        val_seed=sweep.validation.seed,
        keep_best=False,
    )  # the sweep picks the trial and its step itself, from the reports
    data["train"]["checkpoint_every"] = sweep.validation.every  # a checkpoint per round: resumable, exportable
    return sweep, build(DistillConfig, data)


def sweep_key(sweep: SweepConfig, base: DistillConfig) -> str:
    """Deterministic id of a sweep: the same command finds the same Tune experiment and MLflow parent run."""
    blob = {
        "sweep": {k: v for k, v in sweep.model_dump(mode="json").items() if k != "base"},
        "base": base.model_dump(mode="json"),
    }
    return f"{sweep.name}-{hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:10]}"
