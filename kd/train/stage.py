"""Building one stage: its networks, teacher cache, distiller and LightningModule.

Nothing here writes to disk or trains: the checks build with it to try a run before it starts, and
the runner builds with it to train.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytorch_lightning as pl
from torch import nn

from kd.config import Config, cache_settings
from kd.data.loaders import ImageDataModule
from kd.seeding import draw_seed
from kd.train.distiller import Distiller, Shapes
from kd.train.hooks import feature_shapes
from kd.losses.objective import Objective, build_objective
from kd.losses.spec import resolve_losses
from kd.train.teachers import Teacher, TeacherEnsemble, teacher_archs
from kd.train.mixing import batch_mixing
from kd.models.build import build_model, load_network
from kd.train.module import KDModule
from kd.train.mutual import MutualDistiller
from kd.train.optim import OptimSettings
from kd.train.teacher_cache import TeacherCache, cache_key


class StageBuilder:
    """Builds the parts of a stage from the run's configuration and data."""

    def __init__(self, config: Config, data: ImageDataModule) -> None:
        self.config, self.data = config, data
        self._cache_keys: dict[tuple[Path, int], str] = {}  # hashing the teacher and every file once per run

    def on(self, config: Config, data: ImageDataModule) -> StageBuilder:
        """A builder of the same kind for other settings and data (a tune's trials on its slice)."""
        return type(self)(config, data)

    @property
    def classes(self) -> list[str]:
        return self.data.classes

    def network(self, arch: str, weights: str | None, flag: str, seed: int) -> nn.Module:
        """A freshly seeded network, so its initial weights depend on the seed alone."""
        pl.seed_everything(seed, verbose=False)
        return build_model(arch, len(self.classes), weights, flag)

    def teacher_cache(self, checkpoints: tuple[Path, ...], seed: int) -> TeacherCache:
        """The teacher-output cache of this run's data, transforms and ``seed`` and the teachers in ``checkpoints``."""
        c, layout = self.config, self.data.layout
        if (checkpoints, seed) not in self._cache_keys:
            settings = cache_settings(replace(c, seed=seed, teacher_arch=teacher_archs(c)))
            if c.mixup or c.cutmix:  # an image is mixed with its neighbour in the batch: the batch size decides it
                settings["batch_size"] = c.batch_size
            self._cache_keys[checkpoints, seed] = cache_key(list(checkpoints), {"train": layout.train,
                                                                                "val": layout.val}, settings)
        sizes = {"train": len(layout.train), "val": len(layout.val)}
        return TeacherCache(c.teacher_cache, self._cache_keys[checkpoints, seed], sizes, len(self.classes),
                            c.teacher_cache_dtype, c.teacher_cache_topk)

    def teacher(self, archs: tuple[str, ...], checkpoints: tuple[Path, ...], weights: tuple[float, ...] = (),
                load: bool = True) -> Teacher:
        """The trained teacher(s) in ``checkpoints``: loaded (an ensemble for several) unless ``load`` is False."""
        network = None
        if load:
            members = [load_network(path, arch, self.classes, self.config.image_size)
                       for arch, path in zip(archs, checkpoints)]
            network = members[0] if len(members) == 1 else TeacherEnsemble(members, list(weights) or None)
        return Teacher(archs, checkpoints, network, weights)

    def distiller(self, model: nn.Module, c: Config, teacher: nn.Module | None,
                  cache: TeacherCache | None, init_phase: bool = False) -> Distiller:
        """The training step of a stage with settings ``c``; distilling when it has a teacher or a teacher cache, or
        when its losses need none (teacher-free: no teacher is run even if one is given); in an ``init_phase``, training
        only its losses' init losses (FSP, AB, FT). With --mutual, the student
        trains beside its peers (each freshly seeded from the stage's seed and its number).

        The objective is built anew for every stage, so a loss's state (CRD's memory bank) never
        carries over from one student to the next.
        """
        options = {"label_smoothing": c.label_smoothing, "ema_decay": c.ema, "channels_last": c.channels_last,
                   "compile": c.compile, "mixing": batch_mixing(c.mixup, c.cutmix, len(self.classes), c.seed)}
        if c.distill and c.mutual:
            peers = [self.network(arch, None, "--mutual", draw_seed(c.seed, number) % 2**32)
                     for number, arch in enumerate(c.mutual, start=1)]
            objective = self._objective(c, None, teacher) if teacher is not None or cache is not None else None
            return MutualDistiller(model, peers, c.mutual_weight, teacher=teacher, teacher_cache=cache,
                                   objective=objective, **options)
        teacher_free = c.distill and resolve_losses(c).teacher_free  # a teacher or baseline stage reads no loss flag
        if teacher is None and cache is None and not teacher_free:
            return Distiller(model, **options)
        shapes = None
        if c.student_layers and (teacher is not None or teacher_free):
            shapes = (feature_shapes(model, c.student_layers, c.image_size, "--student_layers"),
                      feature_shapes(teacher, c.teacher_layers, c.image_size, "--teacher_layers")
                      if teacher is not None else {})
        teacher = None if teacher_free else teacher
        return Distiller(model, teacher=teacher, objective=self._objective(c, shapes, teacher),
                         teacher_cache=None if teacher_free else cache, teacher_free=teacher_free,
                         student_layers=c.student_layers, teacher_layers=c.teacher_layers, feature_shapes=shapes,
                         init_phase=init_phase, **options)

    def _objective(self, c: Config, shapes: tuple[Shapes, Shapes] | None, teacher: nn.Module | None) -> Objective:
        """The losses of run ``c`` with their weights; feature losses sized by the hooked layers' ``shapes``."""
        return build_objective(resolve_losses(c), label_smoothing=c.label_smoothing, num_classes=len(self.classes),
                               num_samples=len(self.data.layout.train), sample_labels=self.data.layout.train.labels,
                               student_shapes=shapes[0] if shapes else {},
                               teacher_shapes=shapes[1] if shapes else {}, teacher_network=teacher)

    def module(self, distiller: Distiller, arch: str, c: Config) -> KDModule:
        """The LightningModule that trains ``distiller``'s student, an ``arch``, with the settings ``c``."""
        return KDModule(distiller, arch, self.classes, image_size=c.image_size, augment=c.augment,
                        optim=OptimSettings.from_config(c))
