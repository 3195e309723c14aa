"""Runs the planned stages of an experiment (teacher, baseline, distill) for each seed and summarises them.

The run is checked first (:mod:`kd.run.checks`), each stage is built by :mod:`kd.train.stage`; here a stage is
found again for --resume, fitted, and its result saved.
"""

from __future__ import annotations

import os
import statistics
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, Timer
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from kd.train.checkpoint_io import AtomicCheckpointIO, InterruptCheckpoint
from kd.run.checks import STAGES, Plan, check_experiment, check_run
from kd.config import Config, Role, identity, save_config
from kd.console import progress_bar
from kd.data.loaders import make_datamodule
from kd.deploy.commands import deploy_students
from kd.errors import Interrupted, KDError, warn
from kd.files import write_text, writer_thread_errors_raised_here
from kd.losses.options import loss_key
from kd.losses.spec import resolve_losses
from kd.train.module import KDModule, NonFiniteLoss
from kd.report.comparison import comparison_table, ensemble_lines, gains, group_results, stage_table, write_report
from kd.report.results import RESULT_FILE, StageResult, find_results
from kd.run.resume import find_earlier
from kd.train.callbacks import EpochSeeding, History
from kd.train.stage import StageBuilder
from kd.train.teachers import Teacher, teacher_archs
from kd.train.trainer import make_trainer
from kd.tune.search import tune_distillation
from kd.versions import new_version, next_version, training_lock


def with_weights_in_force(c: Config) -> Config:
    """``c`` with the loss settings as they apply (see :mod:`kd.losses.spec`): --kd_weights, --ce_weight and the one
    --temperature in force. A distill stage records them, so its config.yaml says what ran and a changed default
    never lets --resume reuse a stage trained with the old one."""
    losses = resolve_losses(c)
    return replace(c, kd_weights=losses.weights, ce_weight=losses.ce_weight.value, temperature=losses.temperature)


def stage_config(c: Config, stage: str, seed: int) -> Config:
    """``c`` narrowed to one stage and seed: saved as the stage's config.yaml, ``--config`` repeats that stage alone."""
    return replace(c, seed=seed, seeds=[], train_teacher=stage == "teacher", baseline=stage == "baseline",
                   distill=stage not in ("teacher", "baseline"), assistant_arch=[])


def saved_identity(saved: dict[str, Any], config: Config, role: Role) -> dict[str, Any]:
    """What --resume compares of a saved config.yaml, for a stage of ``config``.

    A distill stage saved before kd recorded the temperature in force says ``temperature: null``: it ran at its
    losses' own temperatures, read as they are now.
    """
    if role is Role.DISTILL and saved.get("temperature") is None:
        saved = saved | {"temperature": with_weights_in_force(replace(config, temperature=None)).temperature}
    return identity(saved, role)


def stage_role(stage: str) -> Role:
    """The role of the flags that make ``stage`` what it is; an assistant is a distill stage."""
    return {"teacher": Role.TEACHER, "baseline": Role.BASELINE}.get(stage, Role.DISTILL)


def is_main_process() -> bool:
    """True in the one process that writes summaries, configurations and reports (global rank 0).

    Under DDP every rank runs this script; Lightning's rank comes from RANK/LOCAL_RANK/SLURM_PROCID,
    and NODE_RANK tells a second machine's first process from the first machine's.
    """
    return rank_zero_only.rank == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


def _flat_hparams(config: Config) -> dict[str, Any]:
    return {k: (" ".join(map(str, v)) if isinstance(v, list) else "none" if v is None else v)
            for k, v in config.to_dict().items()}


