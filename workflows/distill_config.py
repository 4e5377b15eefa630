"""Typed config of a distillation job (``cdm distill``), one source of truth for the CLI, ``ray job
submit``, the sweep's base config and the KubeRay RayJob. See ``configs/tiny.yaml``."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

from pydantic import Field, create_model, model_validator

from cdm_core.knobs import BOUNDS
from cdm_core.optim import OptimConfig
from cdm_core.step import CDMConfig
from workflows.config import Strict


def section_of(core: type, name: str, doc: str) -> type[Strict]:
    """A strict pydantic section generated from a cdm_core config dataclass: the same fields, types,
    defaults, bounds and descriptions (``cdm_core.knobs.knob``); after the per-field checks the dataclass
    itself validates the whole (cross-field rules such as ``s_min < s_max``), so YAML, ``--set`` and the
    sweep accept exactly what the maths does. ``to_core()`` returns the dataclass."""
    hints = typing.get_type_hints(core)
    fields = {}
    for f in dataclasses.fields(core):
        bounds = {k: v for k, v in f.metadata.items() if k in BOUNDS}
        fields[f.name] = (hints[f.name], Field(f.default, **bounds))

    def _whole(self):
        self.to_core()  # ValueError -> a validation error on the section
        return self

    def to_core(self):
        return core(**self.model_dump())

    cls = create_model(
        name,
        __base__=Strict,
        __doc__=doc,
        __module__=__name__,
        __validators__={"_whole": model_validator(mode="after")(_whole)},
        **fields,
    )
    cls.to_core = to_core
    return cls


CDMSection = section_of(
    CDMConfig, "CDMSection", "The algorithm (CDM_SPEC.md, ``cdm_core.step.CDMConfig``); every ablation is a field."
)
OptimSection = section_of(OptimConfig, "OptimSection", "The optimiser (``cdm_core.optim.OptimConfig``).")


class TrainSection(Strict):
    student_steps: int = Field(1000, ge=1, le=10_000_000)
    batch_size_per_worker: int = Field(16, ge=1, le=65536)
    checkpoint_every: int = Field(50, ge=1, description="student steps between checkpoints")
    num_to_keep: int = Field(2, ge=1, le=1000)
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(100, ge=1, description="student steps between sample-grid artifacts")
    gradient_checkpointing: bool = Field(
        False, description="recompute the student's and fake teacher's activations in backward (large backbones)"
    )
    max_failures: int = Field(1, ge=0, le=1000)


class ScalingSection(Strict):
    num_workers: int = Field(2, ge=1, le=4096)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0, le=512)
    gpus_per_worker: float = Field(1.0, ge=0.0, le=16)
    resources_per_worker: dict[str, float] = Field(default_factory=dict)


class DeepSpeedSection(Strict):
    zero_stage: Literal[2, 3] = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"


class MLflowSection(Strict):
    experiment: str = Field("cdm-distill", min_length=1)
    registered_model: str = Field("cdm-student", min_length=1)
    tracking_uri: str | None = None


class EvalSection(Strict):
    n_samples: int = Field(1000, ge=10, le=1_000_000)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    reference_steps: int = Field(0, ge=0, le=1000, description="0 = skip mse_to_teacher100 (costly on CPU)")
    # validation during training (what a sweep optimises): a different noise seed from the test seeds above
    val_every: int = Field(0, ge=0, description="student steps between validation evaluations (0 = off)")
    val_n_samples: int = Field(500, ge=10, le=1_000_000)
    val_seed: int = Field(100, ge=0, description="validation noise seed; must not be one of the test seeds")
    keep_best: bool = Field(
        False,
        description="export the EMA student with the best validation score instead of the last one (needs val_every)",
    )
    select_by: Literal["worst_judge", "selection_score", "fd", "fd2"] = Field(
        "worst_judge",
        description="validation metric keep_best minimises: worst_judge is the more sceptical judge's FD "
        "relative to the few-step teacher's, plus the pixel panel (cdm_core.metrics.worst_judge_score); "
        "selection_score sums both judges' log FD (one judge's gain can hide the other's loss)",
    )

    @model_validator(mode="after")
    def _val_not_test(self):
        if self.keep_best and not self.val_every:
            raise ValueError("keep_best needs validation: set eval.val_every > 0")
        if self.val_every and self.val_seed in self.seeds:
            raise ValueError(
                f"val_seed ({self.val_seed}) is one of the test seeds {self.seeds}: "
                "validation must not use the test set"
            )
        return self


class LoraSection(Strict):
    """LoRA mode (``workflows.lora``): the student and the fake teacher as two LoRA adapters on one frozen base
    whose adapters-disabled forward is the real teacher: one copy of the weights for the three roles."""

    enabled: bool = False
    rank: int = Field(16, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0.0, le=4096.0, description="LoRA scale = alpha / rank")
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        min_length=1,
        description="module names (peft's target_modules) that get adapters",
    )


GATE_METRICS = Literal["fd", "fd2", "mse_to_teacher100", "intensity_w1", "class_mean_gap"]
PANEL_BAND_METRICS = Literal["near_white", "near_black", "edge_energy"]


class GateSection(Strict):
    """The quality gate of ``cdm pipeline``: a student is aliased ``alias`` only when every lower-is-better
    metric beats ``factor`` x the teacher's own few-step Euler (same steps, same test set) and every panel
    statistic lies within its band of the real split's value. Not part of the job key: changing the gate
    re-judges a finished job instead of retraining it."""

    lower: list[GATE_METRICS] = Field(
        default_factory=lambda: ["fd", "fd2"],
        min_length=1,
        description="metrics the student must have lower than factor x the few-step teacher's",
    )
    factor: float = Field(1.0, gt=0.0, le=10.0, description="student < factor x teacher passes")
    bands: dict[PANEL_BAND_METRICS, tuple[float, float]] = Field(
        default_factory=lambda: {"near_white": (0.5, 2.0), "edge_energy": (0.8, 1.25)},
        description="(low, high) x the real test split's value",
    )
    alias: str = Field("champion", min_length=1, pattern=r"^[A-Za-z0-9_-]+$", description="alias set on pass")

    @model_validator(mode="after")
    def _bands_ordered(self):
        for k, (lo, hi) in self.bands.items():
            if not 0 <= lo <= hi:
                raise ValueError(f"bands.{k}: need 0 <= low <= high, got ({lo}, {hi})")
        return self


class DistillConfig(Strict):
    name: str = Field("tiny", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    teacher: str = Field("builtin", description="'builtin' or a local diffusers folder (a model or a whole pipeline)")
    teacher_class: Literal["StableDiffusion3Pipeline", "LongCatImagePipeline"] | None = Field(
        None, description="the pipeline class the teacher folder must be (a preset's check; not part of the job key)"
    )
    prompts: str = Field(
        "builtin",
        description="'builtin' or a prompt file: .txt (one per line), .jsonl or .parquet (a prompt / text / caption "
        "field), streamed",
    )
    storage_path: str = Field("runs", description="checkpoint storage (local dir or shared storage)")
    cdm: CDMSection = CDMSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    scaling: ScalingSection = ScalingSection()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    mlflow: MLflowSection = MLflowSection()
    eval: EvalSection = EvalSection()
    gate: GateSection = GateSection()
    lora: LoraSection = LoraSection()

    @model_validator(mode="after")
    def _lora_zero2(self):
        if self.lora.enabled and self.deepspeed.zero_stage != 2:
            raise ValueError("lora.enabled: LoRA mode runs on ZeRO-2 (small adapters); set deepspeed.zero_stage=2")
        return self
