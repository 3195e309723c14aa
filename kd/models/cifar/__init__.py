"""The ``cifar:`` model source: the CIFAR-100 networks of RepDistiller and mdistiller, one file per family.

Their names are the references' own (``cifar:resnet32x4``, ``cifar:wrn_40_2``, ``cifar:vgg13``,
``cifar:MobileNetV2``, ``cifar:ShuffleV1``), and so are their module names and state_dict keys: the
teachers those projects released (``ckpt_epoch_240.pth``) load as ``--teacher_checkpoint`` or
``--*_weights`` files. They return logits only; feature losses hook their modules by name.
"""

from __future__ import annotations

from kd.models.cifar import mobilenetv2, resnet, shufflenet, vgg, wrn
from kd.models.cifar.base import MODELS
from kd.models.sources import RegistrySource, register_source

__all__ = ["MODELS", "CifarModels", "mobilenetv2", "resnet", "shufflenet", "vgg", "wrn"]


@register_source
class CifarModels(RegistrySource):
    """RepDistiller's and mdistiller's CIFAR networks, written ``cifar:NAME`` (a bare ``vgg13`` stays torchvision's)."""

    prefix, registry = "cifar", MODELS
    about = "the CIFAR-100 networks of RepDistiller and mdistiller, for 32 px images; their teachers load as files"
