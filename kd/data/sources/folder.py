"""ImageFolder data: a folder of class folders, its layout detection and checks; ``demo`` generates one."""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from kd.errors import KDError, warn
from kd.data.images import check_header, decode_resized, load_rgb
from kd.files import checked_path, printable, reason, shown
from kd.data.sources.base import DATA_SOURCES, DataSource, DatasetLayout, LoadOptions, Split, file_stamps, held_out
from kd.data.sources.demo import make_demo_dataset

SPLIT_SEED = 0  # the train/val split of a single folder never changes with --seed
Sample = tuple[str, int]


@dataclass
class FileSplit(Split):
    """Images in files: the (path, label) samples of an ImageFolder."""

    samples: list[Sample]
    labels: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.labels = [label for _, label in self.samples]

    def image(self, index: int) -> Image.Image:
        return load_rgb(self.samples[index][0])

    def describe(self, index: int) -> str:
        return printable(self.samples[index][0])

    def fingerprint(self) -> str:
        """A digest of every file's path, size and modification time, and of the labels in order."""
        stamps = file_stamps((path for path, _ in self.samples), "image")
        return hashlib.sha256(f"{stamps}\0{self.labels}".encode()).hexdigest()

    def resized(self, index: int, short_side: int) -> np.ndarray:
        """Decoded at reduced scale when a JPEG allows it (see :func:`kd.data.images.decode_resized`)."""
        return decode_resized(self.samples[index][0], short_side)


def _class_folders(folder: Path) -> list[str]:
    """The class folder names in ``folder``, sorted; hidden ones (``.ipynb_checkpoints``, ``.git``) are not classes.

    An entry Python cannot look at (a symlink loop) is refused by name, rather than hiding every class.
    """
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise KDError(f"--data_dir: cannot list {shown(folder)}: {reason(exc)}") from None
    return sorted(entry.name for entry in entries
                  if not entry.name.startswith(".") and checked_path(entry.path, "--data_dir").is_dir())


def _files(class_folder: str) -> tuple[list[str], list[str]]:
    """The image files (by extension) and the other files under one class folder, each folder in path order.

    Hidden files and folders (macOS's ``._photo.jpg``) are skipped, and so is a linked folder met before on
    this walk or holding the class folder (a symlink loop), which would repeat images or bring others' in.
    """
    top = os.path.realpath(class_folder)
    seen: set[str] = set()
    walked = []
    for root, folders, names in os.walk(class_folder, onerror=_unlistable, followlinks=True):
        real = os.path.realpath(root)
        if real in seen or (root != class_folder and os.path.commonpath([top, real]) == real):
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = [name for name in folders if not name.startswith(".")]
        walked.append((root, sorted(name for name in names if not name.startswith("."))))
    images, others = [], []
    for root, names in sorted(walked):
        for name in names:
            (images if name.lower().endswith(IMG_EXTENSIONS) else others).append(os.path.join(root, name))
    return images, others


def _unlistable(exc: OSError) -> None:
    """A folder the walk cannot list (no read permission) is refused by name, not taken for one without images."""
    raise KDError(f"--data_dir: cannot list {shown(exc.filename)}: {reason(exc)}")


def _scan(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[Sample]]:
    """Class names and samples of one ImageFolder-style folder (in torchvision's order), refusing empty classes."""
    found = _class_folders(folder)
    if not found:
        raise KDError(f"--data_dir: {folder} has no class folders (expected {folder}/<class>/<image>)")
    if classes is not None and found != classes:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise KDError(f"--data_dir: the class folders of {folder} differ from train/: "
                      f"missing {missing or 'none'}, extra {extra or 'none'}")
    samples, others = [], []
    for label, name in enumerate(found):
        images, rest = _files(os.path.join(folder, name))
        samples += [(path, label) for path in images]
        others += rest
    if others:
        warn(f"--data_dir: ignoring {len(others)} file(s) under {folder} that are not images by their "
             f"extension, e.g. {printable(others[0])}")
    counts = np.bincount([label for _, label in samples], minlength=len(found))
    empty = [found[i] for i in np.flatnonzero(counts == 0)]
    if len(samples) == 0:
        raise KDError(f"--data_dir: no images ({', '.join(IMG_EXTENSIONS)}) under {folder}")
    if empty:
        raise KDError(f"--data_dir: class folder {folder / empty[0]} has no images"
                      + (f" (nor {len(empty) - 1} more)" if len(empty) > 1 else ""))
    return found, samples


