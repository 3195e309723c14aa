"""CIFAR ResNets (resnet8 … resnet110, resnet8x4, resnet32x4): three stages of basic blocks on 32 px images.

Written after RepDistiller's models/resnet.py (github.com/HobbitLong/RepDistiller) and mdistiller's
mdistiller/models/cifar/resnet.py (github.com/megvii-research/mdistiller), which share it: the same
modules, names and state_dict keys, so their released teachers load as they are. Features are hooked by
name (``layer1``, ``layer2``, ``layer3``) instead of returned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.models.cifar.base import MODELS, he_init


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """A 3×3 convolution without bias that keeps the size (or halves it with ``stride`` 2)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN pairs and a shortcut (a 1×1 conv-BN ``downsample`` where the shape changes), then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.preact = nn.Identity()  # hook ``layerN.K.preact`` for the block's output before its last ReLU
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return F.relu(self.preact(out + (x if self.downsample is None else self.downsample(x))))


class ResNet(nn.Module):
    """A 3×3 stem, three stages of ``(depth - 2) / 6`` basic blocks (the last two halve the size), pooling, ``fc``.

    ``widths`` are the stem's and the three stages' channels. The references pool with AvgPool2d(8), which
    is global average pooling on the 8×8 maps of 32 px images; ``avgpool`` here is global at any size.
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(widths[0], widths[1], blocks, 1)
        self.layer2 = self._stage(widths[1], widths[2], blocks, 2)
        self.layer3 = self._stage(widths[2], widths[3], blocks, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        he_init(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        """``blocks`` basic blocks, the first taking ``in_planes`` channels with ``stride``."""
        return nn.Sequential(BasicBlock(in_planes, planes, stride),
                             *(BasicBlock(planes, planes) for _ in range(blocks - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


NARROW = (16, 16, 32, 64)  # resnet8 … resnet110
WIDE = (32, 64, 128, 256)  # the x4 networks: four times the channels of the stages


@MODELS.register()
def resnet8(num_classes: int = 100) -> ResNet:
    """ResNet-8 (one block per stage), ~0.08M parameters: the smallest student of the tables."""
    return ResNet(8, NARROW, num_classes)


@MODELS.register()
def resnet14(num_classes: int = 100) -> ResNet:
    """ResNet-14 (two blocks per stage)."""
    return ResNet(14, NARROW, num_classes)


@MODELS.register()
def resnet20(num_classes: int = 100) -> ResNet:
    """ResNet-20 (three blocks per stage): the student of resnet56 and resnet110."""
    return ResNet(20, NARROW, num_classes)


@MODELS.register()
def resnet32(num_classes: int = 100) -> ResNet:
    """ResNet-32 (five blocks per stage): the student of resnet110."""
    return ResNet(32, NARROW, num_classes)


@MODELS.register()
def resnet44(num_classes: int = 100) -> ResNet:
    """ResNet-44 (seven blocks per stage)."""
    return ResNet(44, NARROW, num_classes)


@MODELS.register()
def resnet56(num_classes: int = 100) -> ResNet:
    """ResNet-56 (nine blocks per stage): a released teacher."""
    return ResNet(56, NARROW, num_classes)


@MODELS.register()
def resnet110(num_classes: int = 100) -> ResNet:
    """ResNet-110 (eighteen blocks per stage): a released teacher."""
    return ResNet(110, NARROW, num_classes)


@MODELS.register()
def resnet8x4(num_classes: int = 100) -> ResNet:
    """ResNet-8 with four times the channels: the student of resnet32x4."""
    return ResNet(8, WIDE, num_classes)


@MODELS.register()
def resnet32x4(num_classes: int = 100) -> ResNet:
    """ResNet-32 with four times the channels, ~7.4M parameters: the strongest released teacher."""
    return ResNet(32, WIDE, num_classes)
