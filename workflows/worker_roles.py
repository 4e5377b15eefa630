"""The three roles of a distillation worker, in either mode:

- full fine-tune: the frozen teacher plus two DeepSpeed engines over copies of it (student, fake teacher), ZeRO-2
  or 3 (``cdm_core.distiller.build_distiller`` with ``workflows.deepspeed_engine``);
- LoRA (``lora.enabled``): two adapters on the one frozen base, whose adapters-disabled forward is the teacher
  (``workflows.lora``), ZeRO-2 engines over the adapters only.

:func:`ema_model` gives the module to sample the EMA student with (the EMA itself, or the shared base with the
EMA adapter swapped in).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from cdm_core.distiller import Distiller


@dataclass
class Roles:
    distiller: Distiller
    lora: object | None  # workflows.lora.Roles in LoRA mode

    @property
    def frozen_base(self) -> bool:
        return self.lora is not None


def build_roles(cfg, teacher, rank: int, world: int, max_across_ranks) -> Roles:
    from cdm_core.distiller import assemble, build_distiller
    from cdm_core.ema import EMA
    from workflows.deepspeed_engine import blend, deepspeed_trainable, ema_update

    o, b, core = cfg.optim.to_core(), cfg.train.batch_size_per_worker, cfg.cdm.to_core()
    precision, gpu = cfg.deepspeed.precision, cfg.scaling.use_gpu
    if cfg.lora.enabled:
        from workflows import lora

        params = lora.add_role_adapters(teacher.module, cfg.lora)
        if cfg.train.gradient_checkpointing:
            teacher.module.enable_gradient_checkpointing()
        roles = lora.Roles(teacher.module, params)
        roles.activate("student")
        make = lora.lora_trainable_factory(o, b, precision, gpu, teacher.family.velocity, roles)
        st = make("student", o.lr_student, cfg.train.student_steps)
        ft = make("fake", o.lr_fake, cfg.train.student_steps * core.update_ratio)
        ema = EMA(lora.AdapterWeights(params["student"]), o.ema_decay)
        teacher_v = roles.velocity(None, teacher.family.velocity)
        return Roles(assemble(core, o, st, ft, teacher_v, ema, rank=rank), roles)
    make = deepspeed_trainable(
        o, b, cfg.deepspeed.zero_stage, precision, gpu, teacher.family.velocity, cfg.train.gradient_checkpointing
    )
    d = build_distiller(
        teacher.module,
        core,
        o,
        cfg.train.student_steps,
        teacher.family.velocity,
        make,
        rank=rank,
        blend=blend,
        ema_update=ema_update,
        sync_depth=max_across_ranks if cfg.deepspeed.zero_stage == 3 and world > 1 else None,
    )
    return Roles(d, None)


@contextlib.contextmanager
def ema_model(roles: Roles):
    """The EMA student as a module for sampling (validation, grids)."""
    if roles.lora is None:
        yield roles.distiller.ema.shadow
        return
    from workflows.lora import ema_swapped

    with ema_swapped(roles.lora, roles.distiller.ema.shadow) as m:
        yield m


@contextlib.contextmanager
def teacher_model(roles: Roles, module):
    """The real teacher as a module (LoRA mode: the base with its adapters disabled inside the block)."""
    if roles.lora is None:
        yield module
        return
    roles.lora.activate(None)
    try:
        yield roles.lora.base
    finally:
        roles.lora.activate("student")


def freeze_to(teacher_module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen weights (the real teacher; in LoRA mode the shared base, never its ``lora_`` adapters, which
    the engines own) to the engines' compute dtype: a bf16 step feeds bf16 inputs to the teacher, and a frozen copy
    needs no fp32 master weights (half the memory of the largest frozen role). Call after :func:`build_roles`,
    which copies the teacher's fp32 weights into the student's and the fake teacher's engines (their fp32 masters
    start from them)."""
    for name, p in teacher_module.named_parameters():
        if "lora_" not in name and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    for name, buf in list(teacher_module.named_buffers()):
        if "lora_" not in name and buf.is_floating_point() and buf.dtype != dtype:
            mod_name, _, attr = name.rpartition(".")
            setattr(teacher_module.get_submodule(mod_name) if mod_name else teacher_module, attr, buf.to(dtype))


def _storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.numel()}


def held_mib(roles: Roles, teacher_module) -> dict[str, float]:
    """What this worker holds, exactly: the unique storages of every role's weights (teacher, student, fake, EMA),
    of the optimizers' state tensors (AdamW moments, found on the innermost torch optimizer) and of the tensors that
    optimizer steps when they are not the modules' own (DeepSpeed's flat fp32 partitions: the master weights under
    bf16, a flat copy under ZeRO in fp32), in MiB."""
    d = roles.distiller
    mods = [teacher_module, d.student.module, d.fake.module, d.ema.shadow]
    weights = _storages(t for m in mods for t in list(m.parameters()) + list(m.buffers()))
    states, masters = {}, {}
    for tr in (d.student, d.fake):
        opt = tr.engine.optimizer
        while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
            opt = opt.optimizer  # DeepSpeed's ZeRO optimizer wraps the torch AdamW
        states.update(_storages(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)))
        masters.update(_storages(p for g in opt.param_groups for p in g["params"]))
    masters = {k: v for k, v in masters.items() if k not in weights}
    return {
        "memory/weights_mib": sum(weights.values()) / 2**20,
        "memory/optimizer_mib": sum(states.values()) / 2**20,
        "memory/master_mib": sum(masters.values()) / 2**20,
    }
