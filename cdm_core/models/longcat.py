"""Adapter for diffusers' ``LongCatImageTransformer2DModel`` (LongCat-Image).

The maths works on unpacked latents ``(B, C, h, w)`` like every family; the transformer takes FLUX-style
packed latents ``(B, (h/2)(w/2), 4C)`` (feature index ``c*4 + dy*2 + dx``) with 3-axis position ids: text rows
``[0, i, i]`` and image rows ``[1, L + r, L + c]`` where L is the number of text tokens (the pipeline's
``tokenizer_max_length``). Its ``timestep`` is sigma in [0, 1] (the model scales it by 1000 itself) and it
predicts ``v = noise - x0`` as SD3 does. No pooled vector: ``Cond.pooled`` is carried but unused.
Packing and ids are written here in torch (they equal the pipeline's ``_pack_latents`` / ``prepare_pos_ids``;
``tests/test_backbones.py`` checks it against the pipeline).
"""

from __future__ import annotations

import torch

from cdm_core.conditioning import Cond
from cdm_core.models.dtypes import weight_dtype


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, (h/2)(w/2), 4C)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, (h/2)(w/2), 4C) -> (B, C, h, w), the inverse of :func:`pack`."""
    b, _, f = x.shape
    c = f // 4
    x = x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def text_ids(n: int) -> torch.Tensor:
    ids = torch.zeros(n, 3)
    ids[:, 1] = ids[:, 2] = torch.arange(n, dtype=torch.float32)
    return ids


def image_ids(h2: int, w2: int, start: int) -> torch.Tensor:
    ids = torch.zeros(h2, w2, 3)
    ids[..., 0] = 1
    ids[..., 1] = torch.arange(h2, dtype=torch.float32)[:, None] + start
    ids[..., 2] = torch.arange(w2, dtype=torch.float32)[None, :] + start
    return ids.reshape(h2 * w2, 3)


class LongCatVelocity:
    """``v(x_t, t, cond)`` on unpacked latents for a LongCat-Image transformer (or an engine wrapping one)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        b, _, h, w = x_t.shape
        dt = weight_dtype(self.model)  # inputs in the weights' dtype, the answer in the input's
        t = torch.as_tensor(t, device=x_t.device, dtype=dt)
        if t.ndim == 0:
            t = t.expand(b)
        n_txt = cond.tokens.shape[1]
        out = self.model(
            hidden_states=pack(x_t.to(dt)),
            timestep=t,
            encoder_hidden_states=cond.tokens.to(dt),
            txt_ids=text_ids(n_txt).to(x_t.device),
            img_ids=image_ids(h // 2, w // 2, n_txt).to(x_t.device),
            return_dict=False,
        )[0]
        return unpack(out, h, w).to(x_t.dtype)


class LongCatFamily:
    """LongCat-Image: velocity on unpacked latents; the latent shape comes from the image size (the transformer
    config has none): ``(in_channels / 4, 2 (H // 16), 2 (W // 16))`` for a square ``image_size``."""

    name = "longcat"

    @staticmethod
    def velocity(model: torch.nn.Module) -> LongCatVelocity:
        return LongCatVelocity(model)

    @staticmethod
    def sample_shape(config: dict, image_size: int | None = None) -> tuple[int, int, int]:
        if not image_size:
            raise ValueError("longcat: the latent shape needs the image size (the model folder's image_size)")
        side = 2 * (int(image_size) // 16)
        return (int(config["in_channels"]) // 4, side, side)
