"""How images become the networks' input (--augment): training and validation transforms, normalisation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)  # RepDistiller's dataset/cifar100.py
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def train_transform(image_size: int, min_crop_scale: float = 0.08, hflip: bool = True) -> v2.Transform:
    """Random resized crop and (optionally) horizontal flip, as uint8 pixels (see :func:`normalize`)."""
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(0.5 if hflip else 0.0),
        v2.ToPureTensor(),
    ])


def val_transform(image_size: int) -> v2.Transform:
    """Resize the short side to 256/224 of the crop and take the centre crop, as uint8 pixels."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(round(image_size * 256 / 224), antialias=True),
        v2.CenterCrop(image_size),
        v2.ToPureTensor(),
    ])


def cifar_train_transform(image_size: int, min_crop_scale: float = 0.08, hflip: bool = True) -> v2.Transform:
    """RepDistiller's CIFAR augmentation: a random crop of the image zero-padded by 4 px, and a flip; no resizing.

    (``min_crop_scale`` is for the resized crop of the other recipe and does nothing here.)
    """
    return v2.Compose([
        v2.ToImage(),
        v2.RandomCrop(image_size, padding=4, pad_if_needed=True, fill=0),
        v2.RandomHorizontalFlip(0.5 if hflip else 0.0),
        v2.ToPureTensor(),
    ])


def cifar_val_transform(image_size: int) -> v2.Transform:
    """The image itself (its centre ``image_size`` square, padded if smaller), as uint8 pixels; no resizing."""
    return v2.Compose([v2.ToImage(), v2.CenterCrop(image_size), v2.ToPureTensor()])


@dataclass(frozen=True)
class Recipe:
    """How images become the networks' input (--augment): training and validation transforms, normalisation."""

    train: Callable[[int, float, bool], v2.Transform]
    val: Callable[[int], v2.Transform]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resized: bool  # whether it resizes images: if not, the image cache keeps them at --image_size


RECIPES = {
    "imagenet": Recipe(train_transform, val_transform, IMAGENET_MEAN, IMAGENET_STD, resized=True),
    "cifar": Recipe(cifar_train_transform, cifar_val_transform, CIFAR100_MEAN, CIFAR100_STD, resized=False),
}


def normalize(images: torch.Tensor, augment: str = "imagenet") -> torch.Tensor:
    """A batch of uint8 pixels as the networks' input: floats in [0, 1], normalised as recipe ``augment`` says.

    Loaders ship uint8 (a quarter of the bytes of float32 to collate and copy to the GPU) and this
    runs after the copy, on the device. Float batches are taken as already normalised.
    """
    if images.dtype != torch.uint8:
        return images
    recipe = RECIPES[augment]
    return TF.normalize(TF.to_dtype(images, torch.float32, scale=True), recipe.mean, recipe.std)
