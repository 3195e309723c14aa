"""Born-again networks (``--born_again N``): the ensemble of a seed's generations, evaluated after the last one.

Each generation is an ordinary distill stage (planned by :mod:`kd.run.plan`); what Furlanello et al. (2018) add
is the ensemble of all of them, whose logits are averaged. It is evaluated on the validation set once the last
generation finished and reported as a row of its own (stage ``ensemble``, its log folder the last generation's),
beside the generations, in the summary and report.md; it trains nothing, so it is not saved as a stage:
``--report`` over finished runs does not show it, and a resumed run evaluates it again from the checkpoints.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

from kd.config import Config
from kd.deploy.metrics import device_of, evaluate
from kd.report.results import StageResult

if TYPE_CHECKING:  # the runner's builder is handed in; evaluating needs no import of it
    from kd.train.stage import StageBuilder


def last_generation(name: str, config: Config) -> bool:
    """Whether stage ``name`` is the last generation of --born_again, after which the ensemble is evaluated."""
    return bool(config.born_again) and name == f"generation{config.born_again}"


def ensemble_of_generations(generations: list[StageResult], build: StageBuilder, config: Config) -> StageResult:
    """The validation top-1 and top-5 of the mean of the ``generations``' logits, as a result row: stage ``ensemble``,
    its architecture ``N×ARCH``, its parameters and training time all of theirs.

    Each generation takes part with its last epoch's weights (``last.ckpt``), as its headline figure does: their
    best epochs were selected on val/, which the ensemble is scored on.
    """
    started = time.monotonic()
    checkpoints = tuple((r.log_dir / "checkpoints" / "last.ckpt").resolve() for r in generations)
    members = build.teacher(tuple(r.arch for r in generations), checkpoints)
    data, device = build.data, device_of(config.accelerator)
    scores = evaluate(members.network, data.val_dataloader(), data.classes, device, config.augment)
    last = generations[-1]
    return replace(last, stage="ensemble", arch=f"{len(generations)}×{last.arch}",
                   params=sum(r.params for r in generations), best_top1=scores.top1, best_top5=scores.top5,
                   best_epoch=len(last.val_top1) - 1, seconds=sum(r.seconds for r in generations)
                   + time.monotonic() - started, best_checkpoint=checkpoints[-1], val_top1=[scores.top1],
                   last_top5=scores.top5, warnings=[], teachers=[], teacher_top1=None)
