"""Model adapters: turn a family's network into a velocity callable ``v(x_t, t, cond)``."""

from cdm_core.models.sd3 import SD3Velocity, tiny_sd3_config

__all__ = ["SD3Velocity", "tiny_sd3_config"]
