"""The evaluator's feature network: a small CNN classifier of 32x32 single-channel images.

Trained by the project on the training split (no Inception/CLIP weights can be had offline); its
penultimate activations (``FEATURE_DIM``) are the feature space of the Frechet distance and of
precision/recall, and its logits measure prompt adherence. Inputs are images in [-1, 1].
"""

from __future__ import annotations

import torch
from torch import nn

FEATURE_DIM = 128


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
    )


class FeatureNet(nn.Module):
    """CNN: 32x32x1 -> features (B, 128) -> logits (B, num_classes)."""

    def __init__(self, num_classes: int = 10, channels: int = 1, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            _block(channels, width, 1),
            _block(width, width, 1),
            _block(width, 2 * width, 2),  # 16x16
            _block(2 * width, 2 * width, 1),
            _block(2 * width, 4 * width, 2),  # 8x8
            _block(4 * width, 4 * width, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.proj = nn.Sequential(nn.Linear(4 * width, FEATURE_DIM), nn.SiLU())
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.proj(self.body(x))
        return f, self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]
