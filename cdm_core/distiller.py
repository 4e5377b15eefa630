"""One builder of the three roles, shared by the single-process reference loop and the Ray Train workers.

    real    = the frozen teacher
    student = copy of the teacher, trained (AdamW + warm-up over ``student_steps``)
    fake    = copy of the teacher, trained at ``lr_student * fake_lr_ratio`` over ``student_steps * update_ratio``
    ema     = EMA of the student

``trainable(module, lr, total_steps)`` wraps a module with its optimizer behind the
:class:`~cdm_core.trainable.Trainable` protocol: plain torch here, a DeepSpeed engine in ``workflows``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cdm_core.ema import EMA
from cdm_core.optim import OptimConfig, adamw_for
from cdm_core.step import CDMConfig, CDMStep
from cdm_core.trainable import TorchTrainable, Trainable

MakeTrainable = Callable[[torch.nn.Module, float, int], Trainable]


@dataclass
class Distiller:
    step: CDMStep
    student: Trainable
    fake: Trainable
    ema: EMA
    cdm: CDMConfig
    optim: OptimConfig


def torch_trainable(optim: OptimConfig, velocity_of: Callable) -> MakeTrainable:
    """Plain torch: AdamW with the config's warm-up/decay, :class:`TorchTrainable` with its gradient clip."""

    def make(module: torch.nn.Module, lr: float, total_steps: int) -> Trainable:
        opt, sched = adamw_for(module, optim, lr, total_steps)
        return TorchTrainable(module, opt, velocity_of, optim.max_grad_norm, sched)

    return make


def build_distiller(
    teacher: torch.nn.Module,
    cdm: CDMConfig,
    optim: OptimConfig,
    student_steps: int,
    velocity_of: Callable,
    trainable: MakeTrainable | None = None,
    **step_kwargs,
) -> Distiller:
    """Student and fake teacher start as copies of ``teacher``, which is frozen; ``step_kwargs`` go to
    :class:`CDMStep` (rank, blend, ema_update, sync_depth: the hooks of partitioned parameters)."""
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    fake = copy.deepcopy(teacher).train().requires_grad_(True)
    teacher.eval().requires_grad_(False)
    ema = EMA(student, optim.ema_decay)
    make = trainable or torch_trainable(optim, velocity_of)
    st = make(student, optim.lr_student, student_steps)
    ft = make(fake, optim.lr_fake, student_steps * cdm.update_ratio)
    return assemble(cdm, optim, st, ft, velocity_of(teacher), ema, **step_kwargs)


def assemble(
    cdm: CDMConfig, optim: OptimConfig, student: Trainable, fake: Trainable, teacher_velocity, ema: EMA, **step_kwargs
) -> Distiller:
    """The distiller of roles built elsewhere (LoRA mode: two adapters and the adapters-disabled base of one
    module, ``workflows.lora``)."""
    step = CDMStep(cdm, student, fake, teacher_velocity, ema, **step_kwargs)
    return Distiller(step, student, fake, ema, cdm, optim)
