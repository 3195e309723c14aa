"""``torchvision:NAME:ROOT``: torchvision's classification datasets, read from ROOT by torchvision's own readers."""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torchvision
from PIL import Image
from torchvision.datasets import VisionDataset

from kd.errors import KDError
from kd.files import checked_path, written_atomically
from kd.data.images import to_rgb
from kd.registry import did_you_mean
from kd.versions import missing_folders, remove_empty
from kd.data.sources.base import DATA_SOURCES, DataSource, DatasetLayout, LoadOptions, Split, file_stamps

DOWNLOAD_TIMEOUT_S = 10  # per connection attempt: offline, --download_data fails in seconds (MNIST tries 2 mirrors)
SPLITS = ("train", "test")  # torchvision's names; the test split is kd's validation split


@dataclass(frozen=True)
class Builtin:
    """How kd reads one of torchvision's datasets."""

    entries: tuple[str, ...]  # what it keeps in ROOT: fingerprinted, and moved into ROOT when downloaded
    splits: tuple[dict[str, Any], dict[str, Any]]  # torchvision's arguments for the train and the test split


TRAIN_FLAG = ({"train": True}, {"train": False})
SPLIT_NAME = ({"split": "train"}, {"split": "test"})  # STL10: its labelled splits, not "unlabeled"
DATASETS = {
    "CIFAR10": Builtin(("cifar-10-batches-py",), TRAIN_FLAG),
    "CIFAR100": Builtin(("cifar-100-python",), TRAIN_FLAG),
    "MNIST": Builtin(("MNIST",), TRAIN_FLAG),
    "FashionMNIST": Builtin(("FashionMNIST",), TRAIN_FLAG),
    "KMNIST": Builtin(("KMNIST",), TRAIN_FLAG),
    "SVHN": Builtin(("train_32x32.mat", "test_32x32.mat"), SPLIT_NAME),
    "STL10": Builtin(("stl10_binary",), SPLIT_NAME),
}


class TorchvisionSplit(Split):
    """One split of a torchvision dataset, held in memory by torchvision's reader."""

    def __init__(self, dataset: VisionDataset, labels: list[int], name: str, split: str, files: list[str]) -> None:
        """``files`` are the dataset's files in ROOT, whose sizes and mtimes enter the fingerprint."""
        self.dataset, self.labels, self.name, self.split, self.files = dataset, labels, name, split, files

    def image(self, index: int) -> Image.Image:
        return to_rgb(self.dataset[index][0])  # MNIST's greyscale becomes RGB, as greyscale files do

    def describe(self, index: int) -> str:
        return f"{self.name} {self.split} #{index}"

    def fingerprint(self) -> str:
        """A digest of the dataset's name, split and length, and of its files' paths, sizes and mtimes."""
        stamps = file_stamps(self.files)
        return hashlib.sha256(f"torchvision\0{self.name}\0{self.split}\0{len(self)}\0{stamps}".encode()).hexdigest()


def _labels(dataset: VisionDataset) -> list[int]:
    """The class index of every sample, from the dataset's ``targets`` (CIFAR, MNIST) or ``labels`` (SVHN, STL10)."""
    labels = dataset.targets if hasattr(dataset, "targets") else dataset.labels
    return np.asarray(labels, dtype=np.int64).tolist()


def _files(root: Path, entries: tuple[str, ...]) -> list[str]:
    """Every file of ``entries`` (files or folders) in ``root``, sorted."""
    found = []
    for entry in entries:
        path = root / entry
        found += [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob("*") if p.is_file())
    return found


def _read(name: str, root: Path, where: str) -> tuple[VisionDataset, VisionDataset] | None:
    """The train and test split as torchvision reads them from ``root``; None if it finds files missing or damaged.

    torchvision checks that the files are there and, for most datasets, their MD5 sums.
    """
    try:
        return tuple(getattr(torchvision.datasets, name)(str(root), download=False, **arguments)
                     for arguments in DATASETS[name].splits)
    except Exception as exc:  # torchvision's readers raise anything on a damaged file: name the dataset
        if isinstance(exc, RuntimeError) and "download=True" in str(exc):  # its "not found or corrupted"
            return None
        reason = (str(exc).strip().splitlines() or [""])[-1]
        raise KDError(f"{where}: cannot read {name} from {root}: {type(exc).__name__}: {reason}") from None


