"""CIFAR wide ResNets (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2): pre-activation blocks in three wide stages.

Written after RepDistiller's models/wrn.py (github.com/HobbitLong/RepDistiller) and mdistiller's
mdistiller/models/cifar/wrn.py (github.com/megvii-research/mdistiller): the same modules, names and
state_dict keys (``block1.layer.0.convShortcut.weight``), so their released teachers load as they are.
Features are hooked by name (``block1``, ``block2``, ``block3``: not yet activated) instead of returned.
"""

from __future__ import annotations

import torch
from torch import nn

from kd.models.cifar.base import MODELS, he_init


class BasicBlock(nn.Module):
    """BN-ReLU-conv3×3 twice; the shortcut is the input, or a 1×1 ``convShortcut`` of its activation."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, padding=1, bias=False)
        self.convShortcut = None
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        return out + (x if self.convShortcut is None else self.convShortcut(activated))


class NetworkBlock(nn.Module):
    """One stage: ``blocks`` basic blocks in ``layer``, the first changing the channels and applying ``stride``."""

    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(BasicBlock(in_planes, out_planes, stride),
                                   *(BasicBlock(out_planes, out_planes, 1) for _ in range(blocks - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen: a 3×3 stem, three stages of ``(depth - 4) / 6`` blocks, BN-ReLU, global pooling, ``fc``.

    The references pool with avg_pool2d(8), global on the 8×8 maps of 32 px images; here it is global at any size.
    """

    def __init__(self, depth: int, widen: int, num_classes: int = 100) -> None:
        super().__init__()
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.block1 = NetworkBlock(blocks, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(blocks, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(blocks, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # a module, so the pooled vector can be hooked
        self.fc = nn.Linear(widths[3], num_classes)
        he_init(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@MODELS.register()
def wrn_16_1(num_classes: int = 100) -> WideResNet:
    """WRN-16-1 (two blocks per stage, widths 16, 32, 64)."""
    return WideResNet(16, 1, num_classes)


@MODELS.register()
def wrn_16_2(num_classes: int = 100) -> WideResNet:
    """WRN-16-2 (two blocks per stage, widths 32, 64, 128): the student of wrn_40_2."""
    return WideResNet(16, 2, num_classes)


@MODELS.register()
def wrn_40_1(num_classes: int = 100) -> WideResNet:
    """WRN-40-1 (six blocks per stage, widths 16, 32, 64): the other student of wrn_40_2."""
    return WideResNet(40, 1, num_classes)


@MODELS.register()
def wrn_40_2(num_classes: int = 100) -> WideResNet:
    """WRN-40-2 (six blocks per stage, widths 32, 64, 128): a released teacher."""
    return WideResNet(40, 2, num_classes)
