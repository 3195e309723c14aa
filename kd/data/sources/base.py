"""What every dataset source gives the rest of kd: class names and two splits of labelled RGB images."""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from kd.errors import KDError
from kd.data.images import resize_short
from kd.files import checked_path, printable
from kd.registry import Registry, did_you_mean

if TYPE_CHECKING:
    from kd.config import Config


class Split(ABC):
    """One split of a dataset: labelled RGB images by index, and a fingerprint that keys the caches built from it.

    ``labels[i]`` is the class index of sample ``i``; ``len(split)`` is the number of samples.
    """

    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def image(self, index: int) -> Image.Image:
        """Image ``index`` as 8-bit RGB; a KDError naming the sample when it cannot be read."""

    @abstractmethod
    def describe(self, index: int) -> str:
        """Where sample ``index`` comes from, for messages: its file, or e.g. ``CIFAR100 train #17``."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A digest that changes whenever the images or labels may have: the image and teacher caches' key."""

    def resized(self, index: int, short_side: int) -> np.ndarray:
        """Image ``index`` as HWC uint8 with its short side at ``short_side``: what the image cache stores."""
        return resize_short(self.image(index), short_side)


def held_out(labels: list[int], classes: list[str], fraction: float, seed: int,
             flag: str) -> tuple[list[int], list[int]]:
    """Indices kept and held out: ``round(fraction)`` of each class held out, at least one on each side.

    Drawn with ``seed`` class by class; each list runs class by class, in index order within a class.
    A class with fewer than two samples is a KDError naming ``flag``.
    """
    by_class: list[list[int]] = [[] for _ in classes]
    for index, label in enumerate(labels):  # one pass: a filter per class took about a minute for ImageNet
        by_class[label].append(index)
    rng, kept, held = np.random.default_rng(seed), [], []
    for name, members in zip(classes, by_class):
        if len(members) < 2:
            raise KDError(f"{flag}: class {name} has {len(members)} image(s), too few to hold out one and keep one")
        order = rng.permutation(len(members))
        count = min(len(members) - 1, max(1, round(len(members) * fraction)))
        held += [members[i] for i in sorted(order[:count])]
        kept += [members[i] for i in sorted(order[count:])]
    return kept, held


def file_stamps(paths: Iterable[str], what: str = "file") -> str:
    """A digest of files' absolute paths, sizes and modification times (ns): changes when any file may have.

    Paths enter as their bytes on disk, so a name that is not UTF-8 keys the caches like any other.
    """
    digest = hashlib.sha256()
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise KDError(f"cannot read {what} {printable(path)}: {exc.strerror or exc}") from None
        digest.update(os.fsencode(os.path.abspath(path)) + f"\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass
class DatasetLayout:
    """What a source found: class names, the training and validation splits, and any images it left out."""

    classes: list[str]
    train: Split
    val: Split
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sample, printable; why it cannot be read)


@dataclass(frozen=True)
class LoadOptions:
    """What a source may need besides its own spec: the flags it reads, typed (sources never see a Config)."""

    data_dir: str  # --data_dir as given, for messages
    output_dir: Path  # where kd may write (the generated demo)
    val_fraction: float = 0.2  # a folder without val/: the share of train/ held out for validation
    skip_bad_images: bool = False
    download: bool = False  # --download_data

    @classmethod
    def from_config(cls, c: Config) -> LoadOptions:
        """The options of a run's ``Config``."""
        return cls(c.data_dir, Path(c.output_dir), c.val_fraction, c.skip_bad_images, c.download_data)


class DataSource(ABC):
    """A kind of dataset, named by a ``--data_dir`` prefix (``torchvision:...``) and registered in DATA_SOURCES."""

    def __init__(self, spec: str) -> None:
        """``spec`` is ``--data_dir`` without the source's prefix."""
        self.spec = spec

    @abstractmethod
    def load(self, options: LoadOptions) -> DatasetLayout:
        """The dataset's classes and splits, read (or fetched) and checked; one-line KDErrors naming --data_dir."""

    def folders(self, options: LoadOptions) -> list[Path]:
        """The local folders the dataset is read from, which kd must never write into (none: it reads no folder)."""
        return []


DATA_SOURCES: Registry[type[DataSource]] = Registry("dataset source")
DEFAULT_SOURCE = "folder"  # a --data_dir without a registered prefix: an ImageFolder path, as before sources


def open_source(data_dir: str) -> DataSource:
    """The source ``data_dir`` names: ``PREFIX:REST`` for a registered prefix, else an ImageFolder path."""
    prefix, colon, rest = data_dir.partition(":")
    if colon and prefix in DATA_SOURCES:
        return DATA_SOURCES.get(prefix)(rest)
    hint = did_you_mean(prefix, DATA_SOURCES.names()) if colon else ""
    if hint and not checked_path(data_dir, "--data_dir").exists():
        raise KDError(f"--data_dir {data_dir}: no such folder, and no dataset source '{prefix}'{hint}")
    return DATA_SOURCES.get(DEFAULT_SOURCE)(data_dir)
