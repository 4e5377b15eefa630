"""The second judge's network: a small residual network with batch norm (another family than
:class:`cdm_core.feature_net.FeatureNet`, a plain CNN with group norm and SiLU).

Pre-activation-free ResNet of 32x32 single-channel images: a 3x3 stem, three stages of two basic blocks
(16, 32, 64 channels; the last two stages stride 2), global average pooling. The pooled activations
(``FEATURE_DIM`` = 64) are the feature space of the second Frechet distance and precision/recall; its logits
give a second adherence. Inputs are images in [-1, 1].
"""

from __future__ import annotations

import torch
from torch import nn

FEATURE_DIM = 64


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``, the shortcut a strided 1x1 conv + bn when shapes change."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class JudgeResNet(nn.Module):
    """ResNet: 32x32x1 -> features (B, 64) -> logits (B, num_classes)."""

    def __init__(self, num_classes: int = 10, channels: int = 1, width: int = 16):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.stages = nn.Sequential(
            BasicBlock(w, w, 1),
            BasicBlock(w, w, 1),
            BasicBlock(w, 2 * w, 2),
            BasicBlock(2 * w, 2 * w, 1),  # 16x16
            BasicBlock(2 * w, 4 * w, 2),
            BasicBlock(4 * w, 4 * w, 1),  # 8x8
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, num_classes)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.pool(self.stages(self.stem(x)))
        return f, self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]
