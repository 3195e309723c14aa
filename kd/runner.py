"""Runs the stages of an experiment (teacher, baseline, distill) and summarises them.

Everything a run can get wrong up front (data, architectures, loss, teacher checkpoint, output
folder) is checked before the first stage starts, so a bad flag never costs a trained teacher.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from kd.config import Config, save_config
from kd.data import ImageFolderDataModule, make_demo_dataset
from kd.errors import KDError
from kd.losses import build_loss
from kd.models import build_model, load_weights, read_state_dict
from kd.module import KDModule

STAGES = ("teacher", "baseline", "distill")


@dataclass
class StageResult:
    """What one stage produced: its best validation epoch and where its files are."""

    stage: str
    arch: str
    best_top1: float
    best_top5: float
    best_epoch: int
    seconds: float
    log_dir: Path
    best_checkpoint: Path
    history: list[dict[str, float]] = field(default_factory=list)


class History(pl.Callback):
    """Collects each epoch's validation metrics (sanity checks excluded)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self.epochs.append({"epoch": trainer.current_epoch, **metrics})


def load_teacher(path: str | Path, arch: str, class_names: list[str]) -> nn.Module:
    """A teacher network from a kd checkpoint (or a plain state_dict), refusing one that does not fit."""
    path = Path(path).expanduser()
    flag = "--teacher_checkpoint"
    if not path.is_file():
        raise KDError(f"{flag}: file {path} does not exist")
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True).get("hyper_parameters", {})
    except Exception:  # read_state_dict below reports unreadable files
        meta = {}
    if meta.get("arch", arch) != arch:
        raise KDError(f"{flag}: {path} holds a {meta['arch']} but --teacher_arch is {arch}")
    saved_classes = meta.get("class_names", class_names)
    if list(saved_classes) != list(class_names):
        raise KDError(f"{flag}: {path} was trained on {len(saved_classes)} classes ({', '.join(saved_classes)}) "
                      f"but the data has {len(class_names)} ({', '.join(class_names)})")
    teacher = build_model(arch, len(class_names), flag=flag)
    load_weights(teacher, read_state_dict(path, flag), len(class_names), str(path), flag)
    return teacher


def _devices(devices: str) -> Any:
    return int(devices) if devices.isdigit() else devices


def _flat_hparams(config: Config) -> dict[str, Any]:
    return {k: (" ".join(map(str, v)) if isinstance(v, list) else "none" if v is None else v)
            for k, v in config.to_dict().items()}


