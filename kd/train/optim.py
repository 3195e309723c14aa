"""Optimiser and learning-rate schedule of a stage: the settings as one object, and the tables they name."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import lr_scheduler

from kd.config import Config

OPTIMIZERS = {
    "sgd": lambda params, lr, momentum, wd: torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd),
    "adam": lambda params, lr, momentum, wd: torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999),
                                                              weight_decay=wd),
    "adamw": lambda params, lr, momentum, wd: torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999),
                                                                weight_decay=wd),
}
# Each schedule gets the optimiser, its length in steps, the --milestones in steps from its start, and --lr_decay.
SCHEDULERS = {
    "cosine": lambda opt, steps, milestones, decay: lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps)),
    "step": lambda opt, steps, milestones, decay: lr_scheduler.MultiStepLR(opt, milestones=[steps // 2, steps * 3 // 4],
                                                                          gamma=0.1),
    "multistep": lambda opt, steps, milestones, decay: lr_scheduler.MultiStepLR(opt, milestones, gamma=decay),
    "none": lambda opt, steps, milestones, decay: lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0),
}


@dataclass(frozen=True)
class OptimSettings:
    """How a stage's parameters are optimised: the optimiser, its learning rate and schedule."""

    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: tuple[int, ...] = ()  # epochs, for the multistep schedule
    lr_decay: float = 0.1

    @classmethod
    def from_config(cls, config: Config) -> OptimSettings:
        return cls(config.optimizer, config.lr, config.momentum, config.weight_decay, config.scheduler,
                   config.warmup_epochs, tuple(config.milestones), config.lr_decay)

    def configure(self, params: Iterable[torch.nn.Parameter], total_steps: int, epochs: int) -> dict[str, Any]:
        """Lightning's ``configure_optimizers`` answer: the optimiser and a per-step schedule over ``total_steps``.

        A linear warm-up of ``warmup_epochs`` (of ``epochs``) precedes the schedule; ``milestones`` count
        epochs from the start of the run, warm-up included.
        """
        optimizer = OPTIMIZERS[self.optimizer](params, self.lr, self.momentum, self.weight_decay)
        steps_per_epoch = total_steps / max(1, epochs)
        warmup = min(int(self.warmup_epochs * steps_per_epoch), total_steps - 1)
        milestones = [max(1, round(m * steps_per_epoch) - warmup) for m in self.milestones]
        schedule = SCHEDULERS[self.scheduler](optimizer, total_steps - warmup, milestones, self.lr_decay)
        if warmup > 0:
            ramp = lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), total_iters=warmup)
            schedule = lr_scheduler.SequentialLR(optimizer, [ramp, schedule], milestones=[warmup])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