def _split(samples: list[Sample], classes: list[str], val_fraction: float) -> tuple[list[Sample], list[Sample]]:
    """A stratified train/val split with a fixed seed: every class keeps images on both sides."""
    kept, held = held_out([label for _, label in samples], classes, val_fraction, SPLIT_SEED, "--val_fraction")
    return [samples[i] for i in kept], [samples[i] for i in held]


def scan_image_folder(data_dir: str | Path, val_fraction: float = 0.2) -> DatasetLayout:
    """Find the classes and images under ``data_dir``: ``train/`` + ``val/``, or one folder to split."""
    root = checked_path(data_dir, "--data_dir")
    if not root.is_dir():
        raise KDError(f"--data_dir: {root} does not exist or is not a folder")
    if (root / "train").is_dir():
        if not (root / "val").is_dir():
            raise KDError(f"--data_dir: {root} has train/ but no val/ folder")
        classes, train = _scan(root / "train")
        _, val = _scan(root / "val", classes)
    else:
        classes, samples = _scan(root)
        train, val = _split(samples, classes, val_fraction)
    return DatasetLayout(classes, FileSplit(train), FileSplit(val))


def find_bad_images(samples: list[Sample], decode: bool) -> list[tuple[str, str]]:
    """(path, reason) of every image that cannot be read: header only, or fully decoded with a progress bar."""
    bad = []
    for path, _ in tqdm(samples, desc="checking images", unit="img", disable=None if decode else True,
                         file=sys.stderr):
        try:
            (load_rgb if decode else check_header)(path)
        except KDError as exc:
            bad.append((path, str(exc).removeprefix(f"cannot read image {printable(path)}: ")))
    return bad


def without_bad_images(layout: DatasetLayout, skip: bool) -> DatasetLayout:
    """``layout`` after checking every image: an error naming the first unreadable one, or (``skip``) without them.

    Without ``skip`` only the headers are read (fast); with it every image is decoded, so that none
    can fail in the middle of training.
    """
    skipped = find_bad_images(layout.train.samples + layout.val.samples, decode=skip)
    if skipped and not skip:
        path, reason = skipped[0]
        raise KDError(f"--data_dir: cannot read image {printable(path)} ({reason}); remove it, or pass "
                      "--skip_bad_images to check every image and train on the rest")
    if not skipped:
        return layout
    bad = {path for path, _ in skipped}
    warn(f"--skip_bad_images: skipping {len(bad)} unreadable image(s), e.g. {printable(skipped[0][0])}")
    return DatasetLayout(layout.classes, *(FileSplit([s for s in split.samples if s[0] not in bad])
                                           for split in (layout.train, layout.val)),
                         [(printable(path), reason) for path, reason in skipped])


@DATA_SOURCES.register("folder")
class ImageFolderSource(DataSource):
    """A folder of class folders, with ``train/`` and ``val/`` or split by --val_fraction; ``demo`` generates one.

    Any ``--data_dir`` without a registered prefix is one (``folder:PATH`` says so explicitly).
    """

    def load(self, options: LoadOptions) -> DatasetLayout:
        root = make_demo_dataset(self._root(options)) if self.spec == "demo" else self.spec
        return without_bad_images(scan_image_folder(root, options.val_fraction), options.skip_bad_images)

    def folders(self, options: LoadOptions) -> list[Path]:
        return [self._root(options)]

    def _root(self, options: LoadOptions) -> Path:
        """The folder of class folders: ``--data_dir`` itself, or where the demo is generated."""
        return options.output_dir / "demo_data" if self.spec == "demo" else checked_path(self.spec, "--data_dir")
