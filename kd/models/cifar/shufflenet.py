"""The CIFAR ShuffleNets of the distillation tables: ShuffleV1 (groups 3) and ShuffleV2 (1× width).

Written after RepDistiller's models/ShuffleNetv1.py and models/ShuffleNetv2.py (github.com/HobbitLong/
RepDistiller) and mdistiller's mdistiller/models/cifar/ShuffleNetv1.py and ShuffleNetv2.py
(github.com/megvii-research/mdistiller): the same modules, names and state_dict keys
(``layer1.0.conv1.weight``, ``linear.weight``), so their trained networks load as they are. Both keep
32 px images at full size through a 1×1 stem; the stages ``layer1``, ``layer2``, ``layer3`` (16, 8, 4 px)
are the features to hook. Like the references, they keep PyTorch's default initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.models.cifar.base import MODELS


class ShuffleBlock(nn.Module):
    """Channel shuffle: interleave the channels of ``groups`` groups, so the next grouped convolution mixes them."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def stem() -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """The ``conv1`` (1×1, 3 → 24 channels) and ``bn1`` both ShuffleNets start with."""
    return nn.Conv2d(3, 24, kernel_size=1, bias=False), nn.BatchNorm2d(24)


def dwconv3x3(channels: int, stride: int = 1) -> nn.Conv2d:
    """A depthwise 3×3 convolution without bias."""
    return nn.Conv2d(channels, channels, kernel_size=3, stride=stride, padding=1, groups=channels, bias=False)


def conv1x1(in_channels: int, out_channels: int, groups: int = 1) -> nn.Conv2d:
    """A (grouped) 1×1 convolution without bias."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, groups=groups, bias=False)


class Bottleneck(nn.Module):
    """ShuffleNet v1 unit: grouped 1×1, shuffle, depthwise 3×3, grouped 1×1, plus the input, then ReLU.

    With ``stride`` 2 the input's 3×3 average pooling (``shortcut``) is concatenated rather than added.
    The network's first unit (24 input channels) has an ungrouped first convolution.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        mid_planes = out_planes // 4
        first_groups = 1 if in_planes == 24 else groups
        self.stride = stride
        self.conv1 = conv1x1(in_planes, mid_planes, first_groups)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ShuffleBlock(first_groups)
        self.conv2 = dwconv3x3(mid_planes, stride)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = conv1x1(mid_planes, out_planes, groups)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        shortcut = self.shortcut(x)
        return F.relu(torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut)


class ShuffleNet(nn.Module):
    """ShuffleNet v1: a 1×1 stem, three stages of units (each first one halves the size), pooling, ``linear``.

    The references pool with avg_pool2d(4), global on the 4×4 maps of 32 px images; here it is global at any size.
    """

    def __init__(self, out_planes: tuple[int, int, int], blocks: tuple[int, int, int], groups: int,
                 num_classes: int = 100) -> None:
        super().__init__()
        self.conv1, self.bn1 = stem()
        in_planes = 24
        stages = []
        for planes, count in zip(out_planes, blocks):
            stages.append(nn.Sequential(Bottleneck(in_planes, planes - in_planes, 2, groups),
                                        *(Bottleneck(planes, planes, 1, groups) for _ in range(count - 1))))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # a module, so the pooled vector can be hooked
        self.linear = nn.Linear(out_planes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.linear(torch.flatten(self.avgpool(x), 1))


class SplitBlock(nn.Module):
    """Split the channels in two at ``ratio``."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = int(x.size(1) * self.ratio)
        return x[:, :c], x[:, c:]


class BasicBlock(nn.Module):
    """ShuffleNet v2 unit: split the channels; 1×1, depthwise 3×3, 1×1 on the second half; concatenate, shuffle."""

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split = SplitBlock(split_ratio)
        channels = int(in_channels * split_ratio)
        self.conv1 = conv1x1(channels, channels)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = dwconv3x3(channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = conv1x1(channels, channels)
        self.bn3 = nn.BatchNorm2d(channels)
        self.shuffle = ShuffleBlock(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, changed = self.split(x)
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(changed)))))
        return self.shuffle(torch.cat([kept, F.relu(self.bn3(self.conv3(out)))], 1))


class DownBlock(nn.Module):
    """ShuffleNet v2 unit that halves the size: depthwise-then-1×1 beside 1×1-depthwise-1×1; concatenate, shuffle."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid_channels = out_channels // 2
        self.conv1 = dwconv3x3(in_channels, 2)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = conv1x1(in_channels, mid_channels)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = conv1x1(in_channels, mid_channels)
        self.bn3 = nn.BatchNorm2d(mid_channels)
        self.conv4 = dwconv3x3(mid_channels, 2)
        self.bn4 = nn.BatchNorm2d(mid_channels)
        self.conv5 = conv1x1(mid_channels, mid_channels)
        self.bn5 = nn.BatchNorm2d(mid_channels)
        self.shuffle = ShuffleBlock(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        return self.shuffle(torch.cat([left, F.relu(self.bn5(self.conv5(right)))], 1))


class ShuffleNetV2(nn.Module):
    """ShuffleNet v2: a 1×1 stem, three stages (a down block, then basic blocks), 1×1 ``conv2``, pooling, ``linear``.

    The references pool with avg_pool2d(4), global on the 4×4 maps of 32 px images; here it is global at any size.
    """

    def __init__(self, channels: tuple[int, int, int, int], blocks: tuple[int, int, int],
                 num_classes: int = 100) -> None:
        super().__init__()
        self.conv1, self.bn1 = stem()
        in_channels = 24
        stages = []
        for out_channels, count in zip(channels[:3], blocks):
            stages.append(nn.Sequential(DownBlock(in_channels, out_channels),
                                        *(BasicBlock(out_channels) for _ in range(count))))
            in_channels = out_channels
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = conv1x1(channels[2], channels[3])
        self.bn2 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # modules, so the last map and the pooled vector can be hooked
        self.linear = nn.Linear(channels[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


@MODELS.register()
def ShuffleV1(num_classes: int = 100) -> ShuffleNet:
    """ShuffleNet v1 with 3 groups (stages of 240, 480, 960 channels), ~0.95M parameters: a student of resnet32x4."""
    return ShuffleNet((240, 480, 960), (4, 8, 4), 3, num_classes)


@MODELS.register()
def ShuffleV2(num_classes: int = 100) -> ShuffleNetV2:
    """ShuffleNet v2 at 1× width (stages of 116, 232, 464 channels), ~1.4M parameters: a student of resnet32x4."""
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes)
