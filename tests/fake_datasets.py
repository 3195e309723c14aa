"""Tiny copies of torchvision's datasets, written in each one's own file format: tests never download.

Each writer puts a few random images per class under a root folder, where torchvision's reader looks
for them, and returns what kd should read back. The files' MD5 sums are not the real ones: tests of
CIFAR, SVHN and STL10 turn torchvision's MD5 check off with :func:`skip_md5_check`.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torchvision


@dataclass
class Fake:
    """What kd should read from a fake dataset: class names, and per split RGB images (N, H, W, 3) and labels."""

    classes: list[str]
    images: dict[str, np.ndarray]
    labels: dict[str, list[int]]


def skip_md5_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make torchvision accept files whatever their MD5 (fake files cannot match the real sums)."""
    monkeypatch.setattr(torchvision.datasets.utils, "check_md5", lambda *args, **kwargs: True)


def _draw(name: str, num_classes: int, per_split: tuple[int, int], shape: tuple[int, ...]) -> Fake:
    """Random images of ``shape`` with shuffled labels, ``per_split`` images per class in train and test."""
    rng = np.random.default_rng(list(name.encode()))
    images, labels = {}, {}
    for split, per_class in zip(("train", "test"), per_split):
        labels[split] = rng.permutation(np.repeat(np.arange(num_classes), per_class)).tolist()
        images[split] = rng.integers(0, 256, (len(labels[split]), *shape), dtype=np.uint8)
    return Fake([f"{name.lower()}-class-{i}" for i in range(num_classes)], images, labels)


def _rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def _pickle(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(content))


def write_cifar10(root: Path, per_split: tuple[int, int] = (3, 2)) -> Fake:
    """``cifar-10-batches-py``: five pickled training batches, a test batch and ``batches.meta``."""
    fake = _draw("CIFAR10", 10, per_split, (32, 32, 3))
    folder = root / "cifar-10-batches-py"
    rows = {split: fake.images[split].transpose(0, 3, 1, 2).reshape(-1, 3072) for split in fake.images}  # CHW rows
    batches = np.array_split(np.arange(len(rows["train"])), 5)
    for number, index in enumerate(batches, start=1):
        _pickle(folder / f"data_batch_{number}",
                {"data": rows["train"][index], "labels": [fake.labels["train"][i] for i in index]})
    _pickle(folder / "test_batch", {"data": rows["test"], "labels": fake.labels["test"]})
    _pickle(folder / "batches.meta", {"label_names": fake.classes})
    return fake


def write_cifar100(root: Path, per_split: tuple[int, int] = (2, 1)) -> Fake:
    """``cifar-100-python``: pickled ``train`` and ``test`` with fine labels, and ``meta``."""
    fake = _draw("CIFAR100", 100, per_split, (32, 32, 3))
    folder = root / "cifar-100-python"
    for split in ("train", "test"):
        rows = fake.images[split].transpose(0, 3, 1, 2).reshape(-1, 3072)
        labels = fake.labels[split]
        _pickle(folder / split, {"data": rows, "fine_labels": labels, "coarse_labels": [i // 5 for i in labels]})
    _pickle(folder / "meta", {"fine_label_names": fake.classes, "coarse_label_names": [str(i) for i in range(20)]})
    return fake


def _idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of uint8 values: magic (0, 0, 8, number of dimensions), big-endian sizes, then the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
                     + array.tobytes())


def _mnist_like(name: str) -> Callable[[Path, tuple[int, int]], Fake]:
    """A writer of ``ROOT/<name>/raw/``'s four IDX files (MNIST, FashionMNIST, KMNIST share the format)."""

    def write(root: Path, per_split: tuple[int, int] = (3, 2)) -> Fake:
        fake = _draw(name, 10, per_split, (28, 28))
        for split, prefix in (("train", "train"), ("test", "t10k")):
            _idx(root / name / "raw" / f"{prefix}-images-idx3-ubyte", fake.images[split])
            _idx(root / name / "raw" / f"{prefix}-labels-idx1-ubyte", np.array(fake.labels[split], dtype=np.uint8))
            fake.images[split] = _rgb(fake.images[split])  # greyscale, read as RGB
        fake.classes = list(getattr(torchvision.datasets, name).classes)  # torchvision names them itself
        return fake

    return write


def write_svhn(root: Path, per_split: tuple[int, int] = (3, 2)) -> Fake:
    """``train_32x32.mat`` and ``test_32x32.mat``: X as (32, 32, 3, N), y as (N, 1) with 10 for the digit 0."""
    fake = _draw("SVHN", 10, per_split, (32, 32, 3))
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        digits = np.array(fake.labels[split], dtype=np.uint8)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": fake.images[split].transpose(1, 2, 3, 0),
                                                        "y": np.where(digits == 0, 10, digits)[:, None]})
    fake.classes = [str(d) for d in range(10)]
    return fake


def write_stl10(root: Path, per_split: tuple[int, int] = (2, 1)) -> Fake:
    """``stl10_binary``: images column-major in ``*_X.bin``, labels 1-10 in ``*_y.bin``, ``class_names.txt``."""
    fake = _draw("STL10", 10, per_split, (96, 96, 3))
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        (folder / f"{split}_X.bin").write_bytes(fake.images[split].transpose(0, 3, 2, 1).tobytes())
        (folder / f"{split}_y.bin").write_bytes((np.array(fake.labels[split]) + 1).astype(np.uint8).tobytes())
    (folder / "unlabeled_X.bin").write_bytes(fake.images["test"][:1].transpose(0, 3, 2, 1).tobytes())
    (folder / "class_names.txt").write_text("\n".join(fake.classes) + "\n")
    return fake


FAKES: dict[str, Callable[..., Fake]] = {
    "CIFAR10": write_cifar10, "CIFAR100": write_cifar100, "MNIST": _mnist_like("MNIST"),
    "FashionMNIST": _mnist_like("FashionMNIST"), "KMNIST": _mnist_like("KMNIST"), "SVHN": write_svhn,
    "STL10": write_stl10,
}
