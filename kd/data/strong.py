"""MLKD's second, strongly augmented view of each training image (Jin et al. 2023).

The reference (Jin-Ying/Multi-Level-Logit-Distillation, ``mdistiller/dataset/cifar100.py`` and ``imagenet.py``)
gives each image two views: the recipe's own crop and flip (weak), and another crop and flip followed by
FixMatch's RandAugment and a Cutout (strong). Its RandAugment draws 2 of 14 PIL operations with replacement, each
with a value uniform in the operation's range (no magnitude bins, no random sign), then always cuts out a square
of side uniform in [0, ½) of the width, filled with (125, 123, 114). kd applies the same PIL operations with the
same ranges, drawing from torch's generator, so a view is a function of (seed, epoch, index) like every crop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

CUTOUT_FILL = (125, 123, 114)


Operation = Callable[[Image.Image, float], Image.Image]


def _affine(coefficients: Callable[[Image.Image, float], tuple[float, ...]]) -> Operation:
    """A PIL affine map whose inverse coefficients (a, b, c, d, e, f) depend on the image and the drawn value."""
    return lambda image, v: image.transform(image.size, Image.AFFINE, coefficients(image, v))


# (operation, low, high): the reference's augment_list, in its order.
OPERATIONS: list[tuple[Operation, float, float]] = [
    (lambda image, v: ImageOps.autocontrast(image), 0, 1),
    (lambda image, v: ImageEnhance.Brightness(image).enhance(v), 0.05, 0.95),
    (lambda image, v: ImageEnhance.Color(image).enhance(v), 0.05, 0.95),
    (lambda image, v: ImageEnhance.Contrast(image).enhance(v), 0.05, 0.95),
    (lambda image, v: ImageOps.equalize(image), 0, 1),
    (lambda image, v: image, 0, 1),
    (lambda image, v: ImageOps.posterize(image, max(1, int(v))), 4, 8),
    (lambda image, v: image.rotate(v), -30, 30),
    (lambda image, v: ImageEnhance.Sharpness(image).enhance(v), 0.05, 0.95),
    (_affine(lambda image, v: (1, v, 0, 0, 1, 0)), -0.3, 0.3),  # shear x, about the top-left corner
    (_affine(lambda image, v: (1, 0, 0, v, 1, 0)), -0.3, 0.3),  # shear y
    (lambda image, v: ImageOps.solarize(image, v), 0, 256),
    (_affine(lambda image, v: (1, 0, v * image.size[0], 0, 1, 0)), -0.3, 0.3),  # translate x by a share of the width
    (_affine(lambda image, v: (1, 0, 0, 0, 1, v * image.size[1])), -0.3, 0.3),  # translate y
]


def _uniform() -> float:
    return float(torch.rand(()))


def cutout(image: Image.Image, share: float) -> Image.Image:
    """Fill a square of side ``share`` × the width with :data:`CUTOUT_FILL`, at a random place.

    As the reference's ``CutoutAbs``: its centre is drawn by ``np.random.uniform(w)``, i.e. between 1 and w (the
    low end is w, the high end numpy's default 1), then its corner clipped to the image; PIL fills the far edge too.
    """
    if share <= 0:
        return image
    side = share * image.size[0]
    w, h = image.size
    x0, y0 = w + (1 - w) * _uniform(), h + (1 - h) * _uniform()
    x0, y0 = int(max(0, x0 - side / 2)), int(max(0, y0 - side / 2))
    image = image.copy()
    ImageDraw.Draw(image).rectangle((x0, y0, min(w, x0 + side), min(h, y0 + side)), CUTOUT_FILL)
    return image


class StrongAugment(v2.Transform):
    """FixMatch's RandAugment as MLKD's code applies it: ``operations`` PIL operations drawn with replacement, each at
    a value uniform in its range, then a Cutout of up to half the width. Takes and gives uint8 tensors (C, H, W)."""

    def __init__(self, operations: int = 2) -> None:
        super().__init__()
        self.operations = operations

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        image = TF.to_pil_image(pixels)
        for _ in range(self.operations):
            operation, low, high = OPERATIONS[int(torch.randint(len(OPERATIONS), ()))]
            image = operation(image, low + (high - low) * _uniform())
        return TF.pil_to_tensor(cutout(image, 0.5 * _uniform()))


class TwoViews(v2.Transform):
    """Both views of one image, stacked (2, C, H, W): the recipe's ``weak`` one and a ``strong`` one."""

    def __init__(self, weak: v2.Transform, strong: v2.Transform) -> None:
        super().__init__()
        self.weak, self.strong = weak, strong

    def forward(self, image: object) -> torch.Tensor:
        return torch.stack([self.weak(image), self.strong(image)])


def strong_view(crop_and_flip: v2.Transform) -> v2.Transform:
    """The strong view: a crop and flip of its own (the recipe's, drawn anew), then :class:`StrongAugment`."""
    return v2.Compose([crop_and_flip, StrongAugment()])
