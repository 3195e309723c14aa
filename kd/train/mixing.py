"""Mixup and CutMix of a training batch (torchvision's), drawn as a pure function of (seed, epoch, batch index).

Both networks see the mixed batch: the teacher judges the very images the student learns from (Beyer et
al., *Knowledge distillation: A good teacher is patient and consistent*, CVPR 2022). Since the batches of
an epoch are fixed by (seed, epoch) too, each image's mix is the same in every run with the same batch
size: a resumed run replays it, and a teacher-output cache keyed by (epoch, image) stays valid.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from kd.seeding import draw_seed

MIX_STREAM = 0x6D6978  # "mix": keeps these draws apart from the crops seeded by (seed, epoch, image)


class BatchMixing:
    """MixUp or CutMix (one of the two, drawn per batch, when both are on) of a batch of images and labels.

    A batch and its rolled copy are mixed with one λ ~ Beta(α, α); CutMix pastes a box and sets λ to the
    share of the image kept. The labels become distributions: λ·onehot(y) + (1 - λ)·onehot(y rolled).
    """

    def __init__(self, mixup: float, cutmix: float, num_classes: int, seed: int) -> None:
        transforms = [kind(alpha=alpha, num_classes=num_classes)
                      for alpha, kind in ((mixup, v2.MixUp), (cutmix, v2.CutMix)) if alpha > 0]
        self.transform = transforms[0] if len(transforms) == 1 else v2.RandomChoice(transforms)
        self.seed = seed

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, epoch: int,
                 batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixed images and their label distributions; the draws (on the CPU generator) depend on
        (seed, epoch, batch) alone and leave the global random state as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(draw_seed(self.seed, epoch, batch, MIX_STREAM))
            return self.transform(images, labels)


def batch_mixing(mixup: float, cutmix: float, num_classes: int, seed: int) -> BatchMixing | None:
    """The mixing --mixup and --cutmix ask for, or None when both are 0 (off)."""
    return BatchMixing(mixup, cutmix, num_classes, seed) if mixup > 0 or cutmix > 0 else None


def hard_labels(targets: torch.Tensor) -> torch.Tensor:
    """Class labels of a batch's targets: the labels themselves, or each mixed image's larger share."""
    return targets.argmax(1) if targets.dim() == 2 else targets
