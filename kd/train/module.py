"""The LightningModule around a :class:`~kd.train.distiller.Distiller`: metrics, logging, optimiser, checkpoints."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from kd.train.ema import saved_layout, training_layout
from kd.train.teachers import TeacherEnsemble
from kd.errors import KDError
from kd.losses.logits import kl_softmax
from kd.train.mixing import hard_labels
from kd.train.optim import OptimSettings, check_dot_backward, distillation_gradients

if TYPE_CHECKING:  # the stage builder makes it; this module only runs its step
    from kd.train.distiller import Distiller

DISTILLER_PREFIX = "distiller."
TEACHER_PREFIX = "teacher."


def _agreement(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The percentage of samples whose top class is the target's: ``targets`` are labels, or other logits."""
    return 100 * (logits.argmax(1) == (targets.argmax(1) if targets.dim() == 2 else targets)).float().mean()


def _accuracy(num_classes: int, top_k: int) -> Metric:
    """Top-k accuracy in percent: the unit of the console, TensorBoard, result.json and the reports."""
    return 100 * MulticlassAccuracy(num_classes, top_k=top_k, average="micro")


class NonFiniteLoss(KDError):
    """The training loss became NaN or infinite; the message names the step and the term."""


class KDModule(pl.LightningModule):
    """Trains a distiller's student with Lightning, logging every loss term and top-1/top-5.

    Checkpoints hold the trained network (``model.*``), the connectors and loss parameters, but not
    the frozen teacher, plus the hyper-parameters that rebuild the network (arch, classes, image size).
    """

    def __init__(self, distiller: Distiller, arch: str, class_names: list[str], *, image_size: int = 224,
                 augment: str = "imagenet", optim: OptimSettings | None = None) -> None:
        super().__init__()
        optim = optim or OptimSettings()
        self.save_hyperparameters({"arch": arch, "class_names": list(class_names), "image_size": image_size,
                                   "augment": augment, "optim": asdict(optim)}, logger=False)
        self.distiller, self.optim = distiller, optim
        num_classes = len(class_names)
        top5 = min(5, num_classes)
        self.train_top1, self.train_top5 = _accuracy(num_classes, 1), _accuracy(num_classes, top5)
        self.val_top1, self.val_top5 = _accuracy(num_classes, 1), _accuracy(num_classes, top5)
        if distiller.ema is not None:  # val/top1 measures the average: the raw weights are measured beside it
            self.raw_top1, self.raw_top5 = _accuracy(num_classes, 1), _accuracy(num_classes, top5)
        self.peer_top1 = torch.nn.ModuleList(_accuracy(num_classes, 1) for _ in distiller.peers)
        self.peer_top5 = torch.nn.ModuleList(_accuracy(num_classes, top5) for _ in distiller.peers)

    @property
    def model(self) -> torch.nn.Module:
        """The network this stage trains."""
        return self.distiller.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.distiller(x)

    def setup(self, stage: str) -> None:
        """Ask the data for a second, strongly augmented view of each training image when a loss compares one."""
        if self.trainer.datamodule is not None:
            self.trainer.datamodule.strong_view = self.distiller.wants_strong_view

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y, indices = batch
        x, targets = self.distiller.mix(x, y, self.current_epoch, batch_idx)  # the batch both networks see
        logits, loss, terms = self.distiller.step(x, targets, indices, self.current_epoch)
        y = hard_labels(targets)  # what training accuracy compares with: a mixed image's larger share
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
        if self.optim.optimizer == "dot" and self.distiller.learns_from_objective:
            return self._dot_cross_entropy(terms)
        return loss

    def _dot_cross_entropy(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """For ``--optimizer dot``: hand the optimiser the distillation part's gradient, and return the
        cross-entropy part, whose gradient Lightning's backward pass computes (loss scaling and DDP included).

        Under a loss scaler (16-mixed), a non-finite distillation gradient makes the returned part NaN, so that
        the scaler skips the step and lowers its scale, as it does when the summed loss overflows.
        """
        ce, distillation = self.distiller.objective.split(terms)
        if distillation is None:
            return ce
        optimizer = self.trainer.optimizers[0]
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        mean = (lambda t: self.trainer.strategy.reduce(t, reduce_op="mean")) if self.trainer.world_size > 1 else None
        grads = distillation_gradients(distillation, params, scaler.get_scale() if scaler is not None else 1.0, mean)
        optimizer.hold_distillation_gradients(params, grads)
        if scaler is None:
            return ce
        finite = torch.stack([g.isfinite().all() for g in grads if g is not None]).all()
        return ce * torch.where(finite, 1.0, float("nan"))

    def on_train_epoch_start(self) -> None:
        """Log each term's weight beside it (constant unless a loss warms up inside)."""
        objective = self.distiller.objective
        if self.distiller.learns_from_objective:
            weights = {"ce": objective.ce_weight} | {f"kd/{k}": w for k, w in objective.weights.items()}
            self.log_dict({f"weight/{name}": float(w) for name, w in weights.items()}, on_epoch=True, on_step=False)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.distiller.update_average()

    def on_train_epoch_end(self) -> None:
        if self.distiller.teacher_cache is not None and self.trainer.world_size == 1:
            self._commit_cache(self.current_epoch)  # several processes save it after validation (see below)

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        x, y, indices = batch
        logits = self.distiller(x)
        self.val_top1(logits, y)
        self.val_top5(logits, y)
        log = {"batch_size": len(y), "on_epoch": True, "sync_dist": True}  # averaged over every rank's share
        self.log("val/loss", F.cross_entropy(logits, y), **log)
        self.log("val/top1", self.val_top1, prog_bar=True, **log)
        self.log("val/top5", self.val_top5, **log)
        if self.distiller.ema is not None:
            raw = self.distiller.raw_logits(x)
            self.raw_top1(raw, y)
            self.raw_top5(raw, y)
            self.log("val/raw_top1", self.raw_top1, prog_bar=True, **log)
            self.log("val/raw_top5", self.raw_top5, **log)
        for number, (peer, top1, top5) in enumerate(zip(self.distiller.peer_logits(x) if self.distiller.peers else [],
                                                        self.peer_top1, self.peer_top5), start=1):
            top1(peer, y)
            top5(peer, y)
            self.log(f"val/peer{number}/loss", F.cross_entropy(peer, y), **log)
            self.log(f"val/peer{number}/top1", top1, **log)
            self.log(f"val/peer{number}/top5", top5, **log)
        if self.distiller.has_teacher:
            ensemble = self.distiller.teacher if isinstance(self.distiller.teacher, TeacherEnsemble) else None
            if ensemble is not None:
                ensemble.member_logits = []  # refilled by this batch's forward, never left from another
            teacher, _ = self.distiller.teacher_outputs(x, indices, None)
            if ensemble is not None and not ensemble.member_logits:  # cached logits: run the loaded teachers anyway
                with torch.inference_mode():
                    ensemble(x)
            self.log("val/teacher_agreement", _agreement(logits, teacher), **log)
            self.log("val/teacher_kl", kl_softmax(logits, teacher, 1.0), **log)
            self.log("val/teacher_top1", _agreement(teacher, y), **log)
            for number, member in enumerate(ensemble.member_logits if ensemble is not None else [], start=1):
                self.log(f"val/teacher{number}_agreement", _agreement(logits, member), **log)
                self.log(f"val/teacher{number}_top1", _agreement(member, y), **log)

    def on_validation_epoch_end(self) -> None:
        if self.distiller.teacher_cache is not None and not self.trainer.sanity_checking:
            self._commit_cache(self.current_epoch)  # the epoch's training is over: every sample is recorded
            self._commit_cache(None)

    def _commit_cache(self, epoch: int | None) -> None:
        """Save the teacher cache's ``epoch`` (None: validation), every process's share of it.

        Under DDP the processes meet at barriers here, so this runs at the end of validation: at the end of the
        training epoch rank 0's progress bar reduces the epoch's metrics before the others do, and a barrier
        between would wait for ever."""
        strategy = self.trainer.strategy
        self.distiller.teacher_cache.commit(epoch, strategy.global_rank, strategy.world_size, strategy.barrier)

    def teardown(self, stage: str) -> None:
        self.distiller.remove_hooks()

    def configure_optimizers(self) -> Any:
        if self.optim.optimizer == "dot" and self.distiller.learns_from_objective:
            student = set(self.model.parameters())
            check_dot_backward(self.trainer.strategy.model,
                               [p for p in self.distiller.trained_parameters() if p not in student])
        return self.optim.configure(self.distiller.trained_parameters(), self.trainer.estimated_stepping_batches,
                                    self.trainer.max_epochs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the flat layout kd checkpoints have (``model.*``, ``connectors.*``), without the frozen teacher."""
        state = checkpoint["state_dict"]
        for key in list(state):
            value = state.pop(key)
            key = key.removeprefix(DISTILLER_PREFIX)
            if not key.startswith(TEACHER_PREFIX):
                state[key] = value
        if self.distiller.ema is not None:  # the average is the network (model.*), the raw weights beside it
            checkpoint["state_dict"] = saved_layout(state)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Read the flat layout back, with the teacher this module holds (checkpoints leave it out)."""
        if self.distiller.ema is not None:
            checkpoint["state_dict"] = training_layout(checkpoint["state_dict"])
        state = checkpoint["state_dict"]
        for key in list(state):
            state[DISTILLER_PREFIX + key] = state.pop(key)
        if self.distiller.teacher is not None:
            teacher = self.distiller.teacher.state_dict()
            state.update({DISTILLER_PREFIX + TEACHER_PREFIX + k: v for k, v in teacher.items()})
