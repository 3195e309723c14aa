"""The training step as a plain ``nn.Module``: a student, and what it learns from (labels, a teacher, a cache).

A :class:`Distiller` is testable without a Trainer: :meth:`Distiller.step` returns the student's
logits, the loss and its named terms for one batch (as mdistiller's ``Distiller.forward_train`` and
timm's task modules do). The LightningModule around it (:mod:`kd.train.module`) only logs, steps and saves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kd.train.ema import weight_average
from kd.errors import KDError
from kd.train.hooks import Connector, FeatureHooks
from kd.train.mixing import BatchMixing, hard_labels

if TYPE_CHECKING:  # built by the stage builder and handed in; the step only calls them
    from kd.losses.objective import Objective
    from kd.train.teacher_cache import TeacherCache

Shapes = dict[str, tuple[int, ...]]


class Step(NamedTuple):
    """One batch through a distiller: the student's logits, the training loss and its unweighted terms."""

    logits: torch.Tensor
    loss: torch.Tensor
    terms: dict[str, torch.Tensor]


class Distiller(nn.Module):
    """Trains ``model`` on labels alone, or, with a teacher (or its cached logits) and an objective, distils it;
    ``teacher_free`` objectives (USKD, TF-KD) distil without one, their losses getting None as the teacher's logits.

    The teacher stays frozen in eval mode and runs under ``torch.inference_mode``. Feature losses get
    the outputs of ``student_layers`` / ``teacher_layers`` (hooked by ``named_modules()`` name); the
    losses that compare them element by element get the student's through a trained connector.
    ``mixing`` mixes training batches (see :meth:`mix`); ``ema_decay`` keeps an exponential moving average
    of the student's weights (``ema``), which is then the network the stage delivers (:meth:`forward`).
    """

    def __init__(self, model: nn.Module, *, teacher: nn.Module | None = None, objective: Objective | None = None,
                 teacher_cache: TeacherCache | None = None, student_layers: list[str] | None = None,
                 teacher_layers: list[str] | None = None, feature_shapes: tuple[Shapes, Shapes] | None = None,
                 label_smoothing: float = 0.0, mixing: BatchMixing | None = None, ema_decay: float | None = None,
                 channels_last: bool = False, compile: bool = False, teacher_free: bool = False,
                 init_phase: bool = False) -> None:
        super().__init__()
        self.init_phase = init_phase  # the stage before distillation that trains only the losses' init_loss
        self.ema = weight_average(model, ema_decay) if ema_decay else None  # copied before hooks and compiling
        self.model, self.teacher, self.objective, self.teacher_cache = model, teacher, objective, teacher_cache
        self.label_smoothing, self.mixing, self.teacher_free = label_smoothing, mixing, teacher_free
        self.peers = nn.ModuleList()  # networks trained beside the student: see kd.train.mutual
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        features = objective is not None and objective.needs_features
        self.student_hooks = FeatureHooks(model, student_layers or [], "--student_layers") if features else None
        self.teacher_hooks = (FeatureHooks(teacher, teacher_layers or [], "--teacher_layers")
                              if features and teacher is not None else None)
        self.connectors = nn.ModuleList(
            Connector(source, target) for source, target in zip(*(shapes.values() for shapes in feature_shapes))
        ) if objective is not None and objective.needs_connectors and feature_shapes else None
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        for network in (model, teacher, self.connectors, self.ema):
            if network is not None:
                network.to(memory_format=self.memory_format)
                if compile and (network is model or network is teacher):
                    network.compile()
        if objective is not None:  # what this phase does not train stays frozen (FT's paraphraser after its phase)
            trained = {id(p) for p in self.trained_parameters()}
            for parameter in objective.parameters():
                parameter.requires_grad_(id(parameter) in trained)
        self.train()  # each part in its mode: Lightning keeps the modes it finds (a teacher's, an untrained student's)

    @property
    def has_teacher(self) -> bool:
        return self.teacher is not None or self.teacher_cache is not None

    @property
    def learns_from_objective(self) -> bool:
        """Whether the objective trains the student: with a teacher (or its cache), or with losses needing none."""
        return self.objective is not None and (self.has_teacher or self.teacher_free)

    @property
    def distilling(self) -> bool:
        """Whether the student learns from more than labels (subclasses add other sources: peers)."""
        return self.learns_from_objective

    def trained_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates: the student, the connectors and the losses' own parameters; in the init phase,
        what the init losses train (the student only if one of them trains it)."""
        connectors = list(self.connectors.parameters()) if self.connectors is not None else []
        if self.objective is None:
            return list(self.model.parameters())
        if self.init_phase:
            student = list(self.model.parameters()) if self.objective.init_trains_student else []
            return student + connectors + self.objective.init_parameters()
        return list(self.model.parameters()) + connectors + self.objective.main_parameters()

    def load_parts(self, parts: dict[str, dict[str, torch.Tensor]]) -> None:
        """Start from where an init phase left the losses' modules and the connectors (the student is loaded before
        the distiller is built, so its weight average starts from it too)."""
        for name, part in (("objective", self.objective), ("connectors", self.connectors)):
            if part is not None:
                part.load_state_dict(parts.get(name, {}))

    def train(self, mode: bool = True) -> Distiller:
        """Switch the student's mode; the teacher always stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        if self.init_phase and not self.objective.init_trains_student:  # untrained, its BN statistics stay as they are
            self.model.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of the network the stage delivers: the student, or the average of its weights."""
        if self.ema is None:
            return self.raw_logits(x)
        return self.ema(x.contiguous(memory_format=self.memory_format))

    def raw_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The student's own logits (hooked features are dropped: they are for the training loss)."""
        logits = self.model(x.contiguous(memory_format=self.memory_format))
        if self.student_hooks is not None:
            self.student_hooks.take()
        return logits

    def update_average(self) -> None:
        """Move the average of the student's weights toward them (after each optimiser step); without one, nothing."""
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def mix(self, x: torch.Tensor, y: torch.Tensor, epoch: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch both networks see, and its targets: mixed as a function of (seed, ``epoch``,
        ``batch``) with --mixup/--cutmix (label distributions), else ``x`` and ``y`` as they are."""
        return (x, y) if self.mixing is None else self.mixing(x, y, epoch, batch)

    def teacher_outputs(self, x: torch.Tensor, indices: torch.Tensor,
                        epoch: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The teacher's logits (from the cache when it has them) and hooked features for a batch.

        ``epoch`` None means the validation set. Outputs computed under inference mode are cloned into
        ordinary tensors, which autograd may save for the student's backward pass.
        """
        cached = self.teacher_cache.lookup(epoch, indices) if self.teacher_cache is not None else None
        if cached is not None:
            return cached.to(x.device), {}
        if self.teacher is None:
            raise KDError(f"--teacher_cache has no teacher logits for some images of "
                          f"{self.teacher_cache.split_name(epoch)}, and the teacher was not loaded")
        with torch.inference_mode():
            logits = self.teacher(x)
            features = self.teacher_hooks.take() if self.teacher_hooks is not None else {}
        logits, features = logits.clone(), {name: f.clone() for name, f in features.items()}
        stored = self.teacher_cache.record(epoch, indices, logits) if self.teacher_cache is not None else None
        return (logits if stored is None else stored.to(logits.device)), features

    def step(self, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, epoch: int) -> Step:
        """The student's logits, the training loss and its named terms for one batch.

        ``y`` holds labels, or label distributions (a batch from :meth:`mix`): the cross-entropy compares
        the student with them, and the distillation losses get each image's larger share as its label.
        """
        x, strong = (x[:, 0], x[:, 1]) if x.dim() == 5 else (x, None)  # a second, strongly augmented view (MLKD)
        x = x.contiguous(memory_format=self.memory_format)
        logits = self.model(x)
        if not self.learns_from_objective:
            return Step(logits, *self.label_loss(logits, y))
        student_features = self.student_hooks.take() if self.student_hooks is not None else {}
        teacher_logits, teacher_features = self.teacher_outputs(x, indices, epoch) if self.has_teacher else (None, {})
        connected = ({name: connector(f) for (name, f), connector in zip(student_features.items(), self.connectors)}
                     if self.connectors is not None else {})
        if self.init_phase:
            return Step(logits, *self.objective.init_step(student_features, teacher_features, connected))
        loss, terms = self.objective(logits, teacher_logits, hard_labels(y), targets=y,
                                     student_features=student_features, teacher_features=teacher_features,
                                     connected_features=connected, indices=indices, epoch=epoch,
                                     strong_view=self.strong_logits(strong) if strong is not None else None)
        return Step(logits, loss, terms)

    def strong_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's and the teacher's logits of a batch's strong view (the teacher run, never cached); the
        features hooked on the way are dropped: feature losses compare the first view's."""
        x = x.contiguous(memory_format=self.memory_format)
        student = self.model(x)
        with torch.inference_mode():
            teacher = self.teacher(x)
        for hooks in (self.student_hooks, self.teacher_hooks):
            if hooks is not None:
                hooks.take()
        return student, teacher.clone()

    @property
    def wants_strong_view(self) -> bool:
        """Whether a loss compares a second, strongly augmented view of each training image (MLKD)."""
        return self.learns_from_objective and self.objective.needs_strong_view

    def label_loss(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The cross-entropy on labels (or label distributions) alone, and its term: training without an objective."""
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return loss, {"ce": loss}

    def check_step(self, image_size: int, num_classes: int) -> None:
        """Run the loss once on random images in eval mode (no statistics or memory banks change).

        Every distillation term must depend on the student: a loss that ignores it would train nothing.
        """
        was_training, cache, self.teacher_cache = self.training, self.teacher_cache, None
        self.eval()
        try:
            views = (2,) if self.wants_strong_view else ()
            x, y = self.mix(torch.randn(2, *views, 3, image_size, image_size), torch.tensor([0, num_classes - 1]), 0, 0)
            _, _, terms = self.step(x, y, torch.tensor([0, 1]), 0)
        finally:
            self.train(was_training)
            self.teacher_cache = cache
        for name, value in terms.items():
            if name.startswith(("kd/", "init/")) and not value.requires_grad:
                key = name.split("/")[1]
                what = "its init phase's loss does not depend on what that phase trains" if name.startswith(
                    "init/") else "its value does not depend on the student's logits or features"
                raise KDError(f"--kd_loss {key}: {what} (no gradient)")

    def remove_hooks(self) -> None:
        """Detach the feature hooks: the teacher is shared by later stages, which hook it themselves."""
        for hooks in (self.student_hooks, self.teacher_hooks):
            if hooks is not None:
                hooks.remove()
