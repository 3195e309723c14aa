"""Everything a run can get wrong up front, checked before the first stage starts.

Data, architectures, losses, layers, the teacher checkpoint, the caches, the hardware and the output
folder are tried here, so a bad flag never costs a trained teacher. The checks read (files, the
teacher, the caches) and build throwaway networks; they never write.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dataclasses import replace
from pathlib import Path

from kd.config import Config, Role
from kd.errors import KDError
from kd.files import check_writable
from kd.losses.base import STRONG_VIEW
from kd.losses.spec import resolve_losses
from kd.models.build import check_forward
from kd.models.checkpoints import require_file
from kd.run.plan import Plan, plan_stages, teacher_files, teacher_given
from kd.train.teachers import Teacher, teacher_archs
from kd.train.trainer import make_trainer
from kd.tune.slice import tuning_split
from kd.tune.space import search_space
from kd.tune.storage import check_storage

if TYPE_CHECKING:  # the builder is handed in; building with it needs no import here
    from kd.train.stage import StageBuilder


def check_run(c: Config) -> Plan:
    """What can be checked before the data is read (or generated, or downloaded): flags, hardware, output folder."""
    stages = plan_stages(c)
    # Checks the hardware flags now; the process count sizes the logging interval.
    world_size = make_trainer(c, logger=False, enable_checkpointing=False, enable_progress_bar=False).world_size
    check_writable(Path(c.output_dir) / c.experiment_name, "--output_dir")
    if c.tune:
        check_tune(c, world_size)
    return Plan(stages, world_size, None)


def check_tune(c: Config, world_size: int) -> None:
    """Refuse a --tune that cannot work: no student stage, assistants, a cache-only teacher, several processes, a bad
    space or storage."""
    if not (c.baseline or c.distill):
        raise KDError("--tune searches the settings of the student stages: add --baseline and/or --distill")
    if c.assistant_arch or c.born_again or c.mutual:
        flag = "--assistant_arch" if c.assistant_arch else "--born_again" if c.born_again else "--mutual"
        raise KDError(f"--tune with {flag}: a tune searches one distillation; tune without {flag}")
    if c.teacher_cache_only:
        raise KDError("--tune with --teacher_cache_only: trials train on the training set less a held-out slice, whose "
                      "teacher logits the cache does not hold; drop --teacher_cache_only")
    if world_size > 1:
        raise KDError("--tune: trials run in one process; tune on one device (several machines can share one study "
                      "through --tune_storage)")
    for role in [Role.BASELINE] * c.baseline + [Role.DISTILL] * c.distill:
        search_space(c, role)
    if c.tune_storage:
        check_storage(c.tune_storage)


def check_experiment(c: Config, build: StageBuilder, plan: Plan) -> Plan:
    """Check the rest of run ``c`` with the data ``build`` holds: networks, losses, teacher, caches."""
    classes = build.classes
    # Build and run each network once now, so a bad name, weights file or input size fails before training.
    if c.train_teacher:
        model = build.network(c.teacher_arch[0], c.teacher_weights, "--teacher_weights", c.seed)
        check_forward(model, c.teacher_arch[0], c.image_size, len(classes), "--teacher_arch")
    if c.baseline or c.distill:
        model = build.network(c.student_arch, c.student_weights, "--student_weights", c.seed)
        check_forward(model, c.student_arch, c.image_size, len(classes), "--student_arch")
    for arch in c.mutual if c.distill else []:
        check_forward(build.network(arch, None, "--mutual", c.seed), arch, c.image_size, len(classes), "--mutual")
    if c.tune:
        tuning_split(build.data.layout, c.tune_fraction)
    return replace(plan, teacher=_check_distillation(c, build, plan.world_size) if c.distill else None)


def _check_distillation(c: Config, build: StageBuilder, world_size: int) -> Teacher | None:
    """Check the losses, layers, assistants and caches, and run one trial step of every distillation.

    Returns the --teacher_checkpoint teacher (its network None when the cache holds everything).
    """
    losses = resolve_losses(c)
    features, teacher_free = losses.features, losses.teacher_free
    if features and len(c.teacher_checkpoint) > 1:
        raise KDError(f"--kd_loss {' '.join(c.kd_loss)}: feature losses compare one teacher's features; an "
                      "ensemble of --teacher_checkpoint files has logits only")
    if features and teacher_free and (not c.student_layers or c.teacher_layers):
        raise KDError(f"--kd_loss {' '.join(c.kd_loss)}: it reads the student's own features, with no teacher: "
                      "give --student_layers (e.g. layer3) and no --teacher_layers")
    if features and not teacher_free and not (c.student_layers and c.teacher_layers):
        raise KDError(f"--kd_loss {' '.join(c.kd_loss)}: feature losses need --student_layers and "
                      "--teacher_layers (module names, e.g. layer3 layer4)")
    if not teacher_free and len(c.student_layers) != len(c.teacher_layers):
        raise KDError(f"--student_layers names {len(c.student_layers)} module(s) but --teacher_layers "
                      f"{len(c.teacher_layers)}: they are compared pair by pair")
    if c.teacher_cache_only and not c.teacher_cache:
        raise KDError("--teacher_cache_only needs --teacher_cache DIR")
    if c.teacher_cache and teacher_free:
        raise KDError(f"--teacher_cache with --kd_loss {' '.join(c.kd_loss)}: it needs no teacher, so there are no "
                      "teacher outputs to cache; drop --teacher_cache")
    viewed = [loss.spec for loss in losses.needing(STRONG_VIEW)]
    if world_size > 1 and losses.with_init and "find_unused_parameters_true" not in c.strategy:
        raise KDError(f"--kd_loss {losses.with_init[0].spec} with several processes: its init phase leaves parts of "
                      "the student without a gradient, which DDP refuses; pass --strategy "
                      "ddp_find_unused_parameters_true")
    mixed_apart = world_size > 1 and (c.mixup or c.cutmix)
    if c.teacher_cache and (features or viewed or mixed_apart or c.assistant_arch or c.born_again):
        why = ("feature losses need the teacher's features, and the cache holds logits only" if features else
               f"--kd_loss {' '.join(viewed)} needs the teacher's logits of a second, strongly augmented view of "
               "each image, which the cache does not hold" if viewed else
               "with --mixup or --cutmix an image is mixed with its neighbour in the batch, and several processes "
               "batch the images otherwise than one; cache a run on one device, or drop the mixing" if mixed_apart
               else "each assistant is a new teacher; cache the final distillation in a run without assistants"
               if c.assistant_arch else "each generation is a new teacher; cache a run without --born_again")
        raise KDError(f"--teacher_cache: {why}")
    if c.teacher_cache:
        check_writable(c.teacher_cache, "--teacher_cache")
    paths = teacher_files(c)
    for path in paths:  # before the teacher cache's key reads them
        require_file(path, "--teacher_checkpoint")
    if c.teacher_cache_only and not paths:
        raise KDError("--teacher_cache_only needs --teacher_checkpoint: the cache is keyed by its content")
    caches = [build.teacher_cache(paths, seed) for seed in c.seeds or [c.seed]] if c.teacher_cache and paths else []
    missing = [(cache, split) for cache in caches for split in cache.missing(c.epochs)]
    teacher = None
    if paths:
        if c.teacher_cache_only and missing:
            splits = [split for _, split in missing]
            raise KDError(f"--teacher_cache_only: {missing[0][0].folder} lacks {', '.join(splits[:3])}"
                          f"{' ...' if len(splits) > 3 else ''} for this teacher, data, transforms and seed")
        teacher = build.teacher(tuple(teacher_archs(c)), paths, tuple(c.ensemble_weights), load=not caches or missing)
    chain = [c.teacher_arch[0], *c.assistant_arch, c.student_arch]
    if c.born_again:  # the first generation learns from the teacher or the baseline, later ones from a student
        chain = [c.teacher_arch[0] if teacher_given(c) else c.student_arch, c.student_arch,
                 *[c.student_arch] * (c.born_again > 1)]
    trial = replace(c, compile=False)
    for index, (teacher_arch, student_arch) in enumerate(zip(chain, chain[1:])):
        unteached = teacher_free or (c.mutual and not teacher_given(c))
        network = (None if unteached else teacher.network if index == 0 and teacher is not None and
                   teacher.network is not None else build.network(teacher_arch, None, "--teacher_arch", c.seed))
        student = build.network(student_arch, None, "--assistant_arch", c.seed)
        check_forward(student, student_arch, c.image_size, len(build.classes), "--assistant_arch")
        phases = (True, False) if network is not None and losses.with_init else (False,)  # FSP's, AB's, FT's init
        for init_phase in phases:
            distiller = build.distiller(student, trial, network, None, init_phase)
            try:
                distiller.check_step(c.image_size, len(build.classes))
            finally:
                distiller.remove_hooks()
    return teacher