def _fetch(name: str, root: Path, where: str, download: bool) -> None:
    """Download a dataset that is not in ``root`` if asked to; else (or if damaged there) say what to do."""
    entries = DATASETS[name].entries
    present = [str(root / e) for e in entries if (root / e).exists()]
    if present:
        raise KDError(f"{where}: {name} in {root} is incomplete or damaged (torchvision's check of its files "
                      f"failed); remove {', '.join(present)} and add --download_data, or put intact files there")
    if not download:
        raise KDError(f"{where}: {name} is not in {root} (expected {', '.join(str(root / e) for e in entries)}); "
                      "add --download_data, or put the files there")
    _download(name, root, where)


def _download(name: str, root: Path, where: str) -> None:
    """Let torchvision fetch ``name`` into a folder beside its files, then move each entry into ``root`` whole.

    An interrupted download leaves no part of the dataset where it would be read, nor ROOT, if kd made it.
    Offline, it fails within seconds: every connection attempt times out after DOWNLOAD_TIMEOUT_S.
    """
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    made = missing_folders(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{name}-download-", dir=root) as scratch:
            for arguments in DATASETS[name].splits:
                getattr(torchvision.datasets, name)(scratch, download=True, **arguments)
            for entry in DATASETS[name].entries:
                try:
                    with written_atomically(root / entry) as tmp:
                        os.replace(Path(scratch) / entry, tmp)
                except OSError:
                    if not (root / entry).exists():  # else another process (a DDP rank) moved it first
                        raise
    except Exception as exc:  # no network, a refused or cut connection, a full disk, a damaged archive
        remove_empty(made)  # the folders made for the download, once empty: never a folder that was there
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise KDError(f"{where} --download_data: could not download {name} into {root} ({reason}); offline? "
                      "put the files there") from None
    finally:
        socket.setdefaulttimeout(old_timeout)


@DATA_SOURCES.register("torchvision")
class TorchvisionSource(DataSource):
    """``torchvision:NAME:ROOT``: dataset NAME of DATASETS, read from folder ROOT by torchvision's reader.

    Its train split trains and its test split validates. --download_data fetches a dataset not in ROOT.
    """

    def load(self, options: LoadOptions) -> DatasetLayout:
        where = f"--data_dir {options.data_dir}"
        name, root = self._parse(where)
        info = DATASETS[name]
        datasets = _read(name, root, where)
        if datasets is None:
            _fetch(name, root, where, options.download)
            datasets = _read(name, root, where)
            if datasets is None:
                raise KDError(f"{where} --download_data: {name} is still incomplete in {root} after downloading it")
        files = _files(root, info.entries)
        train, val = (TorchvisionSplit(dataset, _labels(dataset), name, split, files)
                      for dataset, split in zip(datasets, SPLITS))
        classes = getattr(datasets[0], "classes", None) or [str(i) for i in range(max(train.labels) + 1)]  # SVHN
        labels = train.labels + val.labels
        if min(labels) < 0 or max(labels) >= len(classes):
            raise KDError(f"{where}: {name} in {root} has labels from {min(labels)} to {max(labels)}, but "
                          f"{len(classes)} classes")
        return DatasetLayout(list(classes), train, val)

    def _parse(self, where: str) -> tuple[str, Path]:
        """The dataset's name, as torchvision spells it (matched regardless of case), and its folder."""
        name, colon, root = self.spec.partition(":")
        if not (colon and name and root):
            raise KDError(f"{where}: expected torchvision:NAME:ROOT, a dataset and the folder that holds it, "
                          "e.g. torchvision:CIFAR10:data")
        known = {n.lower(): n for n in DATASETS}
        if name.lower() not in known:
            raise KDError(f"{where}: unknown torchvision dataset '{name}'{did_you_mean(name, DATASETS)}; "
                          f"kd reads {', '.join(DATASETS)}")
        return known[name.lower()], checked_path(root, "--data_dir")
