"""CIFAR VGGs with BatchNorm (vgg8, vgg11, vgg13, vgg16, vgg19): five conv blocks and one linear classifier.

Written after RepDistiller's models/vgg.py (github.com/HobbitLong/RepDistiller) and mdistiller's
mdistiller/models/cifar/vgg.py (github.com/megvii-research/mdistiller), whose ``vggN`` entries are their
``vggN_bn`` networks: the same modules, names and state_dict keys (``block0.0.weight``), so their released
teachers load as they are. Features are hooked by name (``block0`` … ``block4``: each ends in BatchNorm,
so they are the references' pre-activation features; the ReLU comes after the block).
"""

from __future__ import annotations

import torch
from torch import nn

from kd.models.cifar.base import MODELS, he_init

# The output channels of the 3×3 convolutions of each of the five blocks.
CONFIGS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def conv_block(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    """Conv3×3 (with bias)-BN-ReLU per width, without the last ReLU: the network applies it after the block."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """Blocks ``block0`` … ``block4`` (ending in BN) each followed by ``relu0`` … ``relu4`` and ``pool0`` … ``pool4``,
    then ``classifier``.

    ``pool0`` … ``pool2`` halve the size; ``pool3`` only for 64 px images (the references' Tiny-ImageNet
    rule), so block4 sees 4×4 maps either way; ``pool4`` is global average pooling.
    """

    def __init__(self, widths: tuple[tuple[int, ...], ...], num_classes: int = 100) -> None:
        super().__init__()
        ins = (3, *(block[-1] for block in widths[:-1]))
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            conv_block(in_channels, block) for in_channels, block in zip(ins, widths))
        # Modules, not functions, so hooks can read each block's pre-activation output (blockN) and its ReLU's (reluN).
        self.relu0, self.relu1, self.relu2, self.relu3, self.relu4 = (nn.ReLU() for _ in range(5))
        self.pool0, self.pool1, self.pool2, self.pool3 = (nn.MaxPool2d(kernel_size=2, stride=2) for _ in range(4))
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(widths[-1][-1], num_classes)
        he_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tiny_imagenet = x.shape[2] == 64
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        x = self.pool4(self.relu4(self.block4(self.pool3(x) if tiny_imagenet else x)))
        return self.classifier(torch.flatten(x, 1))


@MODELS.register()
def vgg8(num_classes: int = 100) -> VGG:
    """VGG-8 with BatchNorm (one conv per block): the student of vgg13."""
    return VGG(CONFIGS["vgg8"], num_classes)


@MODELS.register()
def vgg11(num_classes: int = 100) -> VGG:
    """VGG-11 with BatchNorm (configuration A)."""
    return VGG(CONFIGS["vgg11"], num_classes)


@MODELS.register()
def vgg13(num_classes: int = 100) -> VGG:
    """VGG-13 with BatchNorm (configuration B): a released teacher."""
    return VGG(CONFIGS["vgg13"], num_classes)


@MODELS.register()
def vgg16(num_classes: int = 100) -> VGG:
    """VGG-16 with BatchNorm (configuration D)."""
    return VGG(CONFIGS["vgg16"], num_classes)


@MODELS.register()
def vgg19(num_classes: int = 100) -> VGG:
    """VGG-19 with BatchNorm (configuration E)."""
    return VGG(CONFIGS["vgg19"], num_classes)