class StageRunner:
    """Trains the planned stages in order, for each seed, reusing or continuing earlier runs on --resume."""

    def __init__(self, config: Config, build: StageBuilder, plan: Plan) -> None:
        self.config, self.build, self.plan = config, build, plan
        self.root = Path(config.output_dir) / config.experiment_name
        self.kd_loss_name = "+".join(loss_key(spec) for spec in config.kd_loss)
        # The latest teacher trained or given, for the distill stages and --export.
        self.teacher = replace(plan.teacher, top1=_recorded_top1(plan.teacher)) if plan.teacher else None

    def run(self) -> list[StageResult]:
        """Train every requested stage for each seed; distill uses the teacher trained just before.

        The teacher is trained once (with the first seed) unless --repeat_teacher asks for one per seed.
        With --assistant_arch, each assistant is distilled from the network before it, and the student
        from the last assistant.
        """
        c, results = self.config, []
        for index, seed in enumerate(c.seeds or [c.seed]):
            if "teacher" in self.plan.stages and (index == 0 or c.repeat_teacher):
                results.append(self._stage("teacher", seed, c.teacher_arch[0]))
                self.teacher = self._load_teacher(c.teacher_arch[0], results[-1])
            baseline = None
            if "baseline" in self.plan.stages:
                results.append(self._stage("baseline", seed, c.student_arch))
                baseline = results[-1].best_top1
            if "distill" in self.plan.stages:
                if index == 0 and c.tune:  # tuned once, with the first seed; every seed's stage gets the best
                    self.config = tune_distillation(c, self.build, self.teacher, self.root)
                teacher = self.teacher
                for number, arch in enumerate(c.assistant_arch, start=1):
                    results.append(self._stage(f"assistant{number}", seed, arch, teacher))
                    teacher = self._load_teacher(arch, results[-1])
                results.append(self._stage("distill", seed, c.student_arch, teacher, baseline))
        return results

    def _load_teacher(self, arch: str, result: StageResult) -> Teacher:
        """The network a finished stage trained, as the teacher of the stages after it."""
        return replace(self.build.teacher((arch,), (result.best_checkpoint.resolve(),)), top1=result.best_top1)

    def _stage(self, stage: str, seed: int, arch: str, teacher: Teacher | None = None,
               baseline: float | None = None) -> StageResult:
        """One stage for one seed: reused if --resume finds it finished, continued if unfinished, else new.

        A student about to learn from a teacher no better than chance, or than the baseline student
        (``baseline``, its top-1), is warned about, and the warning is kept in its result.
        """
        c = self.config
        config = stage_config(c, stage, seed)
        if teacher is not None:  # record the very teacher and weights used, so --resume never mixes them up
            config = replace(with_weights_in_force(config), teacher_arch=list(teacher.archs),
                             teacher_checkpoint=[str(path) for path in teacher.checkpoints],
                             ensemble_weights=list(teacher.weights), student_arch=arch,
                             student_weights=c.student_weights if stage == "distill" else None)
        earlier = None
        if config.resume:
            role = stage_role(stage)
            earlier, passed = find_earlier(self.root / stage, config.identity(role),
                                           lambda saved: saved_identity(saved, config, role), arch, self.build.classes)
            for notice in passed if is_main_process() else []:
                warn(notice)
        if isinstance(earlier, StageResult):
            if is_main_process():
                print(f"\n== {stage}, seed {seed}: finished earlier in {earlier.log_dir}", flush=True)
            return earlier
        known = teacher is not None and teacher.top1 is not None
        doubt = teacher_doubt(teacher.top1, len(self.build.classes), baseline) if known else None
        if doubt and is_main_process():
            print(f"\nwarning: {stage} (seed {seed}): {doubt}", flush=True)
        weights = c.teacher_weights if stage == "teacher" else c.student_weights if stage in STAGES else None
        model = self.build.network(arch, weights, f"--{'teacher' if stage == 'teacher' else 'student'}_weights", seed)
        cache = self.build.teacher_cache(teacher.checkpoints, seed) if teacher is not None and c.teacher_cache else None
        distiller = self.build.distiller(model, config, teacher.network if teacher else None, cache)
        result = self._fit(stage, arch, self.build.module(distiller, arch, config), config, earlier,
                           [doubt] if doubt else [])
        if cache is not None and is_main_process():
            print(f"teacher cache: {cache.folder} holds {cache.nbytes() / 2**20:.1f} MiB "
                  f"({c.teacher_cache_dtype}{f', top {c.teacher_cache_topk}' if c.teacher_cache_topk else ''})",
                  flush=True)
        return result

    def _fit(self, stage: str, arch: str, module: KDModule, c: Config, resume_from: Path | None,
             notes: list[str]) -> StageResult:
        """Train one stage in ``resume_from`` or a new version folder, holding the folder's lock throughout."""
        if not is_main_process():  # other ranks write nothing; Lightning broadcasts rank 0's checkpoint folder
            return self._train(stage, arch, module, c, resume_from, resume_from is not None, notes)
        folder = resume_from or new_version(self.root / stage)
        with training_lock(folder):
            return self._train(stage, arch, module, c, folder, resume_from is not None, notes)

    def _train(self, stage: str, arch: str, module: KDModule, c: Config, folder: Path | None, resumed: bool,
               notes: list[str]) -> StageResult:
        data = self.build.data
        pl.seed_everything(c.seed, workers=True, verbose=False)
        data.set_seed(c.seed)
        params = sum(p.numel() for p in module.model.parameters())
        version = int(folder.name.removeprefix("version_")) if folder else None
        logger = TensorBoardLogger(self.root, name=stage, version=version, default_hp_metric=False)
        log_dir = Path(logger.log_dir)
        last = log_dir / "checkpoints" / "last.ckpt"
        if is_main_process() and not resumed:
            save_config(c, log_dir / "config.yaml")
            if data.skipped:
                write_text(log_dir / "skipped_images.txt", "".join(f"{p}\t{why}\n" for p, why in data.skipped))
        history, timer = History(), Timer()
        checkpoint = ModelCheckpoint(dirpath=log_dir / "checkpoints", filename="best", monitor="val/top1",
                                     mode="max")
        # Replaced each epoch (save_last=True on the one above saves only when the best improves).
        every_epoch = ModelCheckpoint(dirpath=log_dir / "checkpoints", filename="last")
        steps_per_epoch = max(1, len(data.layout.train) // (c.batch_size * self.plan.world_size))
        trainer = make_trainer(c, max_epochs=c.epochs, logger=logger, log_every_n_steps=min(50, steps_per_epoch),
                               plugins=[AtomicCheckpointIO()],
                               callbacks=[checkpoint, every_epoch, history, timer, EpochSeeding(data, c.seed),
                                          InterruptCheckpoint(log_dir / "checkpoints" / "interrupted.ckpt"),
                                          LearningRateMonitor("step"), progress_bar()])
        ckpt_path = last if resumed and last.is_file() else None
        if is_main_process():
            how = f"resuming from {ckpt_path}" if ckpt_path else "resuming from the start" if resumed else ""
            print(f"\n== {stage}: {arch}, seed {c.seed} → {log_dir} {how}".rstrip(), flush=True)
        where = f"{stage} (seed {c.seed})"
        try:
            with warnings.catch_warnings(), writer_thread_errors_raised_here():  # a full disk: one line, below
                warnings.filterwarnings("ignore", ".*does not have many workers.*")  # --num_workers: the user's call
                warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # the frozen teacher, on purpose
                warnings.filterwarnings("ignore", ".*exists and is not empty.*")  # --resume continues in place
                trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
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
        result = StageResult(c.experiment_name, stage, arch, c.seed, params, best["val/top1"], best["val/top5"],
                             int(best["epoch"]), timer.time_elapsed("train"), log_dir, Path(checkpoint.best_model_path),
                             self.kd_loss_name if module.distiller.distilling else "",
                             [e["val/top1"] for e in history.epochs], _teachers(c, history.epochs[-1]),
                             history.epochs[-1]["val/teacher_top1"] if module.distiller.has_teacher else None,
                             notes)
        if is_main_process():
            result.save()
        return result


NEAR_CHANCE = 0.1  # a teacher within this share of the way from chance to 100 % top-1 is "near chance"


def teacher_doubt(top1: float, classes: int, baseline: float | None = None) -> str | None:
    """Why a teacher of validation top-1 ``top1`` (percent) may have nothing to teach, or None when it may.

    Near chance, or below ``baseline`` (the student's own top-1 trained on labels alone).
    """
    chance = 100 / classes
    if top1 < chance + NEAR_CHANCE * (100 - chance):
        return (f"the teacher's validation top-1 is {top1:.2f} %, near chance ({chance:.2f} % with {classes} "
                "classes): it has little to teach; train it longer, or give a better --teacher_checkpoint")
    if baseline is not None and top1 < baseline:
        return (f"the teacher's validation top-1 ({top1:.2f} %) is below the baseline student's ({baseline:.2f} %): "
                "distilling from it may hold the student back")
    return None


def _recorded_top1(teacher: Teacher) -> float | None:
    """The validation top-1 of a single --teacher_checkpoint trained by kd, from the result.json beside it."""
    if len(teacher.checkpoints) != 1:
        return None
    checkpoint = teacher.checkpoints[0]
    path = checkpoint.parent.parent / RESULT_FILE
    try:
        result = StageResult.load(path) if path.is_file() else None
    except KDError:
        return None
    return result.best_top1 if result and result.best_checkpoint.resolve() == checkpoint.resolve() else None


def _teachers(c: Config, metrics: dict[str, float]) -> list[dict[str, Any]]:
    """Each teacher a stage learned from, with its own validation top-1 (percent; None when only cached logits ran)."""
    if not c.teacher_checkpoint or "val/teacher_top1" not in metrics:
        return []
    many = len(c.teacher_checkpoint) > 1
    keys = [f"val/teacher{n}_top1" if many else "val/teacher_top1" for n in range(1, 1 + len(c.teacher_checkpoint))]
    return [{"arch": arch, "checkpoint": path, "top1": metrics[key] if key in metrics else None}
            for arch, path, key in zip(teacher_archs(c), c.teacher_checkpoint, keys)]


def format_summary(results: list[StageResult], report: Path | None = None) -> str:
    """The end-of-run text: one row per stage, the distillation gain, and where everything is."""
    lines = [stage_table(results)]
    groups = group_results(results)
    for (_, label), values in gains(groups).items():
        spread = f" (± {statistics.stdev(values):.2f} over {len(values)} seeds)" if len(values) > 1 else ""
        lines.append(f"{label} gain over the baseline: {statistics.fmean(values):+.2f} top-1 points{spread}")
    if any(len(runs) > 1 for runs in groups.values()):
        lines += ["", comparison_table(results)]
    lines += ensemble_lines(results)
    warned = [f"warning: {r.label}, seed {r.seed}: {warning}" for r in results for warning in r.warnings]
    lines += ["", *warned] if warned else []
    if report is not None:
        lines.append(f"report: {report} (and report.png beside it)")
    lines.append("each stage's best and last checkpoints are in <logs>/checkpoints; "
                 "view the logs with: tensorboard --logdir " + str(results[0].log_dir.parent.parent))
    return "\n".join(lines)


def _report_folder(config: Config) -> Path:
    return next_version(Path(config.output_dir) / config.experiment_name / "report")


def report_and_summary(results: list[StageResult], config: Config) -> Path | None:
    """Write the report when there are two stages or more, then print the summary; returns report.md's path.

    The summary is printed even when the report cannot be written (a full disk), before that error.
    """
    report = None
    try:
        report = write_report(results, _report_folder(config)) if len(results) > 1 else None
    finally:
        print("\n" + format_summary(results, report), flush=True)
    return report


def run_experiment(config: Config) -> list[StageResult]:
    """Check ``config``, run its stages, write a report when there is something to compare, print a summary."""
    plan = check_run(config)  # before the data, which may be generated or downloaded
    data = make_datamodule(config)
    build = StageBuilder(config, data)
    runner = StageRunner(config, build, check_experiment(config, build, plan))
    results = runner.run()
    if is_main_process():
        report_and_summary(results, config)
        if config.export:
            teacher = runner.teacher.network if runner.teacher is not None else None
            print(deploy_students(results, teacher, config, data.classes), flush=True)
    return results


def compare_runs(config: Config) -> Path:
    """``--report DIR ...``: one table and one plot of every finished stage under the folders, no training."""
    results = find_results(config.report)
    print(comparison_table(results), flush=True)  # first: it stands even if the report cannot be written
    report = write_report(results, _report_folder(config))
    print(f"report: {report} (and report.png beside it)", flush=True)
    return report
