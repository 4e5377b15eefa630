"""Typed config of a distillation job (``cdm distill``), one source of truth for the CLI, ``ray job
submit``, the sweep's base config and the KubeRay RayJob. See ``configs/tiny.yaml``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cdm_core.step import CDMConfig
from workflows.config import Strict


class CDMSection(Strict):
    """The algorithm (CDM_SPEC.md); every ablation is a field."""

    schedule: Literal["dynamic", "fixed"] = "dynamic"
    n_max: int = Field(28, ge=1, le=1000)
    s_min: float = Field(0.25, gt=0.0, lt=1.0)
    s_max: float = Field(0.95, gt=0.0, lt=1.0)
    shift: float = Field(3.0, gt=0.0, le=100.0)
    fixed_steps: int = Field(4, ge=1, le=64)
    use_ca: bool = True
    use_dm: bool = True
    use_cdm: bool = True
    w_ca: float = Field(1.0, ge=0.0, le=100.0)
    w_dm: float = Field(1.0, ge=0.0, le=100.0)
    w_cdm: float = Field(1.0, ge=0.0, le=100.0)
    alpha: float = Field(7.0, ge=0.0, le=100.0, description="CFG-augmentation scale")
    off_trajectory: Literal["velocity", "gaussian"] = "velocity"
    target: Literal["local", "final"] = "local"
    gaussian_base: Literal["final", "anchor"] = Field("final", description="what off_trajectory=gaussian "
                                                      "re-noises: the rollout's final sample or the anchor's x0_hat")
    fake_mix: float = Field(0.0, ge=0.0, le=1.0, description="share of the fake teacher's batch taken from "
                                                             "off-trajectory estimates (0 = authors' code)")
    tau_min: float = Field(0.02, gt=0.0, lt=1.0)
    tau_max: float = Field(0.98, gt=0.0, lt=1.0)
    norm_floor: float = Field(0.1, gt=0.0, le=10.0, description="floor of the DM/CA normaliser, in the data's "
                                                                "units (0.1 for SD3 latents)")
    update_ratio: int = Field(2, ge=1, le=100)
    fake_blend: float | None = Field(0.999, ge=0.0, le=1.0)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _ranges(self):
        if self.tau_min >= self.tau_max:
            raise ValueError(f"tau_min ({self.tau_min}) must be below tau_max ({self.tau_max})")
        if self.s_min >= self.s_max:
            raise ValueError(f"s_min ({self.s_min}) must be below s_max ({self.s_max})")
        if not (self.use_ca or self.use_dm or self.use_cdm):
            raise ValueError("at least one of use_ca, use_dm, use_cdm must be true")
        return self

    def to_core(self) -> CDMConfig:
        return CDMConfig(**self.model_dump())


class OptimSection(Strict):
    lr_student: float = Field(1e-5, gt=0.0, le=1.0)
    fake_lr_ratio: float = Field(0.5, gt=0.0, le=100.0, description="lr_fake = lr_student * fake_lr_ratio")
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.999, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    warmup_steps: int = Field(100, ge=0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    lr_decay: Literal["none", "cosine"] = Field("none", description="after warm-up: constant, or cosine to "
                                                                    "min_lr_ratio at the last student step")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)


class TrainSection(Strict):
    student_steps: int = Field(1000, ge=1, le=10_000_000)
    batch_size_per_worker: int = Field(16, ge=1, le=65536)
    checkpoint_every: int = Field(50, ge=1, description="student steps between checkpoints")
    num_to_keep: int = Field(2, ge=1, le=1000)
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(100, ge=1, description="student steps between sample-grid artifacts")
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
    keep_best: bool = Field(False, description="export the EMA student with the best validation score instead "
                                               "of the last one (needs val_every)")
    select_by: Literal["selection_score", "fd", "fd2"] = Field(
        "selection_score", description="validation metric keep_best minimises: selection_score combines both "
                                       "judges and the pixel panel (cdm_core.metrics.selection_score)")

    @model_validator(mode="after")
    def _val_not_test(self):
        if self.keep_best and not self.val_every:
            raise ValueError("keep_best needs validation: set eval.val_every > 0")
        if self.val_every and self.val_seed in self.seeds:
            raise ValueError(f"val_seed ({self.val_seed}) is one of the test seeds {self.seeds}: "
                             "validation must not use the test set")
        return self


class DistillConfig(Strict):
    name: str = Field("tiny", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    teacher: str = Field("builtin", description="'builtin' or a local diffusers folder")
    prompts: str = Field("builtin", description="'builtin' or a text file, one prompt per line")
    storage_path: str = Field("runs", description="checkpoint storage (local dir or shared storage)")
    cdm: CDMSection = CDMSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    scaling: ScalingSection = ScalingSection()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    mlflow: MLflowSection = MLflowSection()
    eval: EvalSection = EvalSection()
