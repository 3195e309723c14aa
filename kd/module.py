"""The LightningModule: one network trained on labels, or distilled from a frozen teacher."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler
from torchmetrics.classification import MulticlassAccuracy

from kd.errors import KDError
from kd.features import Connector, FeatureHooks
from kd.losses.logits import kl_softmax
from kd.losses.objective import Objective
from kd.teacher_cache import TeacherCache

OPTIMIZERS = {
    "sgd": lambda params, lr, momentum, wd: torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd),
    "adam": lambda params, lr, momentum, wd: torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999),
                                                              weight_decay=wd),
    "adamw": lambda params, lr, momentum, wd: torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999),
                                                                weight_decay=wd),
}
SCHEDULERS = {
    "cosine": lambda opt, steps: lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps)),
    "step": lambda opt, steps: lr_scheduler.MultiStepLR(opt, milestones=[steps // 2, steps * 3 // 4], gamma=0.1),
    "none": lambda opt, steps: lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0),
}
TEACHER_PREFIX = "teacher."


class NonFiniteLoss(KDError):
    """The training loss became NaN or infinite; the message names the step and the term."""


class KDModule(pl.LightningModule):
    """Trains ``model``; with a teacher (or its cached outputs) and an ``objective``, distils it.

    The teacher stays frozen in eval mode, runs under ``torch.inference_mode`` and is left out of
    checkpoints, which hold the trained network (``model.*``), the connectors and loss parameters,
    and the hyper-parameters that rebuild the network (arch, classes, image size).
    """

    def __init__(self, model: nn.Module, arch: str, class_names: list[str], *, image_size: int = 224,
                 teacher: nn.Module | None = None, objective: Objective | None = None,
                 student_layers: list[str] | None = None, teacher_layers: list[str] | None = None,
                 feature_shapes: tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]] | None = None,
                 teacher_cache: TeacherCache | None = None, lr: float = 0.05, optimizer: str = "sgd",
                 momentum: float = 0.9, weight_decay: float = 5e-4, scheduler: str = "cosine",
                 warmup_epochs: float = 0.0, channels_last: bool = False, compile: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "teacher", "objective", "teacher_cache", "feature_shapes"],
                                  logger=False)
        self.model, self.teacher, self.objective, self.teacher_cache = model, teacher, objective, teacher_cache
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
        for network in (model, teacher, self.connectors):
            if network is not None:
                network.to(memory_format=self.memory_format)
                if compile and network is not self.connectors:
                    network.compile()
        num_classes = len(class_names)
        top5 = min(5, num_classes)
        self.train_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.train_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")

    @property
    def distilling(self) -> bool:
        return self.objective is not None and self.has_teacher

    @property
    def has_teacher(self) -> bool:
        return self.teacher is not None or self.teacher_cache is not None

    def train(self, mode: bool = True) -> KDModule:
        """Switch the trained network's mode; the teacher always stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=self.memory_format))

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
                          f"{TeacherCache.split_name(epoch)}, and the teacher was not loaded")
        with torch.inference_mode():
            logits = self.teacher(x)
            features = self.teacher_hooks.take() if self.teacher_hooks is not None else {}
        logits, features = logits.clone(), {name: f.clone() for name, f in features.items()}
        stored = self.teacher_cache.record(epoch, indices, logits) if self.teacher_cache is not None else None
        return (logits if stored is None else stored.to(logits.device)), features

    def _loss(self, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor,
              epoch: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The student's logits, the training loss and its named terms for one batch."""
        logits = self.model(x)
        if not self.distilling:
            loss = F.cross_entropy(logits, y)
            return logits, loss, {"ce": loss}
        student_features = self.student_hooks.take() if self.student_hooks is not None else {}
        teacher_logits, teacher_features = self.teacher_outputs(x, indices, epoch)
        connected = ({name: connector(f) for (name, f), connector in zip(student_features.items(), self.connectors)}
                     if self.connectors is not None else {})
        loss, terms = self.objective(logits, teacher_logits, y, student_features=student_features,
                                     teacher_features=teacher_features, connected_features=connected,
                                     indices=indices, epoch=epoch)
        return logits, loss, terms

    def check_step(self, image_size: int) -> None:
        """Run the loss once on random images in eval mode (no statistics or memory banks change).

        Every distillation term must depend on the student: a loss that ignores it would train nothing.
        """
        was_training, cache, self.teacher_cache = self.training, self.teacher_cache, None
        self.eval()
        try:
            x = torch.randn(2, 3, image_size, image_size).contiguous(memory_format=self.memory_format)
            labels = torch.tensor([0, len(self.hparams.class_names) - 1])
            _, _, terms = self._loss(x, labels, torch.tensor([0, 1]), 0)
        finally:
            self.train(was_training)
            self.teacher_cache = cache
        for name, value in terms.items():
            if name.startswith("kd/") and not value.requires_grad:
                key = name.split("/")[1]
                raise KDError(f"--kd_loss {key}: its value does not depend on the student's logits or features "
                              "(no gradient)")

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y, indices = batch
        logits, loss, terms = self._loss(x.contiguous(memory_format=self.memory_format), y, indices,
                                         self.current_epoch)
        if not torch.isfinite(loss):
            term = next((name for name, value in terms.items() if not torch.isfinite(value)), "the total")
            raise NonFiniteLoss(f"the loss became {loss.item()} at step {self.global_step} (epoch "
                                f"{self.current_epoch}), first in {term}; usual causes: too high --lr, "
                                "--precision 16-mixed overflowing, or a loss dividing by zero")
        # Training accuracy per epoch: update() skips the per-step value that calling the metric computes.
        self.train_top1.update(logits.detach(), y)
        self.train_top5.update(logits.detach(), y)
        log = {"batch_size": len(y), "on_step": True, "on_epoch": True, "sync_dist": True}
        self.log("train/loss", loss, prog_bar=True, **log)
        self.log_dict({f"train/{name}": value.detach() for name, value in terms.items()}, **log)
        self.log("train/top1", self.train_top1, **(log | {"on_step": False}))
        self.log("train/top5", self.train_top5, **(log | {"on_step": False}))
        return loss

    def on_train_epoch_start(self) -> None:
        """Log each term's weight beside it (constant unless a loss warms up inside)."""
        if self.distilling:
            weights = {"ce": self.objective.ce_weight} | {f"kd/{k}": w for k, w in self.objective.weights.items()}
            self.log_dict({f"weight/{name}": float(w) for name, w in weights.items()}, on_epoch=True, on_step=False)

    def remove_hooks(self) -> None:
        """Detach the feature hooks: the teacher is shared by later stages, which hook it themselves."""
        for hooks in (self.student_hooks, self.teacher_hooks):
            if hooks is not None:
                hooks.remove()

    def teardown(self, stage: str) -> None:
        self.remove_hooks()

    def on_train_epoch_end(self) -> None:
        if self.teacher_cache is not None:
            self.teacher_cache.commit(self.current_epoch)

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        x, y, indices = batch
        x = x.contiguous(memory_format=self.memory_format)
        logits = self.model(x)
        if self.student_hooks is not None:
            self.student_hooks.take()  # features are for training; drop them
        self.val_top1(logits, y)
        self.val_top5(logits, y)
        log = {"batch_size": len(y), "on_epoch": True, "sync_dist": True}  # averaged over every rank's share
        self.log("val/loss", F.cross_entropy(logits, y), **log)
        self.log("val/top1", self.val_top1, prog_bar=True, **log)
        self.log("val/top5", self.val_top5, **log)
        if self.has_teacher:
            teacher, _ = self.teacher_outputs(x, indices, None)
            agreement = (logits.argmax(1) == teacher.argmax(1)).float().mean()
            self.log("val/teacher_agreement", agreement, **log)
            self.log("val/teacher_kl", kl_softmax(logits, teacher, 1.0), **log)

    def on_validation_epoch_end(self) -> None:
        if self.teacher_cache is not None and not self.trainer.sanity_checking:
            self.teacher_cache.commit(None)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        extra = [part for part in (self.objective, self.connectors) if part is not None]
        trained = [*self.model.parameters(), *(p for part in extra for p in part.parameters())]
        optimizer = OPTIMIZERS[hp.optimizer](trained, hp.lr, hp.momentum, hp.weight_decay)
        total = self.trainer.estimated_stepping_batches
        warmup = min(int(hp.warmup_epochs * total / max(1, self.trainer.max_epochs)), total - 1)
        schedule = SCHEDULERS[hp.scheduler](optimizer, total - warmup)
        if warmup > 0:
            ramp = lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), total_iters=warmup)
            schedule = lr_scheduler.SequentialLR(optimizer, [ramp, schedule], milestones=[warmup])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the frozen teacher out of the checkpoint: it is not what this stage trained."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(TEACHER_PREFIX)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume with the teacher this module holds, since checkpoints leave it out."""
        if self.teacher is not None:
            checkpoint["state_dict"].update({TEACHER_PREFIX + k: v for k, v in self.teacher.state_dict().items()})
