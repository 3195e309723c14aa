"""Runs the stages of an experiment (teacher, baseline, distill) and summarises them.

Everything a run can get wrong up front (data, architectures, loss, teacher checkpoint, output
folder) is checked before the first stage starts, so a bad flag never costs a trained teacher.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from torch import nn

from kd.config import Config, Role, cache_settings, identity, save_config
from kd.data import ImageFolderDataModule, draw_seed, make_datamodule
from kd.errors import Interrupted, KDError
from kd.files import written_atomically
from kd.features import feature_shapes
from kd.losses import LOSSES
from kd.losses.base import loss_property
from kd.losses.objective import build_objective, loss_key
from kd.deploy import deploy_students
from kd.models import build_model, check_forward, load_network
from kd.module import KDModule, NonFiniteLoss
from kd.report import comparison_table, gains, group_results, stage_table, write_report
from kd.results import RESULT_FILE, StageResult, find_results
from kd.teacher_cache import TeacherCache, cache_key

STAGES = ("teacher", "baseline", "distill")


def stage_role(stage: str) -> Role:
    """The role of the flags that make ``stage`` what it is; an assistant is a distill stage."""
    return {"teacher": Role.TEACHER, "baseline": Role.BASELINE}.get(stage, Role.DISTILL)


class History(pl.Callback):
    """Each epoch's validation metrics and the training time so far; saved in checkpoints for --resume."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self.seconds = 0.0
        self._segment = (time.perf_counter(), 0.0)  # (when this process started, seconds before it)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._segment = (time.perf_counter(), self.seconds)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self.epochs.append({"epoch": trainer.current_epoch, **metrics})
            started, before = self._segment
            self.seconds = before + time.perf_counter() - started

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs, self.seconds = list(state_dict["epochs"]), float(state_dict["seconds"])


class EpochSeeding(pl.Callback):
    """Makes each epoch's randomness a function of (seed, epoch): batch order, crops, dropout.

    An epoch then runs the same whether the run went straight through or was resumed before it.
    """

    def __init__(self, data: ImageFolderDataModule, seed: int) -> None:
        self.data, self.seed = data, seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.data.set_epoch(trainer.current_epoch)
        pl.seed_everything(draw_seed(self.seed, trainer.current_epoch) % 2**32, verbose=False)


