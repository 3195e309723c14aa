"""The plan of a run: its stages as values, built from the Config once and checked without loading anything.

A stage says what it trains (name, role, architecture, weights, seed) and where its teacher comes from: a
stage trained earlier in this run, or checkpoint files. The runner loops over the plan; the record of a
stage (its config.yaml) and what --resume compares come from here too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kd.config import FIELDS, Config, Role, identity
from kd.errors import KDError
from kd.files import checked_path
from kd.losses.base import STRONG_VIEW
from kd.losses.spec import resolve_losses
from kd.report.results import INIT_PREFIX
from kd.train.optim import check_optimizer
from kd.train.teachers import Teacher

STAGES = ("teacher", "baseline", "distill")


@dataclass(frozen=True)
class TeacherFrom:
    """Where a stage's teacher comes from: an earlier stage of this run (``stage`` of ``seed``), or, with no stage,
    the --teacher_checkpoint files (checked and loaded once, by :func:`kd.run.checks.check_experiment`)."""

    stage: str | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Stage:
    """One stage of one seed: what it trains, from what, and whether it is tuned first or teaches a later stage."""

    name: str  # teacher, baseline, assistant1, ..., distill, or generation1, ..., generationN (--born_again)
    role: Role  # the flags that make it what it is (an assistant is a distill stage)
    arch: str
    seed: int
    weights: str | None = None  # --teacher_weights or --student_weights to start from
    weights_flag: str = "--student_weights"
    teacher: TeacherFrom | None = None
    baseline: str | None = None  # the stage (of this seed) whose top-1 its teacher should beat
    tune: bool = False  # --tune searches its settings before it trains (then every seed's stage of its name has them)
    teaches: bool = False  # a later stage (or --export's comparison) learns from it
    init: bool = False  # the init phase of the stage after it: trains only its losses' init_loss (FSP, AB, FT)
    lr: float | None = None  # its own peak learning rate (--teacher_lr, --assistant_lr), else the run's --lr
    starts_from: str | None = None  # the stage of this seed whose last weights (student and losses) it starts from

    @property
    def key(self) -> tuple[str, int]:
        return self.name, self.seed


@dataclass
class Plan:
    """A checked run: its stages in order, its processes and the given teacher (--teacher_checkpoint)."""

    stages: list[Stage]
    world_size: int
    teacher: Teacher | None  # loaded unless the teacher cache holds all its outputs


def plan_stages(c: Config) -> list[Stage]:
    """The stages of run ``c`` for each seed, refusing combinations of flags that cannot work.

    The teacher is trained once (with the first seed) unless --repeat_teacher asks for one per seed. With
    --assistant_arch, each assistant learns from the network before it, and the student from the last one. With
    --born_again N, N generations of the student replace the distill stage: the first learns from the teacher (or,
    without one, from the seed's baseline student), each later one from the one before.
    """
    wanted = check_stages(c)
    stages, teacher_seed = [], None
    for index, seed in enumerate(c.seeds or [c.seed]):
        if "teacher" in wanted and (index == 0 or c.repeat_teacher):
            teacher_seed = seed
            stages.append(Stage("teacher", Role.TEACHER, c.teacher_arch[0], seed, c.teacher_weights,
                                "--teacher_weights", teaches=True, lr=c.teacher_lr))
        if "baseline" in wanted:
            stages.append(Stage("baseline", Role.BASELINE, c.student_arch, seed, c.student_weights,
                                tune=index == 0 and bool(c.tune), teaches=bool(c.born_again and not teacher_given(c))))
        if "distill" in wanted:
            source = (None if resolve_losses(c).teacher_free or not teacher_given(c) else
                      TeacherFrom("teacher", teacher_seed) if c.train_teacher else TeacherFrom())
            for number, arch in enumerate(c.assistant_arch, start=1):
                lr = c.assistant_lr[number - 1] if c.assistant_lr else None
                stages += with_init(c, Stage(f"assistant{number}", Role.DISTILL, arch, seed, teacher=source,
                                             teaches=True, lr=lr))
                source = TeacherFrom(f"assistant{number}", seed)
            baseline = "baseline" if "baseline" in wanted else None
            if c.born_again:
                source = source if teacher_given(c) else TeacherFrom("baseline", seed)
                for number in range(1, c.born_again + 1):
                    stages += with_init(c, Stage(f"generation{number}", Role.DISTILL, c.student_arch, seed,
                                                 c.student_weights, teacher=source, baseline=baseline,
                                                 teaches=number < c.born_again))
                    source = TeacherFrom(f"generation{number}", seed)
                continue
            # Tuned once, before the first seed's student (kd.run.checks refuses --tune with assistants).
            stages += with_init(c, Stage("distill", Role.DISTILL, c.student_arch, seed, c.student_weights,
                                         teacher=source, baseline=baseline, tune=index == 0 and bool(c.tune)))
    return stages


def with_init(c: Config, stage: Stage) -> list[Stage]:
    """A distill stage, preceded by its init phase when a loss has one (RepDistiller's ``init()``: FSP's and AB's
    student warm-up, FT's paraphraser): a stage of its own (``init_<name>``), resumable and reused like any, from
    whose last weights the distillation starts."""
    if stage.teacher is None or not resolve_losses(c).with_init:
        return [stage]
    name = f"{INIT_PREFIX}{stage.name}"
    return [replace(stage, name=name, init=True, baseline=None, tune=False, teaches=False),
            replace(stage, starts_from=name)]


def teacher_given(c: Config) -> bool:
    """Whether run ``c`` has a teacher: one it trains, or --teacher_checkpoint files."""
    return bool(c.train_teacher or c.teacher_checkpoint)


def teacher_files(c: Config) -> tuple[Path, ...]:
    """The --teacher_checkpoint files as absolute paths, each one Python can look at (else one line naming it)."""
    return tuple(checked_path(path, "--teacher_checkpoint").resolve() for path in c.teacher_checkpoint)


def stage_record(c: Config, stage: Stage, teacher: Teacher | None) -> Config:
    """``c`` narrowed to one stage: saved as its config.yaml (``--config`` repeats that stage alone), and what
    --resume compares. A stage with a teacher records the very teacher and loss settings in force, so --resume
    never mixes them up."""
    config = replace(c, seed=stage.seed, seeds=[], train_teacher=stage.name == "teacher",
                     baseline=stage.name == "baseline", distill=stage.role is Role.DISTILL, assistant_arch=[],
                     born_again=None, lr=stage.lr or c.lr, teacher_lr=None, assistant_lr=[])
    if stage.init:  # RepDistiller's init(): its losses' epochs, at a constant learning rate, no average
        (loss,) = resolve_losses(c).with_init
        init_lr = loss.settings["init_lr"].value if "init_lr" in loss.settings else None  # FT's 0.01, say
        config = replace(config, epochs=loss.init_epochs, scheduler="none", milestones=[], warmup_epochs=0.0,
                         ema=None, lr=init_lr or config.lr, optimizer="sgd", dot_delta=FIELDS["dot_delta"].default)
    if teacher is None:  # trained on labels alone, or by losses that need no teacher
        return with_weights_in_force(config) if stage.role is Role.DISTILL else config
    return replace(with_weights_in_force(config), teacher_arch=list(teacher.archs),
                   teacher_checkpoint=[str(path) for path in teacher.checkpoints],
                   ensemble_weights=list(teacher.weights), student_arch=stage.arch, student_weights=stage.weights)


def with_weights_in_force(c: Config) -> Config:
    """``c`` with the loss settings as they apply (see :mod:`kd.losses.spec`): --kd_weights, --ce_weight and the one
    --temperature in force. A distill stage records them, so its config.yaml says what ran and a changed default
    never lets --resume reuse a stage trained with the old one."""
    losses = resolve_losses(c)
    return replace(c, kd_weights=losses.weights, ce_weight=losses.ce_weight.value, temperature=losses.temperature)


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


def check_stages(c: Config) -> list[str]:
    """The stages to run, refusing combinations that cannot work."""
    stages = [s for s, on in zip(STAGES, (c.train_teacher, c.baseline, c.distill)) if on]
    if not stages:
        raise KDError("nothing to run: pass --train_teacher, --baseline and/or --distill")
    twice = sorted(seed for seed, times in Counter(c.seeds).items() if times > 1)  # linear: lists may be long
    if twice:
        raise KDError(f"--seeds: {', '.join(map(str, twice))} given more than once; a seed repeated trains the "
                      "same runs again (and reports a spread of 0)")
    if c.distill and c.train_teacher and c.teacher_checkpoint:
        raise KDError("--teacher_checkpoint and --train_teacher both given: distill from one or the other")
    teacher_free = c.distill and resolve_losses(c).teacher_free
    if c.born_again:
        _check_born_again(c, teacher_free)
    if c.mutual:
        _check_mutual(c, teacher_free)
    elif c.mutual_weight != FIELDS["mutual_weight"].default:
        raise KDError(f"--mutual_weight {c.mutual_weight}: it weighs the peers of --mutual, and none are given")
    if c.distill:
        _check_init(c)
    if c.teacher_lr is not None and not c.train_teacher:
        raise KDError(f"--teacher_lr {c.teacher_lr}: it is the learning rate of a teacher this run trains; add "
                      "--train_teacher, or drop it")
    if c.distill and not (teacher_given(c) or teacher_free or c.mutual or (c.born_again and c.baseline)):
        raise KDError("--distill needs a teacher: add --train_teacher or --teacher_checkpoint PATH")
    if teacher_free and (teacher_given(c) or c.assistant_arch or c.teacher_layers):
        given = {"--teacher_checkpoint": c.teacher_checkpoint, "--train_teacher": c.train_teacher,
                 "--assistant_arch": c.assistant_arch, "--teacher_layers": c.teacher_layers}
        flag = next(name for name, value in given.items() if value)
        raise KDError(f"--kd_loss {' '.join(c.kd_loss)} needs no teacher (it makes its own soft labels), but {flag} "
                      "gives one: drop it, or add a loss that learns from a teacher")
    if c.assistant_arch and not c.distill:
        raise KDError("--assistant_arch trains teacher assistants on the way to the student: add --distill")
    if c.assistant_lr and len(c.assistant_lr) != len(c.assistant_arch):
        raise KDError(f"--assistant_lr {' '.join(map(str, c.assistant_lr))}: give one learning rate per "
                      f"--assistant_arch ({len(c.assistant_arch)}: {' '.join(c.assistant_arch) or 'none'})")
    _check_teachers(c)
    if c.distill and (c.mixup or c.cutmix):
        _check_mixing(c)
    if c.milestones and c.scheduler != "multistep":
        raise KDError(f"--milestones {' '.join(map(str, c.milestones))}: they are for --scheduler multistep, "
                      f"not {c.scheduler}")
    if c.scheduler == "multistep" and not c.milestones:
        raise KDError("--scheduler multistep needs --milestones: the epochs after which the learning rate decays")
    check_optimizer(c)
    return stages


def _check_born_again(c: Config, teacher_free: bool) -> None:
    """Refuse --born_again where generations cannot follow one another."""
    if not c.distill:
        raise KDError(f"--born_again {c.born_again} trains generations of distilled students: add --distill")
    if teacher_free:
        raise KDError(f"--born_again with --kd_loss {' '.join(c.kd_loss)}: each generation learns from the one "
                      "before, and this loss needs no teacher; choose a loss that learns from one")
    if c.assistant_arch:
        raise KDError("--born_again with --assistant_arch: generations repeat the student, assistants step down to it; "
                      "use one or the other")
    if not (teacher_given(c) or c.baseline):
        raise KDError(f"--born_again {c.born_again} without a teacher distils its first generation from the baseline "
                      "student: add --baseline, or a teacher (--train_teacher or --teacher_checkpoint)")


def _check_mutual(c: Config, teacher_free: bool) -> None:
    """Refuse --mutual where its peers cannot train beside the student: they learn from logits alone, in one
    distill stage, each network by its own parameters."""
    peers = f"--mutual {' '.join(c.mutual)}"
    if not c.distill:
        raise KDError(f"{peers} trains peers beside the student in its distill stage: add --distill")
    others = {"--born_again": c.born_again, "--assistant_arch": c.assistant_arch, "--ema": c.ema,
              "--optimizer dot": c.optimizer == "dot"}
    clash = next((flag for flag, value in others.items() if value), None)
    if clash:
        why = {"--ema": "the average is kept of the student alone",
               "--optimizer dot": "it splits one network's gradients into the cross-entropy's and the distillation's"}
        raise KDError(f"{peers} with {clash}: {why.get(clash, 'the peers train in one distill stage')}; use one or "
                      "the other")
    losses = resolve_losses(c)
    unfit = [loss.spec for loss in losses.losses if loss.features or {"indices", STRONG_VIEW} & set(loss.extras)]
    if unfit:
        raise KDError(f"{peers} with --kd_loss {' '.join(unfit)}: every network learns from the teacher's logits, "
                      "and this loss needs features, per-image indices or a second view; choose losses of logits")
    if teacher_free:
        raise KDError(f"{peers} with --kd_loss {' '.join(c.kd_loss)}: the peers learn from each other (and a teacher, "
                      "if given), not from this loss's own soft labels; choose a loss that learns from a teacher")
    if c.teacher_cache and not teacher_given(c):
        raise KDError(f"{peers} with --teacher_cache and no teacher: there are no teacher outputs to cache; drop it")


def _check_init(c: Config) -> None:
    """Refuse an init phase (FSP, AB, FT) where it cannot run: beside another loss's, or before a tuned stage."""
    with_init = [loss.spec for loss in resolve_losses(c).with_init]
    if len(with_init) > 1:
        raise KDError(f"--kd_loss {' '.join(with_init)}: each has an init phase before distillation, and a stage has "
                      "one; combine at most one of them with other losses")
    if with_init and c.tune:
        raise KDError(f"--tune with --kd_loss {with_init[0]}: its init phase runs before distillation, and the "
                      "tune's trials would skip it; tune without it, or drop --tune")


def _check_mixing(c: Config) -> None:
    """Refuse losses that learn per dataset image (they take ``indices``: CRD's memory bank); a mixed image is two."""
    losses = resolve_losses(c)
    indexed = [loss.spec for loss in losses.needing("indices")]
    if indexed:
        raise KDError(f"--kd_loss {' '.join(indexed)} with --mixup {c.mixup} --cutmix {c.cutmix}: it learns per "
                      "dataset image (indices), and a mixed image is two images; drop the loss or the mixing")
    viewed = [loss.spec for loss in losses.needing(STRONG_VIEW)]
    if viewed:
        raise KDError(f"--kd_loss {' '.join(viewed)} with --mixup {c.mixup} --cutmix {c.cutmix}: it compares two "
                      "augmented views of each image, which mixing would pair with other images; drop the mixing")


def _check_teachers(c: Config) -> None:
    """One --teacher_arch to train, or one per --teacher_checkpoint (or one for all); ensemble weights to match."""
    count = len(c.teacher_checkpoint)
    if not c.teacher_arch and (c.train_teacher or c.distill):
        raise KDError("--teacher_arch names no network")
    if c.train_teacher and len(c.teacher_arch) != 1:
        raise KDError(f"--train_teacher trains one teacher, but --teacher_arch names {len(c.teacher_arch)}: "
                      f"{' '.join(c.teacher_arch)}")
    if count and len(c.teacher_arch) not in (1, count):
        raise KDError(f"--teacher_arch names {len(c.teacher_arch)} networks for {count} --teacher_checkpoint "
                      "files: give one for all, or one per checkpoint")
    if c.ensemble_weights and (count < 2 or len(c.ensemble_weights) != count or not sum(c.ensemble_weights)):
        raise KDError(f"--ensemble_weights {' '.join(map(str, c.ensemble_weights))}: give one weight per "
                      f"--teacher_checkpoint ({count}), for an ensemble of two or more, not all zero")


