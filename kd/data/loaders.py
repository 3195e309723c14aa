"""Data for training: the seeded dataset and sampler, the DataModule, and make_datamodule(config).

Where images come from is a dataset source's business (:mod:`kd.data.sources`); this module only sees
its class names and two :class:`~kd.data.sources.Split` objects.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torchvision.transforms import v2

from kd.config import Config
from kd.errors import KDError
from kd.data.image_cache import ImageCache
from kd.data.strong import TwoViews, strong_view
from kd.data.transforms import RECIPES, normalize
from kd.seeding import draw_seed
from kd.data.sources.base import (DataSource, DatasetLayout, LoadOptions, Split,  # the package registers the sources
                                  open_source)
from kd.files import printable, shown


class ImageListDataset(Dataset):
    """(image, label, index) triples from a :class:`~kd.data.sources.Split`.

    Indexed by ``(index, epoch)`` (see :class:`EpochSampler`), the random transform of a sample is a
    pure function of (seed, epoch, index): an interrupted run resumes with the very same crops, and
    a teacher-output cache replays them. The index lets losses (CRD) and caches address samples.
    Images come decoded from ``images`` (an :class:`ImageCache` of the split) when given, else from the split.
    """

    def __init__(self, split: Split, transform: v2.Transform, seed: int = 0, images: ImageCache | None = None) -> None:
        self.split, self.transform, self.seed, self.images = split, transform, seed, images

    def __len__(self) -> int:
        return len(self.split)

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
        image = self.images[index] if self.images is not None else self.split.image(index)
        if epoch is None:  # validation: a fixed transform, nothing to seed
            pixels = self.transform(image)
        else:
            with torch.random.fork_rng(devices=[]):  # the CPU generator only: torch.manual_seed costs 5× more
                torch.default_generator.manual_seed(draw_seed(self.seed, epoch, index))
                pixels = self.transform(image)
        # Decoded pixels arrive channels-last (HWC); collating those into a batch was 300× slower than
        # collating contiguous ones, so the copy is made here, on this one thread.
        return pixels.contiguous(), self.split.labels[index], index


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


class ImageDataModule(pl.LightningDataModule):
    """Train and validation loaders over a dataset's two splits (see :func:`make_datamodule`)."""

    def __init__(self, layout: DatasetLayout, image_size: int = 224, batch_size: int = 64, num_workers: int = 2,
                 min_crop_scale: float = 0.08, hflip: bool = True, seed: int = 0,
                 image_cache: str | Path | None = None, augment: str = "imagenet") -> None:
        super().__init__()
        self.layout, self.augment, self.recipe = layout, augment, RECIPES[augment]
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.min_crop_scale, self.hflip, self.seed = min_crop_scale, hflip, seed
        self.sampler = EpochSampler(0, seed)  # replaced by each train_dataloader()
        self.image_cache = Path(image_cache).expanduser() if image_cache else None
        self.images: dict[str, ImageCache] = {}
        self.strong_view = False  # set by the module a stage trains: a loss compares a strongly augmented view

    @property
    def cache_short_side(self) -> int:
        """The short side images are cached at: the validation resize, so crops keep their detail.

        A recipe that does not resize caches them at --image_size (CIFAR's 32 px stay as they are).
        """
        return round(self.image_size * 256 / 224) if self.recipe.resized else self.image_size

    def prepare_data(self) -> None:
        """Decode the images into --image_cache once (Lightning calls this on one process per machine)."""
        if self.image_cache is not None and not self.images:
            self.setup()

    def setup(self, stage: str | None = None) -> None:
        """Open (building if needed) the decoded-image caches of both splits."""
        if self.image_cache is not None and not self.images:
            self.images = {name: ImageCache.build(split, self.cache_short_side, self.image_cache)
                           for name, split in (("train", self.layout.train), ("val", self.layout.val))}

    def set_seed(self, seed: int) -> None:
        """Draw batch orders and augmentations from ``seed`` (one DataModule serves every seed of a run)."""
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        """Move the training order and augmentations to ``epoch`` (DDP wraps the sampler, so say it here)."""
        self.sampler.set_epoch(epoch)

    @property
    def classes(self) -> list[str]:
        return self.layout.classes

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(sample, reason) of each unreadable image left out with --skip_bad_images."""
        return self.layout.skipped

    def _loader(self, split: Split, transform: v2.Transform, train: bool) -> DataLoader:
        # A last training batch of one image would break BatchNorm: drop it (it is reshuffled next epoch).
        dataset = ImageListDataset(split, transform, self.seed, self.images.get("train" if train else "val"))
        return DataLoader(dataset, batch_size=self.batch_size,
                          sampler=self.sampler if train else self._val_sampler(dataset), num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
                          drop_last=train and len(split) % self.batch_size == 1)

    def train_dataloader(self) -> DataLoader:
        transform = self.recipe.train(self.image_size, self.min_crop_scale, self.hflip)
        if self.strong_view:
            transform = TwoViews(transform, strong_view(self.recipe.train(self.image_size, self.min_crop_scale,
                                                                          self.hflip)))
        self.sampler = EpochSampler(len(self.layout.train), self.seed)
        return self._loader(self.layout.train, transform, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.layout.val, self.recipe.val(self.image_size), train=False)

    def on_after_batch_transfer(self, batch: tuple[torch.Tensor, ...], dataloader_idx: int) -> tuple[torch.Tensor, ...]:
        """Normalise the uint8 images on the device they were copied to."""
        images, *rest = batch
        return (normalize(images, self.augment), *rest)

    def _val_sampler(self, dataset: Dataset) -> Sampler | None:
        """Under DDP, each rank validates its own share with no image repeated (Lightning's default pads)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        return UnrepeatedDistributedSampler(dataset, shuffle=False) if torch.distributed.get_world_size() > 1 else None


CACHE_FLAGS = ("--teacher_cache", "--image_cache")


def written_places(c: Config) -> list[tuple[str, Path]]:
    """(flag, folder) of every place run ``c`` writes to: its experiment folder, the caches, an --evaluate export."""
    places = [("--output_dir", Path(c.output_dir) / c.experiment_name),
              *((flag, Path(folder)) for flag, folder in zip(CACHE_FLAGS, (c.teacher_cache, c.image_cache)) if folder)]
    if c.evaluate and c.export:  # written beside the checkpoint evaluated
        places.append(("--export", Path(c.evaluate).parent))
    return places


def check_apart(c: Config, source: DataSource, options: LoadOptions) -> None:
    """Refuse a place kd writes to inside the dataset it reads, or the dataset inside one: the next run would train
    on kd's own checkpoints and plots, as a class named after the folder holding them."""
    for data in source.folders(options):
        data = data.expanduser().resolve()
        for flag, place in written_places(c):
            place = place.expanduser().resolve()
            if place.is_relative_to(data) or data.is_relative_to(place):
                inside = (f"{flag} {shown(place)} lies inside --data_dir {shown(data)}" if place.is_relative_to(data)
                          else f"--data_dir {shown(data)} lies inside {flag} {shown(place)}")
                raise KDError(f"{inside}: kd would read what it writes as images of the dataset; keep them apart")


def make_datamodule(c: Config) -> ImageDataModule:
    """The DataModule of ``--data_dir``: its source's classes and splits, checked, with the loader settings."""
    source, options = open_source(c.data_dir), LoadOptions.from_config(c)
    check_apart(c, source, options)
    for flag, place in written_places(c):  # the caches are folders kd fills: a file there is not one
        if flag in CACHE_FLAGS and place.expanduser().exists() and not place.expanduser().is_dir():
            raise KDError(f"{flag}: {shown(place)} is a file, not a folder for the cache")
    layout = source.load(options)
    if len(layout.classes) < 2:
        raise KDError(f"--data_dir {c.data_dir} holds one class ({printable(layout.classes[0])}): a classifier needs "
                      "two or more")
    if c.num_classes is not None and c.num_classes != len(layout.classes):
        raise KDError(f"--num_classes is {c.num_classes} but {c.data_dir} holds {len(layout.classes)} classes: "
                      f"{', '.join(map(printable, layout.classes))}")
    return ImageDataModule(layout, c.image_size, c.batch_size, c.num_workers, c.min_crop_scale, c.hflip, c.seed,
                           c.image_cache, c.augment)