def is_main_process() -> bool:
    """True in the one process that writes summaries, configurations and reports (global rank 0).

    Under DDP every rank runs this script; Lightning's rank comes from RANK/LOCAL_RANK/SLURM_PROCID,
    and NODE_RANK tells a second machine's first process from the first machine's.
    """
    return rank_zero_only.rank == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


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
        if c.assistant_arch and not c.distill:
            raise KDError("--assistant_arch trains teacher assistants on the way to the student: add --distill")
        # Checks the hardware flags now; the process count sizes the logging interval.
        self.world_size = self._trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False).world_size
        self.root = Path(c.output_dir) / c.experiment_name
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KDError(f"--output_dir: cannot create {self.root}: {exc.strerror}") from None
        self.data = make_datamodule(c)
        classes = self.data.classes
        # Build and run each network once now, so a bad name, weights file or input size fails before training.
        if c.train_teacher:
            model = self._build(c.teacher_arch, c.teacher_weights, "--teacher_weights", c.seed)
            check_forward(model, c.teacher_arch, c.image_size, len(classes), "--teacher_arch")
        if c.baseline or c.distill:
            model = self._build(c.student_arch, c.student_weights, "--student_weights", c.seed)
            check_forward(model, c.student_arch, c.image_size, len(classes), "--student_arch")
        self.kd_loss_name = "+".join(loss_key(spec) for spec in c.kd_loss)
        self.teacher_path = Path(c.teacher_checkpoint).expanduser().resolve() if c.teacher_checkpoint else None
        self.teacher: nn.Module | None = None
        self.cache_keys: dict[tuple[Path, int], str] = {}  # hashing the teacher and every file once per run
        if c.distill:
            self._check_distillation()

    def _check_distillation(self) -> None:
        """Check the losses, layers, assistants and caches, and run one trial step of every distillation."""
        c, classes = self.config, self.data.classes
        features = any(loss_property(LOSSES.get(spec), "features") for spec in c.kd_loss)
        if features and not (c.student_layers and c.teacher_layers):
            raise KDError(f"--kd_loss {' '.join(c.kd_loss)}: feature losses need --student_layers and "
                          "--teacher_layers (module names, e.g. layer3 layer4)")
        if len(c.student_layers) != len(c.teacher_layers):
            raise KDError(f"--student_layers names {len(c.student_layers)} module(s) but --teacher_layers "
                          f"{len(c.teacher_layers)}: they are compared pair by pair")
        if c.teacher_cache_only and not c.teacher_cache:
            raise KDError("--teacher_cache_only needs --teacher_cache DIR")
        if c.teacher_cache and (features or self.world_size > 1 or c.assistant_arch):
            why = ("feature losses need the teacher's features, and the cache holds logits only" if features else
                   "it is written by one process; run the cached distillation on one device" if self.world_size > 1
                   else "each assistant is a new teacher; cache the final distillation in a run without assistants")
            raise KDError(f"--teacher_cache: {why}")
        if c.teacher_cache_only and self.teacher_path is None:
            raise KDError("--teacher_cache_only needs --teacher_checkpoint: the cache is keyed by its content")
        caches = ([self._cache(self.teacher_path, seed) for seed in c.seeds or [c.seed]]
                  if c.teacher_cache and self.teacher_path else [])
        missing = [(cache, split) for cache in caches for split in cache.missing(c.epochs)]
        if self.teacher_path is not None and (not caches or missing):
            if c.teacher_cache_only:
                splits = [split for _, split in missing]
                raise KDError(f"--teacher_cache_only: {missing[0][0].folder} lacks {', '.join(splits[:3])}"
                              f"{' ...' if len(splits) > 3 else ''} for this teacher, data, transforms and seed")
            self.teacher = load_network(self.teacher_path, c.teacher_arch, classes, c.image_size)
        chain = [c.teacher_arch, *c.assistant_arch, c.student_arch]
        trial = replace(c, compile=False)
        for index, (teacher_arch, student_arch) in enumerate(zip(chain, chain[1:])):
            teacher = (self.teacher if index == 0 and self.teacher is not None
                       else self._build(teacher_arch, None, "--teacher_arch", c.seed))
            student = self._build(student_arch, None, "--assistant_arch", c.seed)
            check_forward(student, student_arch, c.image_size, len(classes), "--assistant_arch")
            trial_module = self._module(student, student_arch, trial, teacher, None)
            trial_module.check_step(c.image_size)
            trial_module.remove_hooks()

    def _cache(self, teacher_path: Path, seed: int) -> TeacherCache:
        """The teacher-output cache of this run's data and transforms, ``seed`` and the teacher in ``teacher_path``."""
        c, layout = self.config, self.data.layout
        settings = cache_settings(replace(c, seed=seed))
        if (teacher_path, seed) not in self.cache_keys:
            self.cache_keys[teacher_path, seed] = cache_key(teacher_path, {"train": layout.train, "val": layout.val},
                                                            settings)
        sizes = {"train": len(layout.train), "val": len(layout.val)}
        return TeacherCache(c.teacher_cache, self.cache_keys[teacher_path, seed], sizes, len(self.data.classes),
                            c.teacher_cache_dtype, c.teacher_cache_topk)

    def _module(self, model: nn.Module, arch: str, c: Config, teacher: nn.Module | None,
                cache: TeacherCache | None) -> KDModule:
        """The LightningModule of a stage; distilling when it has a teacher or a teacher cache.

        The objective is built anew for every stage, so a loss's state (CRD's memory bank) never
        carries over from one student to the next.
        """
        objective = None
        shapes = None
        if teacher is not None or cache is not None:
            if c.student_layers and teacher is not None:
                shapes = (feature_shapes(model, c.student_layers, c.image_size, "--student_layers"),
                          feature_shapes(teacher, c.teacher_layers, c.image_size, "--teacher_layers"))
            objective = build_objective(c.kd_loss, c.kd_weights, c.ce_weight, c.temperature, c.loss_options,
                                        num_classes=len(self.data.classes), num_samples=len(self.data.layout.train),
                                        student_shapes=shapes[0] if shapes else {},
                                        teacher_shapes=shapes[1] if shapes else {})
        return KDModule(model, arch, self.data.classes, image_size=c.image_size, teacher=teacher,
                        objective=objective, student_layers=c.student_layers, teacher_layers=c.teacher_layers,
                        feature_shapes=shapes, teacher_cache=cache, lr=c.lr, optimizer=c.optimizer,
                        momentum=c.momentum, weight_decay=c.weight_decay, scheduler=c.scheduler,
                        warmup_epochs=c.warmup_epochs, channels_last=c.channels_last, compile=c.compile)

    def _trainer(self, **options: Any) -> pl.Trainer:
        """A Trainer on the configured hardware; Lightning's refusals become one-line errors."""
        c = self.config
        try:
            return pl.Trainer(accelerator=c.accelerator, devices=_devices(c.devices), num_nodes=c.num_nodes,
                              strategy=c.strategy, precision=c.precision, enable_model_summary=False, **options)
        except (MisconfigurationException, ValueError, RuntimeError) as exc:
            raise KDError(f"--accelerator {c.accelerator} --devices {c.devices} --num_nodes {c.num_nodes} "
                          f"--strategy {c.strategy} --precision {c.precision}: {str(exc).splitlines()[0]}") from None

    def _build(self, arch: str, weights: str | None, flag: str, seed: int) -> nn.Module:
        """A freshly seeded network, so its initial weights depend on the seed alone."""
        pl.seed_everything(seed, verbose=False)
        return build_model(arch, len(self.data.classes), weights, flag)

    def run(self) -> list[StageResult]:
        """Train every requested stage for each seed; distill uses the teacher trained just before.

        The teacher is trained once (with the first seed) unless --repeat_teacher asks for one per seed.
        With --assistant_arch, each assistant is distilled from the network before it, and the student
        from the last assistant.
        """
        c, results = self.config, []
        for index, seed in enumerate(c.seeds or [c.seed]):
            if "teacher" in self.stages and (index == 0 or c.repeat_teacher):
                results.append(self._stage("teacher", seed, c.teacher_arch))
                self.teacher_path = results[-1].best_checkpoint.resolve()
                self.teacher = load_network(self.teacher_path, c.teacher_arch, self.data.classes, c.image_size)
            if "baseline" in self.stages:
                results.append(self._stage("baseline", seed, c.student_arch))
            if "distill" in self.stages:
                teacher = (c.teacher_arch, self.teacher_path, self.teacher)
                for number, arch in enumerate(c.assistant_arch, start=1):
                    results.append(self._stage(f"assistant{number}", seed, arch, teacher))
                    path = results[-1].best_checkpoint.resolve()
                    teacher = (arch, path, load_network(path, arch, self.data.classes, c.image_size))
                results.append(self._stage("distill", seed, c.student_arch, teacher))
        return results

    def _stage(self, stage: str, seed: int, arch: str,
               teacher: tuple[str, Path, nn.Module | None] | None = None) -> StageResult:
        """One stage for one seed: reused if --resume finds it finished, continued if unfinished, else new.

        ``teacher`` is (arch, checkpoint, network) for distill and assistant stages; the network is None
        when the teacher cache holds everything.
        """
        c = self.config
        config = replace(c, seed=seed)
        if teacher is not None:  # record the very teacher used, so --resume never mixes teachers up
            config = replace(config, train_teacher=False, teacher_arch=teacher[0], teacher_checkpoint=str(teacher[1]),
                             student_arch=arch, assistant_arch=[],
                             student_weights=c.student_weights if stage == "distill" else None)
        earlier = self._earlier(stage, config) if config.resume else None
        if isinstance(earlier, StageResult):
            if is_main_process():
                print(f"\n== {stage}, seed {seed}: finished earlier in {earlier.log_dir}", flush=True)
            return earlier
        weights = c.teacher_weights if stage == "teacher" else c.student_weights if stage in STAGES else None
        model = self._build(arch, weights, f"--{'teacher' if stage == 'teacher' else 'student'}_weights", seed)
        cache = self._cache(teacher[1], seed) if teacher is not None and c.teacher_cache else None
        module = self._module(model, arch, config, teacher[2] if teacher else None, cache)
        result = self._fit(stage, arch, module, config, earlier)
        if cache is not None and is_main_process():
            print(f"teacher cache: {cache.folder} holds {cache.nbytes() / 2**20:.1f} MiB "
                  f"({c.teacher_cache_dtype}{f', top {c.teacher_cache_topk}' if c.teacher_cache_topk else ''})",
                  flush=True)
        return result

    def _earlier(self, stage: str, config: Config) -> StageResult | Path | None:
        """For --resume: the latest run of this stage with the same seed and the same stage flags.

        Its result if it finished, its folder if it can continue from ``last.ckpt``; None starts anew.
        """
        folders = sorted((p for p in (self.root / stage).glob("version_*") if (p / "config.yaml").is_file()),
                         key=lambda p: int(p.name.removeprefix("version_")), reverse=True)
        role = stage_role(stage)
        wanted = config.identity(role)
        for folder in folders:
            saved = yaml.safe_load((folder / "config.yaml").read_text()) or {}
            if identity(saved, role) != wanted:
                continue
            if (folder / RESULT_FILE).is_file():
                return StageResult.load(folder / RESULT_FILE)
            if (folder / "checkpoints" / "last.ckpt").is_file():
                return folder
        return None

    def _fit(self, stage: str, arch: str, module: KDModule, c: Config, resume_from: Path | None) -> StageResult:
        pl.seed_everything(c.seed, workers=True, verbose=False)
        self.data.set_seed(c.seed)
        params = sum(p.numel() for p in module.model.parameters())
        version = int(resume_from.name.removeprefix("version_")) if resume_from else None
        logger = TensorBoardLogger(self.root, name=stage, version=version, default_hp_metric=False)
        log_dir = Path(logger.log_dir)  # other ranks write nothing; Lightning broadcasts rank 0's checkpoint folder
        last = log_dir / "checkpoints" / "last.ckpt"
        if is_main_process() and not resume_from:
            log_dir.mkdir(parents=True, exist_ok=False)
            save_config(c, log_dir / "config.yaml")
            if self.data.skipped:
                (log_dir / "skipped_images.txt").write_text("".join(f"{p}\t{why}\n" for p, why in self.data.skipped))
        history = History()
        checkpoint = ModelCheckpoint(dirpath=log_dir / "checkpoints", filename="best", monitor="val/top1",
                                     mode="max")
        every_epoch = ModelCheckpoint(dirpath=log_dir / "checkpoints", filename="last")  # replaced each epoch
        steps_per_epoch = max(1, len(self.data.layout.train) // (c.batch_size * self.world_size))
        trainer = self._trainer(max_epochs=c.epochs, logger=logger, log_every_n_steps=min(50, steps_per_epoch),
                                plugins=[AtomicCheckpointIO()],
                                callbacks=[checkpoint, every_epoch, history, EpochSeeding(self.data, c.seed),
                                           InterruptCheckpoint(log_dir / "checkpoints" / "interrupted.ckpt"),
                                           LearningRateMonitor("step")])
        ckpt_path = last if resume_from and last.is_file() else None
        if is_main_process():
            how = f"resuming from {ckpt_path}" if ckpt_path else "resuming from the start" if resume_from else ""
            print(f"\n== {stage}: {arch}, seed {c.seed} → {log_dir} {how}".rstrip(), flush=True)
        where = f"{stage} (seed {c.seed})"
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*does not have many workers.*")  # --num_workers: the user's call
                warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # the frozen teacher, on purpose
                warnings.filterwarnings("ignore", ".*exists and is not empty.*")  # --resume continues in place
                trainer.fit(module, datamodule=self.data, ckpt_path=ckpt_path)
        except SystemExit:  # Lightning's graceful stop after Ctrl+C or SIGTERM
            if not trainer.interrupted:
                raise
            raise Interrupted(f"{where} was interrupted in epoch {trainer.current_epoch}; its checkpoints are in "
                              f"{log_dir / 'checkpoints'}") from None
        except NonFiniteLoss as exc:
            raise KDError(f"{where}: {exc}; the last good checkpoints are kept in {log_dir / 'checkpoints'}") from None
        except KDError as exc:
            raise KDError(f"{where}: {exc}") from None
        except OSError as exc:  # a full disk or a folder that became read-only
            raise KDError(f"{where}: cannot write {exc.filename or log_dir}: {exc.strerror or exc}; nothing "
                          "half-written is left (checkpoints are written aside, then renamed)") from None
        best = max(history.epochs, key=lambda e: e["val/top1"])
        logger.log_hyperparams(_flat_hparams(c) | {"stage": stage},
                               {"hp/best_top1": best["val/top1"], "hp/best_top5": best["val/top5"]})
        log_dir = self.root / stage / Path(checkpoint.dirpath).parent.name  # rank 0's version on every rank
        result = StageResult(c.experiment_name, stage, arch, c.seed, params, 100 * best["val/top1"],
                             100 * best["val/top5"], int(best["epoch"]), history.seconds, log_dir,
                             Path(checkpoint.best_model_path), self.kd_loss_name if module.distilling else "",
                             [100 * e["val/top1"] for e in history.epochs])
        if is_main_process():
            result.save()
        return result


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint beside its final name, then renames: a kill leaves the old file or the new one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        with written_atomically(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


class InterruptCheckpoint(pl.Callback):
    """Saves ``interrupted.ckpt`` on Ctrl+C or SIGTERM (not on errors, whose state may be broken).

    --resume restarts from ``last.ckpt`` (the end of the last whole epoch), which replays exactly;
    this one keeps the work of the interrupted epoch for whoever wants it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            trainer.save_checkpoint(self.path)


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


def _report_folder(config: Config) -> Path:
    return next_version(Path(config.output_dir) / config.experiment_name / "report")


def run_experiment(config: Config) -> list[StageResult]:
    """Check ``config``, run its stages, write a report when there is something to compare, print a summary."""
    experiment = Experiment(config)
    results = experiment.run()
    if is_main_process():
        report = None
        if len(results) > 1:
            report = write_report(results, _report_folder(config))
        print("\n" + format_summary(results, report), flush=True)
        if config.export:
            print(deploy_students(results, experiment.teacher, config, experiment.data.classes), flush=True)
    return results


def compare_runs(config: Config) -> Path:
    """``--report DIR ...``: one table and one plot of every finished stage under the folders, no training."""
    results = find_results(config.report)
    report = write_report(results, _report_folder(config))
    print(comparison_table(results) + f"\nreport: {report} (and report.png beside it)", flush=True)
    return report
