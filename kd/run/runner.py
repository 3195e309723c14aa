"""Runs the planned stages of an experiment (:mod:`kd.run.plan`) in order and summarises them.

The run is checked first (:mod:`kd.run.checks`), each stage is built by :mod:`kd.train.stage`; here a stage is
found again for --resume, fitted, and its result saved.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, Timer
from pytorch_lightning.loggers import TensorBoardLogger

from kd.config import Config, save_config
from kd.console import fit_warnings_silenced, progress_bar
from kd.data.loaders import make_datamodule
from kd.deploy.commands import deploy_students
from kd.errors import Interrupted, KDError, warn
from kd.files import remove_path, write_text, writer_thread_errors_raised_here
from kd.losses.options import loss_key
from kd.report.results import RESULT_FILE, StageResult
from kd.run.checks import check_experiment, check_run
from kd.run.generations import ensemble_of_generations, last_generation
from kd.run.peers import peer_results, save_peer_results
from kd.run.plan import Plan, Stage, TeacherFrom, stage_record
from kd.run.resume import check_tuned_resume, find_earlier
from kd.run.summary import report_and_summary
from kd.train.callbacks import EpochSeeding, History
from kd.train.checkpoint_io import AtomicCheckpointIO, InterruptCheckpoint, stage_parts
from kd.train.module import KDModule, NonFiniteLoss
from kd.train.mutual import PEERS_FOLDER, PeerCheckpoints
from kd.train.stage import StageBuilder
from kd.train.teachers import Teacher
from kd.train.trainer import is_main_process, make_trainer
from kd.tune.search import Tuned, tune_stage
from kd.versions import new_version, training_lock


def _flat_hparams(config: Config) -> dict[str, Any]:
    return {k: (" ".join(map(str, v)) if isinstance(v, list) else "none" if v is None else v)
            for k, v in config.to_dict().items()}


class StageRunner:
    """Trains the planned stages in order, for each seed, reusing or continuing earlier runs on --resume."""

    def __init__(self, config: Config, build: StageBuilder, plan: Plan) -> None:
        self.config, self.build, self.plan = config, build, plan
        self.root = Path(config.output_dir) / config.experiment_name
        self.kd_loss_name = "+".join(loss_key(spec) for spec in config.kd_loss)
        self.given = replace(plan.teacher, top1=_recorded_top1(plan.teacher)) if plan.teacher else None
        self.tuned: dict[str, Tuned] = {}  # what a tune chose, by stage name
        self.teacher = self.given  # the latest teacher trained or given: --export compares the students with it

    def run(self) -> list[StageResult]:
        """Train the planned stages in order; a stage learns from the teacher its plan names."""
        results: dict[tuple[str, int], StageResult] = {}
        offered: dict[tuple[str, int], Teacher] = {}  # what each finished stage that teaches offers
        for index, stage in enumerate(self.plan.stages):
            teacher = self._teacher_of(stage.teacher, offered) if stage.teacher else None
            if stage.init and self._found_after(self.plan.stages[index + 1], teacher):
                continue  # --resume found its distillation finished or under way: it needs the phase no more
            if stage.tune:  # tuned once, with the first seed; every seed's stage of this name gets the best
                self.tuned[stage.name] = tune_stage(self.config, self.build, teacher, self.root, stage.role)
            baseline = results.get((stage.baseline, stage.seed)) if stage.baseline else None
            tuned = self.tuned.get(stage.name)
            start = results.pop((stage.starts_from, stage.seed), None) if stage.starts_from else None  # no row
            results[stage.key] = self._stage(stage, tuned.config if tuned else self.config, teacher,
                                             baseline.best_top1 if baseline else None, start)
            if stage.name == "distill" and self.config.mutual and is_main_process():
                results |= {(peer.stage, peer.seed): peer for peer in peer_results(results[stage.key])}
            if last_generation(stage.name, self.config) and is_main_process():
                generations = [results[f"generation{n}", stage.seed] for n in range(1, self.config.born_again + 1)]
                results["ensemble", stage.seed] = ensemble_of_generations(generations, self.build, self.config)
            if stage.teaches:
                offered[stage.key] = self._load_teacher(stage.arch, results[stage.key])
                if stage.name == "teacher":
                    self.teacher = offered[stage.key]
            later = {(s.teacher.stage, s.teacher.seed) for s in self.plan.stages[index + 1:] if s.teacher}
            offered = {key: network for key, network in offered.items() if key in later}  # free the rest
        return list(results.values())

    def _found_after(self, stage: Stage, teacher: Teacher | None) -> bool:
        """Whether --resume finds ``stage`` (the distillation after an init phase) finished or able to continue."""
        if not self.config.resume:
            return False
        earlier, _ = find_earlier(self.root / stage.name, stage_record(self.config, stage, teacher), stage.role,
                                  stage.arch, self.build.classes)
        return earlier is not None

    def _teacher_of(self, source: TeacherFrom, offered: dict[tuple[str, int], Teacher]) -> Teacher:
        """The teacher a stage learns from: an earlier stage's network, or the --teacher_checkpoint files."""
        return offered[source.stage, source.seed] if source.stage else self.given

    def _load_teacher(self, arch: str, result: StageResult) -> Teacher:
        """The network a finished stage trained, as the teacher of the stages after it."""
        return replace(self.build.teacher((arch,), (result.best_checkpoint.resolve(),)), top1=result.best_top1)

    def _stage(self, stage: Stage, c: Config, teacher: Teacher | None, baseline: float | None,
               start: StageResult | None = None) -> StageResult:
        """One stage of run ``c`` (with the settings its tune chose, if tuned): reused if --resume finds it
        finished, continued if unfinished, else new; a new one after an init phase starts from where ``start``
        (that phase) ended.

        A student about to learn from a teacher no better than chance, or than the baseline student
        (``baseline``, its top-1), is warned about, and the warning is kept in its result.
        """
        config = stage_record(c, stage, teacher)
        earlier = None
        tuned = self.tuned.get(stage.name)
        if config.resume and tuned:
            check_tuned_resume(self.root / stage.name, config, stage.role, tuned.study, tuned.trials)
        if config.resume:
            earlier, passed = find_earlier(self.root / stage.name, config, stage.role, stage.arch, self.build.classes,
                                           (tuned.trials, tuned.study) if tuned else None)
            for notice in passed if is_main_process() else []:
                warn(notice)
        if isinstance(earlier, StageResult):
            if is_main_process():
                print(f"\n== {stage.name}, seed {stage.seed}: finished earlier in {earlier.log_dir}", flush=True)
            return earlier
        known = teacher is not None and teacher.top1 is not None
        doubt = teacher_doubt(teacher.top1, len(self.build.classes), baseline) if known and not stage.init else None
        if doubt and is_main_process():
            print(f"\nwarning: {stage.name} (seed {stage.seed}): {doubt}", flush=True)
        model = self.build.network(stage.arch, stage.weights, stage.weights_flag, stage.seed)
        cache = (self.build.teacher_cache(teacher.checkpoints, stage.seed) if teacher is not None and c.teacher_cache
                 else None)
        # An unfinished stage continues from its own checkpoint; a new one after an init phase from the phase's end.
        phase = stage_parts(start.log_dir) if start and earlier is None else None
        if phase:
            model.load_state_dict(phase.pop("model"))
        distiller = self.build.distiller(model, config, teacher.network if teacher else None, cache, stage.init)
        if phase:
            distiller.load_parts(phase)
        result = self._fit(stage.name, stage.arch, self.build.module(distiller, stage.arch, config), config,
                           earlier, teacher, [doubt] if doubt else [])
        if cache is not None and is_main_process():
            print(f"teacher cache: {cache.folder} holds {cache.nbytes() / 2**20:.1f} MiB "
                  f"({c.teacher_cache_dtype}{f', top {c.teacher_cache_topk}' if c.teacher_cache_topk else ''})",
                  flush=True)
        return result

    def _fit(self, stage: str, arch: str, module: KDModule, c: Config, resume_from: Path | None,
             teacher: Teacher | None, notes: list[str]) -> StageResult:
        """Train one stage in ``resume_from`` or a new version folder, holding the folder's lock throughout."""
        if not is_main_process():  # other ranks write nothing; Lightning broadcasts rank 0's checkpoint folder
            return self._train(stage, arch, module, c, resume_from, resume_from is not None, teacher, notes)
        folder = resume_from or new_version(self.root / stage)
        try:
            with training_lock(folder):
                return self._train(stage, arch, module, c, folder, resume_from is not None, teacher, notes)
        except BaseException:
            if resume_from is None and not _checkpoints(folder):
                remove_path(folder)  # only the one this stage created, and only while it holds no checkpoint
            raise

    def _train(self, stage: str, arch: str, module: KDModule, c: Config, folder: Path | None, resumed: bool,
               teacher: Teacher | None, notes: list[str]) -> StageResult:
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
        peers = [PeerCheckpoints(log_dir / PEERS_FOLDER, c.mutual)] if module.distiller.peers else []
        steps_per_epoch = max(1, len(data.layout.train) // (c.batch_size * self.plan.world_size))
        trainer = make_trainer(c, max_epochs=c.epochs, logger=logger, log_every_n_steps=min(50, steps_per_epoch),
                               plugins=[AtomicCheckpointIO()],
                               callbacks=[checkpoint, every_epoch, history, timer, EpochSeeding(data, c.seed),
                                          InterruptCheckpoint(log_dir / "checkpoints" / "interrupted.ckpt"),
                                          LearningRateMonitor("step"), progress_bar(), *peers])
        ckpt_path = last if resumed and last.is_file() else None
        if is_main_process():
            how = f"resuming from {ckpt_path}" if ckpt_path else "resuming from the start" if resumed else ""
            print(f"\n== {stage}: {arch}, seed {c.seed} → {log_dir} {how}".rstrip(), flush=True)
        where = f"{stage} (seed {c.seed})"
        try:
            # a full disk: one line, below; --resume continues in place, into a folder that is not empty
            with fit_warnings_silenced(".*exists and is not empty.*"), writer_thread_errors_raised_here():
                trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        except SystemExit:  # Lightning's graceful stop after Ctrl+C or SIGTERM
            if not trainer.interrupted:
                raise
            raise Interrupted(f"{where} was interrupted in epoch {trainer.current_epoch}; its checkpoints are in "
                              f"{log_dir / 'checkpoints'}") from None
        except NonFiniteLoss as exc:
            kept = (f"the last good checkpoints are kept in {log_dir / 'checkpoints'}" if _checkpoints(log_dir)
                    else "it saved no checkpoint, so nothing of it is kept")
            raise KDError(f"{where}: {exc}; {kept}") from None
        except KDError as exc:
            raise KDError(f"{where}: {exc}") from None
        except OSError as exc:  # a full disk or a folder that became read-only
            raise KDError(f"{where}: cannot write {exc.filename or log_dir}: {exc.strerror or exc}; nothing "
                          "half-written is left (checkpoints are written aside, then renamed)") from None
        best = max(history.epochs, key=lambda e: e["val/top1"])
        logger.log_hyperparams(_flat_hparams(c) | {"stage": stage},
                               {"hp/best_top1": best["val/top1"], "hp/best_top5": best["val/top5"]})
        logger.experiment.flush()  # on disk when the stage returns, not whenever its writer thread gets to it
        log_dir = self.root / stage / Path(checkpoint.dirpath).parent.name  # rank 0's version on every rank
        tuned = self.tuned.get(stage)
        result = StageResult(c.experiment_name, stage, arch, c.seed, params, best["val/top1"], best["val/top5"],
                             int(best["epoch"]), timer.time_elapsed("train"), log_dir, Path(checkpoint.best_model_path),
                             self._loss_label(module),
                             [e["val/top1"] for e in history.epochs], teacher_records(teacher, history.epochs[-1]),
                             history.epochs[-1]["val/teacher_top1"] if module.distiller.has_teacher else None,
                             notes, history.epochs[-1]["val/top5"], tuned.trials if tuned else None,
                             tuned.study if tuned else None)
        if is_main_process():  # the peers first: the student's result.json marks the whole stage finished
            if module.distiller.peers:
                save_peer_results(result, history.epochs, c, list(module.distiller.peers))
            result.save()
        return result

    def _loss_label(self, module: KDModule) -> str:
        """What a stage's student learned from besides labels, for its row: the losses, ``mutual`` (its peers), both
        or neither."""
        parts = [self.kd_loss_name] * module.distiller.learns_from_objective + ["mutual"] * bool(module.distiller.peers)
        return "+".join(parts)


def _checkpoints(folder: Path) -> list[Path]:
    """The checkpoints a stage saved in its version ``folder``: finished work, never removed."""
    return sorted((folder / "checkpoints").glob("*.ckpt"))


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


def teacher_records(teacher: Teacher | None, metrics: dict[str, float]) -> list[dict[str, Any]]:
    """Each teacher a stage learned from, with its own validation top-1 (percent; None when only cached logits ran)."""
    if teacher is None or "val/teacher_top1" not in metrics:
        return []
    many = len(teacher.checkpoints) > 1
    keys = [f"val/teacher{n}_top1" if many else "val/teacher_top1" for n in range(1, 1 + len(teacher.checkpoints))]
    return [{"arch": arch, "checkpoint": str(path), "top1": metrics[key] if key in metrics else None}
            for arch, path, key in zip(teacher.archs, teacher.checkpoints, keys)]


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


