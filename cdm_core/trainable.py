"""How a loss is applied to a trainable network: the small protocol the CDM step drives.

A :class:`Trainable` exposes its velocity (with gradient), its parameters (for the EMA and the
fake->student blend) and ``apply(loss)`` (backward, non-finite guard, clip, optimizer step). Plain
modules with torch optimizers use :class:`TorchTrainable`; the workflows layer wraps DeepSpeed engines
and LoRA adapters in the same protocol, so the maths is the same object everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from cdm_core.conditioning import Cond


@dataclass(frozen=True)
class ApplyResult:
    grad_norm: float
    skipped: bool  # True when the gradient was non-finite and the step was not taken


@runtime_checkable
class Trainable(Protocol):
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor: ...

    def parameters(self) -> Iterable[torch.nn.Parameter]: ...

    def apply(self, loss: torch.Tensor) -> ApplyResult: ...


class TorchTrainable:
    """A module + torch optimizer (+ optional LR scheduler) behind the :class:`Trainable` protocol.

    ``velocity_of`` turns the module into ``v(x_t, t, cond)`` (a family adapter's ``velocity``).
    ``apply``: the non-finite guard (:func:`guard_loss`), backward, clip to ``max_grad_norm``, step, zero grads.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        velocity_of: Callable[[torch.nn.Module], Callable],
        max_grad_norm: float = 1.0,
        lr_scheduler=None,
    ):
        self.module = module
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.max_grad_norm = max_grad_norm
        self._v = velocity_of(module)

    def velocity(self, x_t, t, cond):
        return self._v(x_t, t, cond)

    def parameters(self):
        return self.module.parameters()

    def apply(self, loss: torch.Tensor) -> ApplyResult:
        loss, skipped = guard_loss(loss, self.module.parameters())
        loss.backward()
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm) if params else torch.tensor(0.0)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return ApplyResult(float(norm), skipped)

    def state_dict(self) -> dict:
        out = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.lr_scheduler is not None:
            out["lr_scheduler"] = self.lr_scheduler.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])


def guard_loss(
    loss: torch.Tensor,
    params: Iterable[torch.nn.Parameter],
    all_ranks_min: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, bool]:
    """The non-finite guard, with one meaning in every trainable.

    When the loss is NaN/inf (on any rank: ``all_ranks_min`` reduces the 0/1 flag across ranks), every rank
    backpropagates ``sum(0 * p)`` over its parameters instead: finite zero gradients through the same
    parameters, so all ranks run the same gradient collectives and nothing is learnt from the bad batch. The
    optimizer and LR schedule still step (Adam's moments decay, the step count stays aligned across ranks);
    the result says ``skipped``. Returns (loss to backpropagate, skipped).
    """
    ok = torch.isfinite(loss.detach()).float().reshape(1)
    if all_ranks_min is not None:
        ok = all_ranks_min(ok)
    if bool(ok.item() >= 1):
        return loss, False
    zero = sum((p * 0.0).sum() for p in params if p.requires_grad)
    return (zero if isinstance(zero, torch.Tensor) else loss.detach() * 0.0), True


@torch.no_grad()
def blend_parameters(target: Iterable[torch.nn.Parameter], source: Iterable[torch.nn.Parameter], decay: float) -> None:
    """``target <- decay * target + (1 - decay) * source`` (the fake -> student blend)."""
    for p_t, p_s in zip(target, source):
        p_t.lerp_(p_s.detach().to(p_t.dtype), 1.0 - decay)
