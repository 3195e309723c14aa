"""ImageFolder data: layout detection and checks, transforms, the DataModule, the demo dataset."""

from __future__ import annotations

import colorsys
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from kd.config import Config
from kd.errors import KDError, warn
from kd.files import written_atomically
from kd.image_cache import ImageCache
from kd.images import load_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLIT_SEED = 0  # the train/val split of a single folder never changes with --seed
Sample = tuple[str, int]


@dataclass
class ImageFolderLayout:
    """What was found under a data directory: class names and (path, label) samples per split."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]


def _scan(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[Sample]]:
    """Class names and samples of one ImageFolder-style folder, refusing empty classes."""
    try:
        found, class_to_idx = find_classes(str(folder))
    except FileNotFoundError:
        raise KDError(f"--data_dir: {folder} has no class folders (expected {folder}/<class>/<image>)") from None
    if classes is not None and found != classes:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise KDError(f"--data_dir: the class folders of {folder} differ from train/: "
                      f"missing {missing or 'none'}, extra {extra or 'none'}")
    samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    others = [p for name in found for p in sorted((folder / name).rglob("*"))
              if p.is_file() and not p.name.startswith(".") and not p.name.lower().endswith(IMG_EXTENSIONS)]
    if others:
        warn(f"--data_dir: ignoring {len(others)} file(s) under {folder} that are not images by their "
             f"extension, e.g. {others[0]}")
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
    rng = np.random.default_rng(SPLIT_SEED)
    train, val = [], []
    for label, name in enumerate(classes):
        own = [s for s in samples if s[1] == label]
        order = rng.permutation(len(own))
        n_val = min(max(1, round(len(own) * val_fraction)), len(own) - 1)
        if n_val < 1:
            raise KDError(f"--val_fraction: class {name} has {len(own)} image, too few to split into train and val")
        val += [own[i] for i in sorted(order[:n_val])]
        train += [own[i] for i in sorted(order[n_val:])]
    return train, val


def scan_image_folder(data_dir: str | Path, val_fraction: float = 0.2,
                      num_classes: int | None = None) -> ImageFolderLayout:
    """Find the classes and images under ``data_dir``: ``train/`` + ``val/``, or one folder to split."""
    root = Path(data_dir).expanduser()
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
    if num_classes is not None and num_classes != len(classes):
        raise KDError(f"--num_classes is {num_classes} but {root} holds {len(classes)} classes: "
                      f"{', '.join(classes)}")
    return ImageFolderLayout(classes, train, val)


def find_bad_images(samples: list[Sample], decode: bool) -> list[tuple[str, str]]:
    """(path, reason) of every image that cannot be read: header only, or fully decoded with a progress bar."""
    bad = []
    for path, _ in tqdm(samples, desc="checking images", unit="img", disable=not decode, file=sys.stderr):
        try:
            if decode:
                load_rgb(path)
            else:
                with Image.open(path):
                    pass
        except (KDError, OSError, SyntaxError, ValueError) as exc:
            bad.append((path, str(exc).removeprefix(f"cannot read image {path}: ")))
    return bad


def draw_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (in every process, unlike ``hash``)."""
    return int(np.random.SeedSequence([p % 2**32 for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class ImageListDataset(Dataset):
    """(image, label, index) triples from a list of (path, label) samples.

    Indexed by ``(index, epoch)`` (see :class:`EpochSampler`), the random transform of a sample is a
    pure function of (seed, epoch, index): an interrupted run resumes with the very same crops, and
    a teacher-output cache replays them. The index lets losses (CRD) and caches address samples.
    Images come decoded from ``images`` (an :class:`ImageCache`) when given, else from their files.
    """

    def __init__(self, samples: list[Sample], transform: v2.Transform, seed: int = 0,
                 images: ImageCache | None = None) -> None:
        self.samples, self.transform, self.seed, self.images = samples, transform, seed, images

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        if get_worker_info() is not None:  # a DataLoader worker: PyTorch already runs it on one thread
            return self._sample(item)
        # In the training process (--num_workers 0) one image is too little work to share between
        # threads: with the CPUs busy, thread hand-offs made a 224 px crop 30× slower.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._sample(item)
        finally:
            torch.set_num_threads(threads)

    def _sample(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        index, epoch = item if isinstance(item, tuple) else (item, None)
        path, label = self.samples[index]
        image = self.images[index] if self.images is not None else load_rgb(path)
        if epoch is None:  # validation: a fixed transform, nothing to seed
            pixels = self.transform(image)
        else:
            with torch.random.fork_rng(devices=[]):  # the CPU generator only: torch.manual_seed costs 5× more
                torch.default_generator.manual_seed(draw_seed(self.seed, epoch, index))
                pixels = self.transform(image)
        # Decoded pixels arrive channels-last (HWC); collating those into a batch was 300× slower than
        # collating contiguous ones, so the copy is made here, on this one thread.
        return pixels.contiguous(), label, index


class EpochSampler(Sampler):
    """Shuffles with a permutation drawn from (seed, epoch) and yields ``(index, epoch)`` pairs.

    The order of an epoch does not depend on how many epochs ran before in this process, so a run
    resumed from a checkpoint sees exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(draw_seed(self.seed, self.epoch)))
        return iter([(int(i), self.epoch) for i in order])


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


def normalize(images: torch.Tensor) -> torch.Tensor:
    """A batch of uint8 pixels as the networks' input: floats in [0, 1], ImageNet-normalised.

    Loaders ship uint8 (a quarter of the bytes of float32 to collate and copy to the GPU) and this
    runs after the copy, on the device. Float batches are taken as already normalised.
    """
    if images.dtype != torch.uint8:
        return images
    return TF.normalize(TF.to_dtype(images, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)


class ImageFolderDataModule(pl.LightningDataModule):
    """Train and validation loaders over an ImageFolder, scanned and checked on construction."""

    def __init__(self, data_dir: str | Path, image_size: int = 224, batch_size: int = 64,
                 num_workers: int = 2, val_fraction: float = 0.2, num_classes: int | None = None,
                 min_crop_scale: float = 0.08, hflip: bool = True, seed: int = 0,
                 skip_bad_images: bool = False, image_cache: str | Path | None = None) -> None:
        super().__init__()
        self.layout = scan_image_folder(data_dir, val_fraction, num_classes)
        self.skipped = find_bad_images(self.layout.train + self.layout.val, decode=skip_bad_images)
        if self.skipped and not skip_bad_images:
            path, reason = self.skipped[0]
            raise KDError(f"--data_dir: cannot read image {path} ({reason}); remove it, or pass --skip_bad_images "
                          "to check every image and train on the rest")
        if self.skipped:
            bad = {path for path, _ in self.skipped}
            self.layout.train = [s for s in self.layout.train if s[0] not in bad]
            self.layout.val = [s for s in self.layout.val if s[0] not in bad]
            warn(f"--skip_bad_images: skipping {len(bad)} unreadable image(s), e.g. {self.skipped[0][0]}")
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.min_crop_scale, self.hflip, self.seed = min_crop_scale, hflip, seed
        self.sampler = EpochSampler(0, seed)  # replaced by each train_dataloader()
        self.image_cache = Path(image_cache).expanduser() if image_cache else None
        self.images: dict[str, ImageCache] = {}

    @property
    def cache_short_side(self) -> int:
        """The short side images are cached at: the validation resize, so crops keep their detail."""
        return round(self.image_size * 256 / 224)

    def prepare_data(self) -> None:
        """Decode the images into --image_cache once (Lightning calls this on one process per machine)."""
        if self.image_cache is not None and not self.images:
            self.setup()

    def setup(self, stage: str | None = None) -> None:
        """Open (building if needed) the decoded-image caches of both splits."""
        if self.image_cache is not None and not self.images:
            self.images = {split: ImageCache.build([path for path, _ in samples], self.cache_short_side,
                                                   self.image_cache)
                           for split, samples in (("train", self.layout.train), ("val", self.layout.val))}

    def set_seed(self, seed: int) -> None:
        """Draw batch orders and augmentations from ``seed`` (one DataModule serves every seed of a run)."""
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        """Move the training order and augmentations to ``epoch`` (DDP wraps the sampler, so say it here)."""
        self.sampler.set_epoch(epoch)

    @property
    def classes(self) -> list[str]:
        return self.layout.classes

    def _loader(self, samples: list[Sample], transform: v2.Transform, train: bool) -> DataLoader:
        # A last training batch of one image would break BatchNorm: drop it (it is reshuffled next epoch).
        dataset = ImageListDataset(samples, transform, self.seed, self.images.get("train" if train else "val"))
        return DataLoader(dataset, batch_size=self.batch_size,
                          sampler=self.sampler if train else self._val_sampler(dataset), num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
                          drop_last=train and len(samples) % self.batch_size == 1)

    def train_dataloader(self) -> DataLoader:
        transform = train_transform(self.image_size, self.min_crop_scale, self.hflip)
        self.sampler = EpochSampler(len(self.layout.train), self.seed)
        return self._loader(self.layout.train, transform, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.layout.val, val_transform(self.image_size), train=False)

    def on_after_batch_transfer(self, batch: tuple[torch.Tensor, ...], dataloader_idx: int) -> tuple[torch.Tensor, ...]:
        """Normalise the uint8 images on the device they were copied to."""
        images, *rest = batch
        return (normalize(images), *rest)

    def _val_sampler(self, dataset: Dataset) -> Sampler | None:
        """Under DDP, each rank validates its own share with no image repeated (Lightning's default pads)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        return UnrepeatedDistributedSampler(dataset, shuffle=False) if torch.distributed.get_world_size() > 1 else None


def prepare_data(c: Config) -> ImageFolderDataModule:
    """The DataModule of ``--data_dir`` (generating the demo dataset first when it is ``demo``)."""
    data_dir = Path(c.output_dir) / "demo_data" if c.data_dir == "demo" else c.data_dir
    if c.data_dir == "demo":
        make_demo_dataset(data_dir)
    return ImageFolderDataModule(data_dir, c.image_size, c.batch_size, c.num_workers, c.val_fraction,
                                 c.num_classes, c.min_crop_scale, c.hflip, c.seed, c.skip_bad_images, c.image_cache)



# The demo dataset: shapes in colours. Classes that share a shape or a near hue look alike, so a
# teacher's soft targets carry which classes resemble one another, the case distillation is for.
DEMO_SHAPES = ("circle", "ring", "square", "triangle")
DEMO_HUES = {"red": 0.0, "orange": 0.07, "blue": 0.6}
DEMO_VERSION = 1


def _draw_demo_image(shape: str, hue: float, size: int, rng: np.random.Generator) -> Image.Image:
    """One noisy picture of a coloured shape at a random place and scale."""
    base = rng.uniform(0.25, 0.75, 3) * 255
    smooth = np.kron(rng.normal(0, 30, (5, 5, 3)), np.ones((size // 5 + 1, size // 5 + 1, 1)))[:size, :size]
    pixels = np.clip(base + smooth + rng.normal(0, 18, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    colour = colorsys.hsv_to_rgb((hue + rng.normal(0, 0.03)) % 1.0, rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0))
    fill = tuple(int(c * 255) for c in colour)
    r = rng.uniform(0.18, 0.32) * size
    cx, cy = rng.uniform(r, size - r, 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r / 2.5)))
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def make_demo_dataset(root: str | Path, train_per_class: int = 80, val_per_class: int = 50,
                      image_size: int = 40, seed: int = 0) -> Path:
    """Write the demo ImageFolder (train/ and val/ of PNGs) under ``root`` once; reuse it after.

    The images are a pure function of the arguments. The folder is built beside ``root`` and renamed
    into place when complete, so an interrupted generation never leaves a partial dataset behind.
    """
    root = Path(root)
    params = {"version": DEMO_VERSION, "train_per_class": train_per_class, "val_per_class": val_per_class,
              "image_size": image_size, "seed": seed}
    marker = root / "demo.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    if root.exists():
        raise KDError(f"--data_dir demo: {root} exists but is not this demo dataset; move it away")
    classes = [f"{colour}_{shape}" for colour in DEMO_HUES for shape in DEMO_SHAPES]
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        with written_atomically(root) as tmp:
            for split, count, split_seed in (("train", train_per_class, seed), ("val", val_per_class, seed + 1)):
                for label, name in enumerate(classes):
                    folder = tmp / split / name
                    folder.mkdir(parents=True)
                    colour, shape = name.split("_")
                    rng = np.random.default_rng([split_seed, label])
                    for i in range(count):
                        _draw_demo_image(shape, DEMO_HUES[colour], image_size, rng).save(folder / f"{i:04d}.png")
            (tmp / "demo.json").write_text(json.dumps(params))
    except OSError:  # another process (a DDP rank) finished the same dataset first
        if not (marker.is_file() and json.loads(marker.read_text()) == params):
            raise
    return root
