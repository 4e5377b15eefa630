"""LoRA mode (``lora.enabled``): the student and the fake teacher are two peft LoRA adapters (``student``, ``fake``)
on ONE frozen base, whose adapters-disabled forward is the real teacher. One copy of the weights serves the three
roles (DMD's three-model memory cost becomes one model plus two small adapters).

- Roles are switched per call: the student's velocity activates ``student``, the fake's ``fake``, the teacher's
  disables both. peft's ``set_adapter`` / ``disable_adapters`` also flip ``requires_grad`` of the inactive
  adapter; every switch here restores ``requires_grad`` on both adapters, so a graph built under one role
  still sends its gradient to that role's parameters when ``backward`` runs later.
- Each role is a DeepSpeed engine (ZeRO-2) over the shared module whose optimizer holds only that role's
  adapter parameters; checkpoints leave the frozen base out (``exclude_frozen_parameters``).
- The EMA holds the student adapter only (:class:`AdapterWeights`); validation and grids swap it into the
  student adapter for the duration (:func:`ema_swapped`).
- Export: the EMA adapter merged into a fresh copy of the teacher (a full transformer for the pipeline folder),
  and the adapter alone (``save_lora_adapter``; for SD3 also the pipeline's ``save_lora_weights`` format).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

ROLES = ("student", "fake")


def lora_config(section):
    from peft import LoraConfig

    return LoraConfig(
        r=section.rank,
        lora_alpha=section.alpha,
        target_modules=list(section.target_modules),
        init_lora_weights=True,  # B = 0: both adapters start as the teacher, like the full-mode copies
    )


def add_role_adapters(base: torch.nn.Module, section) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Inject the two adapters into ``base`` (frozen); returns each role's (name, parameter) list, in order."""
    base.requires_grad_(False)
    for role in ROLES:
        base.add_adapter(lora_config(section), adapter_name=role)
    out = {r: [(n, p) for n, p in base.named_parameters() if f".{r}." in n and "lora_" in n] for r in ROLES}
    for r in ROLES:
        if not out[r]:
            raise ValueError(f"lora.target_modules {section.target_modules} matched no layer of {type(base).__name__}")
    return out


class Roles:
    """Which adapter the shared base runs (``None``: the teacher, adapters disabled)."""

    def __init__(self, base: torch.nn.Module, params: dict[str, list[tuple[str, torch.nn.Parameter]]]):
        self.base = base
        self.params = params

    def activate(self, role: str | None) -> None:
        if role is None:
            self.base.disable_adapters()
        else:
            self.base.enable_adapters()
            self.base.set_adapter(role)
        for plist in self.params.values():
            for _, p in plist:
                p.requires_grad_(True)

    def velocity(self, role: str | None, velocity_of, module=None):
        """``v(x_t, t, cond)`` of a role over ``module`` (an engine around the base, or the base itself)."""
        inner = velocity_of(module if module is not None else self.base)

        def v(x_t, t, cond):
            self.activate(role)
            try:
                return inner(x_t, t, cond)
            finally:
                if role is None:
                    self.activate("student")  # never leave the shared base with its adapters disabled

        return v


class AdapterWeights(torch.nn.Module):
    """A module holding copies of one adapter's parameters (what the EMA keeps and the export reads)."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]]):
        super().__init__()
        self.names = [n for n, _ in named]
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(p.detach().clone()) for _, p in named])

    def named_weights(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.weights))


@contextlib.contextmanager
def ema_swapped(roles: Roles, ema_module: AdapterWeights):
    """Inside the block the base's student adapter holds the EMA weights and is active (then restored)."""
    live = roles.params["student"]
    saved = [p.detach().clone() for _, p in live]
    with torch.no_grad():
        for (_, p), w in zip(live, ema_module.weights):
            p.copy_(w.to(p.dtype))
    roles.activate("student")
    try:
        yield roles.base
    finally:
        with torch.no_grad():
            for (_, p), s in zip(live, saved):
                p.copy_(s)


def lora_trainable_factory(optim, batch_per_worker: int, precision: str, use_gpu: bool, velocity_of, roles: Roles):
    """``make(role, lr, total_steps)``: a ZeRO-2 DeepSpeed engine over the shared base, optimising one adapter."""
    import deepspeed

    from cdm_core.optim import adamw_for
    from workflows.deepspeed_engine import DeepSpeedTrainable, ds_config

    class AdapterTrainable(DeepSpeedTrainable):
        def __init__(self, engine, role):
            super().__init__(engine, 2, lambda m: roles.velocity(role, velocity_of, m))
            self.role = role

        def parameters(self):
            return [p for _, p in roles.params[self.role]]

    def make(role: str, lr: float, total_steps: int) -> AdapterTrainable:
        params = [p for _, p in roles.params[role]]
        opt, sched = adamw_for(torch.nn.ParameterList(params), optim, lr, total_steps)  # same tensors, no copy
        eng, *_ = deepspeed.initialize(
            model=roles.base,
            model_parameters=params,
            optimizer=opt,
            lr_scheduler=sched,
            config=ds_config(batch_per_worker, 2, precision, optim.max_grad_norm, use_gpu),
        )
        return AdapterTrainable(eng, role)

    return make


def ema_adapter_weights(teacher_module: torch.nn.Module, section, shadow_state: dict) -> dict[str, torch.Tensor]:
    """The EMA's ``AdapterWeights`` state (``weights.i``) by the student adapter's parameter names, recovered by
    injecting the adapters into a copy of the teacher exactly as the workers did."""
    import copy

    names = [n for n, _ in add_role_adapters(copy.deepcopy(teacher_module), section)["student"]]
    if len(names) != len(shadow_state):
        raise ValueError(f"lora: the checkpoint's EMA holds {len(shadow_state)} tensors, the adapter {len(names)}")
    return {n: shadow_state[f"weights.{i}"] for i, n in enumerate(names)}


def _teacher_with_adapter(teacher_module: torch.nn.Module, section, weights: dict[str, torch.Tensor]):
    """A fresh copy of the teacher carrying the adapter ``student`` with ``weights`` (the EMA)."""
    import copy

    m = copy.deepcopy(teacher_module)
    m.add_adapter(lora_config(section), adapter_name="student")
    own = dict(m.named_parameters())
    with torch.no_grad():
        for n, w in weights.items():
            own[n].copy_(w.to(own[n].dtype))
    return m


def merged_student(teacher_module: torch.nn.Module, section, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The teacher with the adapter ``weights`` (EMA) merged in: a plain transformer."""
    m = _teacher_with_adapter(teacher_module, section, weights)
    m.fuse_lora(adapter_names=["student"])
    m.unload_lora()
    return m


def save_adapter(teacher_module: torch.nn.Module, section, weights: dict[str, torch.Tensor], out: Path) -> Path:
    """The EMA adapter alone, as diffusers' ``save_lora_adapter`` writes it (``load_lora_adapter`` reads it)."""
    m = _teacher_with_adapter(teacher_module, section, weights)
    out.mkdir(parents=True, exist_ok=True)
    m.save_lora_adapter(str(out), adapter_name="student")
    return out