class Experiment:
    """One invocation: checks its inputs, then trains the requested stages in order."""

    def __init__(self, config: Config) -> None:
        self.config = c = config
        self.stages = [s for s, on in zip(STAGES, (c.train_teacher, c.baseline, c.distill)) if on]
        if not self.stages:
            raise KDError("nothing to run: pass --train_teacher, --baseline and/or --distill")
        if c.distill and c.train_teacher and c.teacher_checkpoint:
            raise KDError("--teacher_checkpoint and --train_teacher both given: distill from one or the other")
        if c.distill and not (c.train_teacher or c.teacher_checkpoint):
            raise KDError("--distill needs a teacher: add --train_teacher or --teacher_checkpoint PATH")
        data_dir = Path(c.output_dir) / "demo_data" if c.data_dir == "demo" else c.data_dir
        if c.data_dir == "demo":
            make_demo_dataset(data_dir)
        self.data = ImageFolderDataModule(data_dir, c.image_size, c.batch_size, c.num_workers, c.val_fraction,
                                          c.num_classes, c.min_crop_scale)
        classes = self.data.classes
        self.teacher_init = (self._build(c.teacher_arch, c.teacher_weights, "--teacher_weights")
                             if c.train_teacher else None)
        self.student_init = (self._build(c.student_arch, c.student_weights, "--student_weights")
                             if c.baseline or c.distill else None)
        self.kd_loss = build_loss(c.kd_loss, temperature=c.temperature) if c.distill else None
        self.teacher = (load_teacher(c.teacher_checkpoint, c.teacher_arch, classes)
                        if c.distill and c.teacher_checkpoint else None)
        self.root = Path(c.output_dir) / c.experiment_name
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KDError(f"--output_dir: cannot create {self.root}: {exc.strerror}") from None

    def _build(self, arch: str, weights: str | None, flag: str) -> nn.Module:
        """A freshly seeded network, so its initial weights depend on --seed alone."""
        pl.seed_everything(self.config.seed, verbose=False)
        return build_model(arch, len(self.data.classes), weights, flag)

    def run(self) -> list[StageResult]:
        """Train every requested stage; the distill stage uses the teacher trained just before."""
        c, results = self.config, []
        for stage in self.stages:
            if stage == "teacher":
                result = self._fit(stage, c.teacher_arch, self.teacher_init)
                self.teacher = load_teacher(result.best_checkpoint, c.teacher_arch, self.data.classes)
            elif stage == "baseline":
                result = self._fit(stage, c.student_arch, copy.deepcopy(self.student_init))
            else:
                result = self._fit(stage, c.student_arch, copy.deepcopy(self.student_init), self.teacher)
            results.append(result)
        return results

    def _fit(self, stage: str, arch: str, model: nn.Module, teacher: nn.Module | None = None) -> StageResult:
        c = self.config
        pl.seed_everything(c.seed, workers=True, verbose=False)
        module = KDModule(model, arch, self.data.classes, image_size=c.image_size, teacher=teacher,
                          kd_loss=self.kd_loss if teacher is not None else None, kd_loss_name=c.kd_loss,
                          alpha=c.alpha, lr=c.lr, optimizer=c.optimizer, momentum=c.momentum,
                          weight_decay=c.weight_decay, scheduler=c.scheduler, warmup_epochs=c.warmup_epochs)
        logger = TensorBoardLogger(c.output_dir, name=f"{c.experiment_name}/{stage}", default_hp_metric=False)
        log_dir = Path(logger.log_dir)
        log_dir.mkdir(parents=True, exist_ok=False)
        save_config(c, log_dir / "config.yaml")
        history = History()
        checkpoint = ModelCheckpoint(dirpath=log_dir / "checkpoints", filename="best-epoch{epoch:02d}",
                                     monitor="val/top1", mode="max", save_last=True, auto_insert_metric_name=False)
        steps_per_epoch = -(-len(self.data.layout.train) // c.batch_size)
        try:
            trainer = pl.Trainer(max_epochs=c.epochs, accelerator=c.accelerator, devices=_devices(c.devices),
                                 precision=c.precision, logger=logger,
                                 callbacks=[checkpoint, history, LearningRateMonitor("step")],
                                 log_every_n_steps=min(50, steps_per_epoch))
        except (MisconfigurationException, ValueError, RuntimeError) as exc:
            raise KDError(f"--accelerator {c.accelerator} --devices {c.devices} --precision {c.precision}: "
                          f"{str(exc).splitlines()[0]}") from None
        print(f"\n== {stage}: {arch} → {log_dir}", flush=True)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")  # --num_workers is the user's call
            warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # the frozen teacher, on purpose
            trainer.fit(module, datamodule=self.data)
        seconds = time.perf_counter() - start
        best = max(history.epochs, key=lambda e: e["val/top1"])
        logger.log_hyperparams(_flat_hparams(c) | {"stage": stage},
                               {"hp/best_top1": best["val/top1"], "hp/best_top5": best["val/top5"]})
        return StageResult(stage, arch, 100 * best["val/top1"], 100 * best["val/top5"], int(best["epoch"]),
                           seconds, log_dir, Path(checkpoint.best_model_path), history.epochs)


def format_summary(results: list[StageResult]) -> str:
    """The end-of-run table: best top-1/top-5 per stage, time, logs, and the distillation gain."""
    header = ("stage", "model", "top-1 %", "top-5 %", "best epoch", "time", "logs and checkpoints")
    rows = [(r.stage, r.arch, f"{r.best_top1:.2f}", f"{r.best_top5:.2f}", str(r.best_epoch),
             f"{r.seconds:.1f}s", str(r.log_dir)) for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    by_stage = {r.stage: r for r in results}
    if "baseline" in by_stage and "distill" in by_stage:
        gain1 = by_stage["distill"].best_top1 - by_stage["baseline"].best_top1
        gain5 = by_stage["distill"].best_top5 - by_stage["baseline"].best_top5
        lines.append(f"distillation gain over the baseline: {gain1:+.2f} top-1 points, {gain5:+.2f} top-5 points")
    lines.append("each stage's best and last checkpoints are in <logs>/checkpoints; "
                 "view the logs with: tensorboard --logdir " + str(results[0].log_dir.parent.parent))
    return "\n".join(lines)


def run_experiment(config: Config) -> list[StageResult]:
    """Check ``config``, run its stages and print the summary table."""
    results = Experiment(config).run()
    print("\n" + format_summary(results), flush=True)
    return results
