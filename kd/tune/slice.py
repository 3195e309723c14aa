"""The tuning slice: a held-out part of each class of the training set, on which --tune's trials are scored."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from kd.data.sources.base import DatasetLayout, Split, held_out

SLICE_SEED = 14  # the tuning slice is the same for every --seed, so each seed's final stage sees the same split


class SubsetSplit(Split):
    """The samples ``indices`` of another split (its images, labels and image cache alike)."""

    def __init__(self, parent: Split, indices: list[int]) -> None:
        self.parent, self.indices = parent, indices
        self.labels = [parent.labels[i] for i in indices]

    def image(self, index: int) -> Image.Image:
        return self.parent.image(self.indices[index])

    def describe(self, index: int) -> str:
        return self.parent.describe(self.indices[index])

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.parent.fingerprint()}\0{self.indices}".encode()).hexdigest()

    def resized(self, index: int, short_side: int) -> np.ndarray:
        return self.parent.resized(self.indices[index], short_side)


def tuning_split(layout: DatasetLayout, fraction: float) -> DatasetLayout:
    """The training set as trials see it: ``train`` less a held-out slice of each class, and that slice as ``val``.

    The slice is drawn with a fixed seed, so it does not change with --seed; each class keeps at least
    one image on each side.
    """
    kept, held = (sorted(indices) for indices in
                  held_out(layout.train.labels, layout.classes, fraction, SLICE_SEED, "--tune_fraction"))
    return DatasetLayout(layout.classes, SubsetSplit(layout.train, kept), SubsetSplit(layout.train, held))
