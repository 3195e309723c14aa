"""``--tune N``: an Optuna study of a student stage's settings before that stage trains with the best of them.

Every tuned student stage, the baseline and the distill stage alike, gets the same budget: N trials of the same
epochs, on the same slice, with the same sampler seed and pruner, over the same training settings (the distill
stage's search adds its losses' settings). Trials train on the training set less a per-class held-out slice
(``--tune_fraction``, a fixed split) and are scored by their best top-1 on that slice, so val/ is never seen
while tuning. Logit losses read one teacher cache of that split, filled by the first trial. The studies live
in ``tune/study.db`` in the experiment folder (or ``--tune_storage``): a resumed or second process goes on
with the same study, and a study stops at N finished trials, whoever ran them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import hashlib
import json
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import optuna
import pytorch_lightning as pl
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState
from pytorch_lightning.loggers import TensorBoardLogger

from kd.config import Config, Role
from kd.data.loaders import ImageDataModule
from kd.console import fit_warnings_silenced
from kd.errors import Interrupted, KDError
from kd.files import alive, file_digest
from kd.losses.spec import resolve_losses
from kd.train.callbacks import EpochSeeding
from kd.train.module import NonFiniteLoss
from kd.seeding import draw_seed
from kd.train.teachers import Teacher
from kd.train.trainer import make_trainer
from kd.tune.report import papers_trial, write_tune_report
from kd.tune.storage import HEARTBEAT_S, open_storage, shown_url, storage_url
from kd.tune.slice import tuning_split
from kd.tune.space import paper_point, rounded, search_space, settings_at
from kd.versions import claimed_version

if TYPE_CHECKING:  # the builder is handed in; building with it needs no import here
    from kd.train.stage import StageBuilder

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class Tuned(NamedTuple):
    """What a tune chose for a stage: the run's config with the chosen settings, and the study and trials behind it
    (recorded with the stage, so --resume reuses only a stage that this very study chose)."""

    config: Config
    study: str
    trials: int


class SliceScore(pl.Callback):
    """Reports the slice's best top-1 so far to the trial after each epoch and stops the fit when Optuna's pruner
    says so. The best so far is the trial's score were it stopped now; a small student's top-1 at a high learning
    rate swings by tens of points from one epoch to the next, so pruning on the latest epoch stops good trials.

    It also beats the trial's heartbeat while it trains, so other machines can tell a live trial from a dead one.
    """

    def __init__(self, trial: optuna.Trial, storage: optuna.storages.RDBStorage) -> None:
        self.trial, self.storage, self.top1, self.pruned = trial, storage, [], False
        self.beat = time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if time.monotonic() - self.beat >= HEARTBEAT_S:
            self.storage.record_heartbeat(self.trial._trial_id)  # what Optuna's own optimize loop beats
            self.beat = time.monotonic()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.top1.append(float(trainer.callback_metrics["val/top1"]))  # logged in percent
        self.trial.report(max(self.top1), trainer.current_epoch)
        if self.trial.should_prune():
            self.pruned = trainer.should_stop = True


class Tuner:
    """One --tune of a student stage: the study of run ``c``'s baseline or distill stage (``role``; its ``teacher``,
    None for the baseline and for losses that need none), its trials, and the settings it chooses. The baseline's
    trials live in ``tune/baseline/``, the distill stage's in ``tune/``; both studies share one storage."""

    def __init__(self, c: Config, build: StageBuilder, teacher: Teacher | None, root: Path, role: Role) -> None:
        self.role, self.teacher, self.root = role, teacher, root / "tune"
        distill = role is Role.DISTILL
        self.folder = self.root if distill else self.root / "baseline"
        self.base = c if distill else replace(c, train_teacher=False, baseline=True, distill=False)
        self.seed = (c.seeds or [c.seed])[0]
        self.epochs = c.tune_epochs or c.epochs
        self.space = search_space(c, self.role)
        layout = tuning_split(build.data.layout, c.tune_fraction)
        self.data = ImageDataModule(layout, c.image_size, c.batch_size, c.num_workers, c.min_crop_scale, c.hflip,
                                    self.seed, c.image_cache, c.augment)
        logits_only = teacher is not None and not resolve_losses(c).features
        cache_dir = (c.teacher_cache or str(self.root / "teacher_cache")) if logits_only else None
        self.build = build.on(replace(self.base, teacher_cache=cache_dir, seed=self.seed), self.data)
        self.cache = self.build.teacher_cache(teacher.checkpoints, self.seed) if cache_dir else None
        self.owner = f"{socket.gethostname()}:{os.getpid()}"

    def study_name(self) -> str:
        """Named by what decides its trials' scores: the stage's flags, the teacher's bytes (not its path, which
        may differ between machines sharing the study), the split, the epochs and the space."""
        flags = replace(self.base, seed=self.seed, teacher_checkpoint=[]).identity(self.role)
        what = {"fraction": self.base.tune_fraction, "epochs": self.epochs,
                "space": {k: [r.low, r.high, r.log] for k, r in self.space.items()}}
        what[self.role.value] = flags
        if self.teacher is not None:
            what["teacher"] = [file_digest(p) for p in self.teacher.checkpoints]
        return "kd-" + hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def run(self) -> Config:
        """Run the study to --tune finished trials and return the run's config with the best settings."""
        started = time.monotonic()
        self.folder.mkdir(parents=True, exist_ok=True)
        url = storage_url(self.base, self.root)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.storage = open_storage(url)
        study = open_study(self.storage, self.study_name(), self.seed, self.base.tune, self.epochs)
        study.enqueue_trial(paper_point(self.base, self.space), skip_if_exists=True)
        print(f"\n== tune {self.role.value}: {self.base.tune} trials of {self.epochs} epochs, study "
              f"{study.study_name} in {shown_url(url)}; trials log to {self.folder / 'trials'}", flush=True)
        while (trial := self._next_trial(study)) is not None:
            self._run_trial(study, trial)
        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        if not complete:
            raise KDError(f"--tune: no trial of study {study.study_name} finished unpruned; tune with more trials")
        trial, why = chosen_trial(study, len(self.data.layout.val))
        chosen = settings_at(self.base, trial.params)
        preset = replace(chosen, tune=None, train_teacher=False, baseline=self.role is Role.BASELINE)
        if self.teacher is not None:
            preset = replace(preset, baseline=False, teacher_arch=list(self.teacher.archs),
                             ensemble_weights=list(self.teacher.weights),
                             teacher_checkpoint=[str(path) for path in self.teacher.checkpoints])
        with claimed_version(self.folder / "report") as folder:
            report = write_tune_report(study, self.space, preset, trial, why, folder, time.monotonic() - started)
        print(f"tune {self.role.value}: chose trial {trial.number}, slice top-1 {trial.value:.2f}%: "
              f"{', '.join(f'{k}={v:g}' for k, v in rounded(trial.params).items())}"
              f"{f' ({why})' if why else ''}\n"
              f"tune report: {report} (tune.png and the preset best.yaml beside it)", flush=True)
        return chosen

    def _next_trial(self, study: optuna.Study) -> optuna.Trial | None:
        """A new trial while the study has fewer than --tune finished or running ones; None once it has them all.

        Waits while other processes' trials may still finish the study; trials this host's dead
        processes left running are failed first, so a resumed tune runs them again under new numbers.
        """
        while True:
            fail_orphans(study)
            trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
            finished = sum(t.state in FINISHED for t in trials)
            if finished >= self.base.tune:
                return None
            if len(trials) < self.base.tune:
                with warnings.catch_warnings():  # kd beats the heartbeat itself (SliceScore), as optimize() would
                    warnings.filterwarnings("ignore", ".*Heartbeat of storage is supposed to be used.*")
                    trial = study.ask()
                self.storage.record_heartbeat(trial._trial_id)
                trial.set_user_attr("owner", self.owner)
                earlier = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
                if sum(t.number < trial.number for t in earlier) < self.base.tune:
                    return trial
                study.tell(trial, state=TrialState.FAIL)  # another process took the last one meanwhile
            time.sleep(2)

    def _run_trial(self, study: optuna.Study, trial: optuna.Trial) -> None:
        """Train the student with the trial's settings on the split and tell the study its best slice top-1."""
        point = {name: trial.suggest_float(name, r.low, r.high, log=r.log) for name, r in self.space.items()}
        shown = ", ".join(f"{k}={v:g}" for k, v in rounded(point).items())
        try:
            score = self._fit(trial, point)
        except NonFiniteLoss as exc:  # settings that diverge are poor ones: pruned, and the study goes on
            trial.set_user_attr("diverged", str(exc))
            study.tell(trial, state=TrialState.PRUNED)
            print(f"tune trial {trial.number}: {shown}: pruned, {exc}", flush=True)
            return
        except BaseException as exc:
            study.tell(trial, state=TrialState.FAIL)
            if isinstance(exc, SystemExit):  # Lightning's graceful stop after Ctrl+C or SIGTERM
                raise Interrupted(f"tune trial {trial.number} was interrupted; the study keeps its finished "
                                  "trials") from None
            raise
        if score.pruned:
            study.tell(trial, state=TrialState.PRUNED)
            print(f"tune trial {trial.number}: {shown}: pruned after epoch {len(score.top1)}, best slice top-1 "
                  f"{max(score.top1):.2f}%", flush=True)
        else:
            study.tell(trial, max(score.top1))
            print(f"tune trial {trial.number}: {shown}: slice top-1 {max(score.top1):.2f}%", flush=True)

    def _fit(self, trial: optuna.Trial, point: dict[str, float]) -> SliceScore:
        c = replace(settings_at(self.base, point), epochs=self.epochs, seed=self.seed)
        network = self.teacher.network if self.teacher is not None else None
        if self.teacher is not None and network is None and (self.cache is None or self.cache.missing(self.epochs)):
            network = self.build.teacher(self.teacher.archs, self.teacher.checkpoints, self.teacher.weights).network
            self.teacher = replace(self.teacher, network=network)
        model = self.build.network(c.student_arch, c.student_weights, "--student_weights", self.seed)
        module = self.build.module(self.build.distiller(model, c, network, self.cache), c.student_arch, c)
        logger = TensorBoardLogger(self.folder, name="trials", version=f"trial_{trial.number:04d}",
                                   default_hp_metric=False)
        logger.log_hyperparams(rounded(point) | {"trial": trial.number}, {"hp/slice_top1": 0.0})
        score = SliceScore(trial, self.storage)
        steps = max(1, len(self.data.layout.train) // c.batch_size)
        with quiet_trial():
            trainer = make_trainer(c, max_epochs=self.epochs, logger=logger, enable_checkpointing=False,
                                   enable_progress_bar=False, num_sanity_val_steps=0, log_every_n_steps=min(50, steps),
                                   callbacks=[score, EpochSeeding(self.data, self.seed)])
            pl.seed_everything(self.seed, workers=True, verbose=False)
            self.data.set_seed(self.seed)
            trainer.fit(module, datamodule=self.data)
        logger.log_metrics({"hp/slice_top1": max(score.top1)})
        return score


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Optuna's TPE sampler made anew for each trial, seeded by --seed and the trial's number.

    One seed for the whole study would replay its draws in every process: a resumed tune, a longer --tune
    and a second machine on the study would each try the first process's settings again. The storage
    numbers trials once across processes, so each trial draws its own, and one process with one seed
    still makes the same study twice.
    """

    def __init__(self, seed: int, startup_trials: int) -> None:
        self.seed, self.startup_trials = seed, startup_trials
        self.tpe = self._sampler(0)

    def _sampler(self, number: int) -> optuna.samplers.TPESampler:
        """The TPE sampler of trial ``number`` (numpy takes 32-bit seeds)."""
        return optuna.samplers.TPESampler(seed=draw_seed(self.seed, number) % 2**32,
                                          n_startup_trials=self.startup_trials)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.tpe = self._sampler(trial.number)
        self.tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.tpe.after_trial(study, trial, state, values)


def open_study(storage: optuna.storages.RDBStorage, name: str, seed: int, trials: int, epochs: int) -> optuna.Study:
    """The study ``name`` in ``storage``, created if new, with kd's sampler (:class:`TrialSeededSampler`) and pruner,
    for a tune of ``trials`` trials of ``epochs`` epochs."""
    return optuna.create_study(
        storage=storage, study_name=name, direction="maximize", load_if_exists=True,
        sampler=TrialSeededSampler(seed, startup_trials=max(4, trials // 3)),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=max(1, epochs // 3)))


def chosen_trial(study: optuna.Study, slice_size: int) -> tuple[FrozenTrial, str]:
    """The best finished trial, or the first trial (the flags' and papers' values) and why, when the best beats it
    by no more than two standard errors of the difference of two top-1s on ``slice_size`` images: a small slice is
    a noisy judge.
    """
    best = study.best_trial
    paper = papers_trial(study.trials)
    if paper is None or paper.state != TrialState.COMPLETE or paper.number == best.number:
        return best, ""
    p, q = best.value / 100, paper.value / 100
    margin = 200 * math.sqrt((p * (1 - p) + q * (1 - q)) / slice_size)
    if best.value - paper.value > margin:
        return best, ""
    return paper, (f"the flags' and papers' values: the best trial, {best.number}, beat them by "
                   f"{best.value - paper.value:.2f} points, within two standard errors ({margin:.2f}) on {slice_size} "
                   "slice images")


@contextmanager
def quiet_trial() -> Iterator[None]:
    """Lightning's notes and the warnings every stage silences, off for a trial: it prints one line instead."""
    notes = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    level = notes.level
    notes.setLevel(logging.WARNING)
    try:
        with fit_warnings_silenced():
            yield
    finally:
        notes.setLevel(level)


def fail_orphans(study: optuna.Study) -> None:
    """Fail the trials that processes of this machine, now dead, left running (a kill leaves them so), and
    other machines' trials whose heartbeat stopped (Optuna's stale trials)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner_host, _, pid = str(trial.user_attrs.get("owner", "")).partition(":")
        if owner_host == host and pid.isdigit() and not alive(int(pid)):
            study.tell(trial.number, state=TrialState.FAIL)


def tune_stage(c: Config, build: StageBuilder, teacher: Teacher | None, root: Path, role: Role) -> Tuned:
    """``c`` with the settings a study of --tune trials chose for the baseline or the distill stage (``role``, see
    :class:`Tuner`), and that study."""
    tuner = Tuner(c, build, teacher, root, role)
    return Tuned(tuner.run(), tuner.study_name(), c.tune)
