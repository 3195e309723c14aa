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
from kd.losses import Loss, loss_terms
from kd.losses.logits import kl_softmax

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
    """Trains ``model``; with a ``teacher`` and ``kd_loss`` the loss is α·distillation + (1−α)·CE.

    The teacher stays frozen in eval mode and is left out of checkpoints, which hold the trained
    network (``model.*``) plus the hyper-parameters that rebuild it (arch, classes, image size).
    """

    def __init__(self, model: nn.Module, arch: str, class_names: list[str], *, image_size: int = 224,
                 teacher: nn.Module | None = None, kd_loss: Loss | None = None, kd_loss_name: str = "",
                 alpha: float = 0.9, lr: float = 0.05, optimizer: str = "sgd",
                 momentum: float = 0.9, weight_decay: float = 5e-4, scheduler: str = "cosine",
                 warmup_epochs: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "teacher", "kd_loss"], logger=False)
        self.model = model
        self.teacher = teacher
        self.kd_loss = kd_loss
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        num_classes = len(class_names)
        top5 = min(5, num_classes)
        self.train_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.train_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")

    @property
    def distilling(self) -> bool:
        return self.teacher is not None and self.kd_loss is not None

    def train(self, mode: bool = True) -> KDModule:
        """Switch the trained network's mode; the teacher always stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        ce = F.cross_entropy(logits, y)
        terms = {"ce": ce}
        loss = ce
        if self.distilling:
            kd_terms = loss_terms(self.hparams.kd_loss_name, self.kd_loss(logits, self._teacher_logits(x), y))
            kd = sum(kd_terms.values())
            alpha = self.hparams.alpha
            loss = alpha * kd + (1 - alpha) * ce
            terms |= {f"kd/{name}": value for name, value in kd_terms.items()}
        if not torch.isfinite(loss):
            term = next((name for name, value in terms.items() if not torch.isfinite(value)), "the total")
            raise NonFiniteLoss(f"the loss became {loss.item()} at step {self.global_step} (epoch "
                                f"{self.current_epoch}), first in {term}; usual causes: too high --lr, "
                                "--precision 16-mixed overflowing, or a loss dividing by zero")
        self.train_top1(logits, y)
        self.train_top5(logits, y)
        log = {"batch_size": len(y), "on_step": True, "on_epoch": True, "sync_dist": True}
        self.log("train/loss", loss, prog_bar=True, **log)
        self.log_dict({f"train/{name}": value.detach() for name, value in terms.items()}, **log)
        self.log("train/top1", self.train_top1, **log)
        self.log("train/top5", self.train_top5, **log)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.model(x)
        self.val_top1(logits, y)
        self.val_top5(logits, y)
        log = {"batch_size": len(y), "on_epoch": True, "sync_dist": True}  # averaged over every rank's share
        self.log("val/loss", F.cross_entropy(logits, y), **log)
        self.log("val/top1", self.val_top1, prog_bar=True, **log)
        self.log("val/top5", self.val_top5, **log)
        if self.teacher is not None:
            teacher = self._teacher_logits(x)
            agreement = (logits.argmax(1) == teacher.argmax(1)).float().mean()
            self.log("val/teacher_agreement", agreement, **log)
            self.log("val/teacher_kl", kl_softmax(logits, teacher, 1.0), **log)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        loss_params = self.kd_loss.parameters() if isinstance(self.kd_loss, nn.Module) else []
        trained = [*self.model.parameters(), *loss_params]
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
