"""Exponential moving average of weights with warm-up: ``decay_k = min((1 + k) / (10 + k), decay)``."""

from __future__ import annotations

import copy

import torch


def ema_decay(step: int, decay: float) -> float:
    """Warm-up decay of update number ``step`` (0-based)."""
    return min((1.0 + step) / (10.0 + step), decay)


class EMA:
    """Keeps a frozen copy ``shadow`` of a module; ``update(model)`` moves it toward the model."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model) -> float:
        """Move the shadow toward ``model`` (a module, or anything with ``parameters()``)."""
        d = ema_decay(self.num_updates, self.decay)
        shadow, params = list(self.shadow.parameters()), list(model.parameters())
        if len(shadow) != len(params):
            raise ValueError(f"EMA: model has {len(params)} parameters, the shadow {len(shadow)}")
        params = [p.detach().to(s.dtype) for s, p in zip(shadow, params)]
        torch._foreach_lerp_(shadow, params, 1.0 - d)  # one fused update instead of a kernel per tensor
        if isinstance(model, torch.nn.Module):
            for s, b in zip(self.shadow.buffers(), model.buffers()):
                s.copy_(b)
        self.num_updates += 1
        return d

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.shadow.load_state_dict(state["shadow"])
