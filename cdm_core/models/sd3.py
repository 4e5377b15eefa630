"""Adapter for diffusers' ``SD3Transformer2DModel`` (SD3-Medium and the built-in tiny teacher).

The model is called as diffusers' SD3 pipeline calls it: ``timestep = 1000 t``, text token states as
``encoder_hidden_states`` and the pooled text vector as ``pooled_projections``; it returns a velocity.
Only the class is imported lazily so that ``cdm_core`` stays importable without diffusers.
"""

from __future__ import annotations

import torch

from cdm_core.conditioning import Cond
from cdm_core.flow import TIMESTEP_SCALE
from cdm_core.models.dtypes import weight_dtype


class SD3Velocity:
    """``v(x_t, t, cond)`` for an SD3-family transformer (or a DeepSpeed engine wrapping one)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        dt = weight_dtype(self.model)  # a bf16 teacher sampled from fp32 noise computes in bf16, answers in fp32
        t = torch.as_tensor(t, device=x_t.device, dtype=dt)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        out = self.model(
            hidden_states=x_t.to(dt),
            timestep=t * TIMESTEP_SCALE,
            encoder_hidden_states=cond.tokens.to(dt),
            pooled_projections=cond.pooled.to(dt),
            return_dict=False,
        )[0]
        return out.to(x_t.dtype)


class SD3Family:
    """What the maths needs from an SD3-class model: its velocity callable and the shape it samples in.

    ``config`` is the transformer's config (a dict, as diffusers writes ``transformer/config.json``).
    Conditioning is :class:`~cdm_core.conditioning.Cond` (token states + pooled vector), batched along dim 0.
    """

    name = "sd3"

    @staticmethod
    def velocity(model: torch.nn.Module) -> SD3Velocity:
        return SD3Velocity(model)

    @staticmethod
    def sample_shape(config: dict, image_size: int | None = None) -> tuple[int, int, int]:
        """(C, H, W) of one sample: pixels for the built-in teacher, latents for SD3-Medium."""
        return (int(config["in_channels"]), int(config["sample_size"]), int(config["sample_size"]))


def tiny_sd3_config(
    sample_size: int = 32,
    channels: int = 1,
    patch_size: int = 4,
    num_layers: int = 4,
    num_heads: int = 4,
    head_dim: int = 32,
    text_dim: int = 384,
    pooled_dim: int = 384,
) -> dict:
    """Config of a small ``SD3Transformer2DModel`` (``caption_projection_dim`` = heads x head_dim)."""
    return dict(
        sample_size=sample_size,
        patch_size=patch_size,
        in_channels=channels,
        out_channels=channels,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=text_dim,
        caption_projection_dim=num_heads * head_dim,
        pooled_projection_dim=pooled_dim,
        pos_embed_max_size=sample_size // patch_size,
    )
