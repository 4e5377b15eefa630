"""Model families: one small adapter per family, exposing what the maths needs.

An adapter has ``name``, ``velocity(module) -> v(x_t, t, cond)`` and ``sample_shape(config, image_size) -> (C, H,
W)`` (unpacked latents or pixels; packing, if the model wants it, happens inside the velocity).
The one loader that opens a model folder and picks the family is ``workflows.model_folder``; no other
module names a model class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from cdm_core.models.longcat import LongCatFamily, LongCatVelocity
from cdm_core.models.sd3 import SD3Family, SD3Velocity, tiny_sd3_config


class Family(Protocol):
    name: str

    def velocity(self, model: torch.nn.Module) -> Callable: ...

    def sample_shape(self, config: dict, image_size: int | None = None) -> tuple[int, int, int]: ...


__all__ = ["Family", "LongCatFamily", "LongCatVelocity", "SD3Family", "SD3Velocity", "tiny_sd3_config"]
