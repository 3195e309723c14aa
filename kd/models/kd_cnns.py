"""kd's own small CNNs (bare names, or ``kd:NAME``): students and teachers that train in seconds on a CPU."""

from __future__ import annotations

import torch
from torch import nn

from kd.models.sources import RegistrySource, register_source
from kd.registry import Registry

CNNS: Registry = Registry("model")


class SimpleCNN(nn.Module):
    """Conv-BN-ReLU blocks, each halving the resolution, then global pooling and a linear head."""

    def __init__(self, widths: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        blocks, channels = [], 3
        for width in widths:
            blocks += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@CNNS.register()
def cnn_tiny(num_classes: int) -> nn.Module:
    """Two blocks (8, 16 channels), ~1.6k parameters: a student that trains in seconds on a CPU."""
    return SimpleCNN((8, 16), num_classes)


@CNNS.register()
def cnn_small(num_classes: int) -> nn.Module:
    """Three blocks (16, 32, 64 channels), ~25k parameters."""
    return SimpleCNN((16, 32, 64), num_classes)


@CNNS.register()
def cnn_medium(num_classes: int) -> nn.Module:
    """Four blocks (32, 64, 128, 256 channels), ~390k parameters: a CPU-sized teacher."""
    return SimpleCNN((32, 64, 128, 256), num_classes)


@register_source
class KdModels(RegistrySource):
    """kd's own CNNs (bare names, or kd:NAME)."""

    prefix, bare, registry = "kd", True, CNNS
    about = "kd's small CNNs, trained in seconds on a CPU"


