"""The CIFAR MobileNetV2 of the distillation tables (RepDistiller's ``mobile_half``, registered as MobileNetV2).

Written after RepDistiller's models/mobilenetv2.py (github.com/HobbitLong/RepDistiller) and mdistiller's
mdistiller/models/cifar/mobilenetv2.py (github.com/megvii-research/mdistiller): expansion 6, half width,
the same modules, names and state_dict keys (``blocks.1.0.conv.3.weight``), so their trained networks
load as they are. Features are hooked by name: the references' are ``blocks.1``, ``blocks.2``,
``blocks.4``, ``blocks.6`` (16, 8, 4, 2 px on 32 px images), then ``conv2``.
"""

from __future__ import annotations

import torch
from torch import nn

from kd.models.cifar.base import MODELS, he_init

# Per group of blocks: expansion (None: the network's), output channels at width 1, blocks, first stride.
GROUPS = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
          (None, 160, 3, 2), (None, 320, 1, 1))
LAST_CHANNELS = 1280  # the references widen it only for width multipliers above 1


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """Conv (without bias, size-keeping padding)-BN-ReLU: the stem ``conv1`` and the head ``conv2``."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1×1 expansion, 3×3 depthwise (with ``stride``), 1×1 linear projection in ``conv``; residual where shapes match.

    Unlike torchvision's, the expansion convolution is there even when the expansion is 1.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_res_connect = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """A stride-2 stem ``conv1``, seven groups of inverted residuals ``blocks``, 1×1 ``conv2``, pooling, ``classifier``.

    The references pool with AvgPool2d(2, ceil_mode=True), global on the 2×2 maps of 32 px images;
    ``avgpool`` here is global at any size.
    """

    def __init__(self, num_classes: int = 100, expansion: int = 6, width: float = 0.5) -> None:
        super().__init__()
        channels = int(32 * width)
        self.conv1 = conv_bn_relu(3, channels, 3, stride=2)
        self.blocks = nn.ModuleList()
        for group_expansion, group_channels, blocks, stride in GROUPS:
            out_channels = int(group_channels * width)
            group = []
            for block_stride in (stride,) + (1,) * (blocks - 1):
                group.append(InvertedResidual(channels, out_channels, block_stride, group_expansion or expansion))
                channels = out_channels
            self.blocks.append(nn.Sequential(*group))
        self.conv2 = conv_bn_relu(channels, LAST_CHANNELS, 1)
        self.classifier = nn.Sequential(nn.Linear(LAST_CHANNELS, num_classes))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        he_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        return self.classifier(torch.flatten(self.avgpool(self.conv2(x)), 1))


@MODELS.register("MobileNetV2")
def mobile_half(num_classes: int = 100) -> MobileNetV2:
    """MobileNetV2 at half width with expansion 6, ~0.8M parameters: the student of vgg13 and ResNet-50."""
    return MobileNetV2(num_classes)
