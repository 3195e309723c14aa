"""Runs the stages of an experiment (teacher, baseline, distill) and summarises them.

Everything a run can get wrong up front (data, architectures, loss, teacher checkpoint, output
folder) is checked before the first stage starts, so a bad flag never costs a trained teacher.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from kd.config import Config, save_config
from kd.data import ImageFolderDataModule, make_demo_dataset
from kd.errors import KDError
from kd.losses import build_loss, check_loss
from kd.models import build_model, check_forward, load_weights, read_checkpoint
from kd.module import KDModule
from kd.report import comparison_table, gains, group_results, stage_table, write_report
from kd.results import StageResult, find_results

STAGES = ("teacher", "baseline", "distill")


class History(pl.Callback):
    """Collects each epoch's validation metrics (sanity checks excluded)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self.epochs.append({"epoch": trainer.current_epoch, **metrics})


def load_teacher(path: str | Path, arch: str, class_names: list[str], image_size: int) -> nn.Module:
    """A teacher network from a kd checkpoint (or a plain state_dict), refusing one that does not fit."""
    path = Path(path).expanduser()
    flag = "--teacher_checkpoint"
    state, meta = read_checkpoint(path, flag)
    if meta.get("arch", arch) != arch:
        raise KDError(f"{flag}: {path} holds a {meta['arch']} but --teacher_arch is {arch}")
    saved_classes = list(meta.get("class_names", class_names))
    if saved_classes != list(class_names):
        raise KDError(f"{flag}: {path} was trained on {len(saved_classes)} classes ({', '.join(saved_classes)}) "
                      f"but the data has {len(class_names)} ({', '.join(class_names)})")
    teacher = build_model(arch, len(class_names), flag=flag)
    load_weights(teacher, state, len(class_names), str(path), flag, new_head=False)
    check_forward(teacher, arch, image_size, len(class_names), flag, training=False)
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
        if self._trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False).num_devices > 1:
            raise KDError(f"--devices {c.devices}: training on several devices is not supported yet; use --devices 1")
        self.root = Path(c.output_dir) / c.experiment_name
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KDError(f"--output_dir: cannot create {self.root}: {exc.strerror}") from None
        data_dir = Path(c.output_dir) / "demo_data" if c.data_dir == "demo" else c.data_dir
        if c.data_dir == "demo":
            make_demo_dataset(data_dir)
        self.data = ImageFolderDataModule(data_dir, c.image_size, c.batch_size, c.num_workers, c.val_fraction,
                                          c.num_classes, c.min_crop_scale, c.hflip)
        classes = self.data.classes
        # Build and run each network once now, so a bad name, weights file or input size fails before training.
        if c.train_teacher:
            model = self._build(c.teacher_arch, c.teacher_weights, "--teacher_weights", c.seed)
            check_forward(model, c.teacher_arch, c.image_size, len(classes), "--teacher_arch")
        if c.baseline or c.distill:
            model = self._build(c.student_arch, c.student_weights, "--student_weights", c.seed)
            check_forward(model, c.student_arch, c.image_size, len(classes), "--student_arch")
        self.kd_loss_name = c.kd_loss.rpartition(":")[2]
        self.kd_loss = build_loss(c.kd_loss, temperature=c.temperature) if c.distill else None
        if self.kd_loss is not None:
            check_loss(self.kd_loss, c.kd_loss, len(classes))
        self.teacher = (load_teacher(c.teacher_checkpoint, c.teacher_arch, classes, c.image_size)
                        if c.distill and c.teacher_checkpoint else None)

    def _trainer(self, **options: Any) -> pl.Trainer:
        """A Trainer on the configured hardware; Lightning's refusals become one-line errors."""
        c = self.config
        try:
            return pl.Trainer(accelerator=c.accelerator, devices=_devices(c.devices), precision=c.precision,
                              enable_model_summary=False, **options)
        except (MisconfigurationException, ValueError, RuntimeError) as exc:
            raise KDError(f"--accelerator {c.accelerator} --devices {c.devices} --precision {c.precision}: "
                          f"{str(exc).splitlines()[0]}") from None

    def _build(self, arch: str, weights: str | None, flag: str, seed: int) -> nn.Module:
        """A freshly seeded network, so its initial weights depend on the seed alone."""
        pl.seed_everything(seed, verbose=False)
        return build_model(arch, len(self.data.classes), weights, flag)

    def run(self) -> list[StageResult]:
        """Train every requested stage for each seed; distill uses the teacher trained just before.

        The teacher is trained once (with the first seed) unless --repeat_teacher asks for one per seed.
        """
        c, results = self.config, []
        for index, seed in enumerate(c.seeds or [c.seed]):
            if "teacher" in self.stages and (index == 0 or c.repeat_teacher):
                model = self._build(c.teacher_arch, c.teacher_weights, "--teacher_weights", seed)
                results.append(self._fit("teacher", c.teacher_arch, model, seed))
                self.teacher = load_teacher(results[-1].best_checkpoint, c.teacher_arch, self.data.classes,
                                            c.image_size)
            for stage in [s for s in self.stages if s != "teacher"]:
                model = self._build(c.student_arch, c.student_weights, "--student_weights", seed)
                results.append(self._fit(stage, c.student_arch, model, seed,
                                         self.teacher if stage == "distill" else None))
        return results

    def _fit(self, stage: str, arch: str, model: nn.Module, seed: int,
             teacher: nn.Module | None = None) -> StageResult:
        c = replace(self.config, seed=seed)
        pl.seed_everything(seed, workers=True, verbose=False)
        params = sum(p.numel() for p in model.parameters())
        module = KDModule(model, arch, self.data.classes, image_size=c.image_size, teacher=teacher,
                          kd_loss=self.kd_loss if teacher is not None else None, kd_loss_name=self.kd_loss_name,
                          alpha=c.alpha, lr=c.lr, optimizer=c.optimizer, momentum=c.momentum,
                          weight_decay=c.weight_decay, scheduler=c.scheduler, warmup_epochs=c.warmup_epochs)
        logger = TensorBoardLogger(self.root, name=stage, default_hp_metric=False)
        log_dir = Path(logger.log_dir)
        log_dir.mkdir(parents=True, exist_ok=False)
        save_config(c, log_dir / "config.yaml")
        history = History()
        checkpoint = ModelCheckpoint(dirpath=log_dir / "checkpoints", filename="best", monitor="val/top1",
                                     mode="max", save_last=True)
        steps_per_epoch = max(1, len(self.data.layout.train) // c.batch_size)
        trainer = self._trainer(max_epochs=c.epochs, logger=logger, log_every_n_steps=min(50, steps_per_epoch),
                                callbacks=[checkpoint, history, LearningRateMonitor("step")])
        print(f"\n== {stage}: {arch}, seed {seed} → {log_dir}", flush=True)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")  # --num_workers is the user's call
            warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # the frozen teacher, on purpose
            trainer.fit(module, datamodule=self.data)
        seconds = time.perf_counter() - start
        best = max(history.epochs, key=lambda e: e["val/top1"])
        logger.log_hyperparams(_flat_hparams(c) | {"stage": stage},
                               {"hp/best_top1": best["val/top1"], "hp/best_top5": best["val/top5"]})
        result = StageResult(c.experiment_name, stage, arch, seed, params, 100 * best["val/top1"],
                             100 * best["val/top5"], int(best["epoch"]), seconds, log_dir,
                             Path(checkpoint.best_model_path), self.kd_loss_name if stage == "distill" else "",
                             [100 * e["val/top1"] for e in history.epochs])
        result.save()
        return result


def format_summary(results: list[StageResult], report: Path | None = None) -> str:
    """The end-of-run text: one row per stage, the distillation gain, and where everything is."""
    lines = [stage_table(results)]
    groups = group_results(results)
    for (_, label), values in gains(groups).items():
        spread = f" (± {statistics.stdev(values):.2f} over {len(values)} seeds)" if len(values) > 1 else ""
        lines.append(f"{label} gain over the baseline: {statistics.fmean(values):+.2f} top-1 points{spread}")
    if any(len(runs) > 1 for runs in groups.values()):
        lines += ["", comparison_table(results)]
    if report is not None:
        lines.append(f"report: {report} (and report.png beside it)")
    lines.append("each stage's best and last checkpoints are in <logs>/checkpoints; "
                 "view the logs with: tensorboard --logdir " + str(results[0].log_dir.parent.parent))
    return "\n".join(lines)


def next_version(folder: Path) -> Path:
    """``folder/version_N`` for the first N not yet taken, as TensorBoardLogger numbers its runs."""
    taken = {int(p.name.removeprefix("version_")) for p in folder.glob("version_*")
             if p.name.removeprefix("version_").isdigit()}
    return folder / f"version_{max(taken, default=-1) + 1}"


def run_experiment(config: Config) -> list[StageResult]:
    """Check ``config``, run its stages, write a report when there is something to compare, print a summary."""
    results = Experiment(config).run()
    report = None
    if len(results) > 1:
        report = write_report(results, next_version(Path(config.output_dir) / config.experiment_name / "report"))
    print("\n" + format_summary(results, report), flush=True)
    return results


def compare_runs(config: Config) -> Path:
    """``--report DIR ...``: one table and one plot of every finished stage under the folders, no training."""
    results = find_results(config.report)
    report = write_report(results, next_version(Path(config.output_dir) / config.experiment_name / "report"))
    print(comparison_table(results) + f"\nreport: {report} (and report.png beside it)", flush=True)
    return report
