"""The dtype a model computes in: the adapters feed it inputs in that dtype and answer in the caller's, so a bf16
frozen teacher serves an fp32 sampler (validation, evaluation) and a bf16 training step alike."""

from __future__ import annotations

import torch


def weight_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point weight; float32 for a weightless module."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
