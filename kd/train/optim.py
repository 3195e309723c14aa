"""Optimiser and learning-rate schedule of a stage: the settings as one object, and the tables they name.

``--optimizer dot`` is the Distillation-Oriented Trainer (Zhao et al., ICCV 2023; mdistiller's
``engine/dot.py``): SGD that keeps one momentum buffer for the distillation loss's gradient and another for
the cross-entropy's, so the training step hands it the two gradients apart (see :mod:`kd.train.module`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import lr_scheduler

from kd.config import FIELDS, Config
from kd.errors import KDError


class DistillationOrientedTrainer(torch.optim.Optimizer):
    """DOT: SGD whose momentum is ``momentum + delta`` for the distillation gradient and ``momentum - delta`` for
    the cross-entropy's, so that the distillation loss leads the optimisation (Zhao et al., ICCV 2023).

    Before each :meth:`step`, the distillation loss's gradient is handed over with
    :meth:`hold_distillation_gradients`; the cross-entropy's is each parameter's ``.grad``. A parameter with no
    gradient from one loss (``None``: the loss does not reach it) is "reached by one loss only". The update is
    mdistiller's (``DistillationOrientedTrainer.step`` and its ``dot`` function), with ``m = momentum``,
    ``d = delta``, ``wd = weight_decay`` and ``a = ((m + d) + (m - d)) / 2``, the momentum of a one-loss parameter:

    * cross-entropy gradient g: ``u = g + wd·p``; ``b_ce = u`` on its first step, then ``b_ce = (m - d)·b_ce + u``
      if the distillation loss also reaches p, else ``a·b_ce + u``; ``p -= lr·b_ce`` (with ``m - d = 0``,
      no buffer: ``p -= lr·u``);
    * then distillation gradient h: ``b_kd = h`` on its first step, then ``b_kd = (m + d)·b_kd + h`` if the
      cross-entropy also reaches p, else ``a·b_kd + h + wd·p``; ``p -= lr·b_kd``.

    Weight decay is part of the cross-entropy gradient, or of the distillation gradient for a parameter only the
    distillation reaches (connectors, a loss's own parameters), where, as in mdistiller, the first step has
    none. Without a distillation gradient every parameter is a one-loss parameter: SGD with momentum ``m``.
    Both buffers are optimiser state (``ce_momentum_buffer``, ``kd_momentum_buffer``), saved in checkpoints.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float, momentum: float, delta: float,
                 weight_decay: float = 0.0) -> None:
        if not 0 <= delta <= momentum or momentum + delta >= 1:
            raise ValueError(f"DOT needs 0 <= delta <= momentum and momentum + delta < 1, got momentum {momentum}, "
                             f"delta {delta}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "delta": delta, "weight_decay": weight_decay})
        self._distillation: dict[torch.Tensor, torch.Tensor] = {}

    def hold_distillation_gradients(self, params: Sequence[torch.Tensor],
                                    grads: Sequence[torch.Tensor | None]) -> None:
        """Keep the distillation loss's gradient of each of ``params`` (None: not reached) for the next step."""
        self._distillation = {p: g for p, g in zip(params, grads) if g is not None}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update with the cross-entropy gradients (``.grad``) and the held distillation gradients, then drop these.

        Lightning runs the training step (which holds them) and the backward pass in ``closure``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        distillation, self._distillation = self._distillation, {}
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            ce_momentum, kd_momentum = group["momentum"] - group["delta"], group["momentum"] + group["delta"]
            one_loss = (kd_momentum + ce_momentum) / 2
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=wd) if wd else p.grad
                if ce_momentum:
                    buffer = self.state[p].get("ce_momentum_buffer")
                    if buffer is None:
                        buffer = self.state[p]["ce_momentum_buffer"] = update.clone()
                    else:
                        buffer.mul_(ce_momentum if p in distillation else one_loss).add_(update)
                    update = buffer
                p.add_(update, alpha=-lr)
            for p in group["params"]:
                grad = distillation.get(p)
                if grad is None:
                    continue
                buffer = self.state[p].get("kd_momentum_buffer")
                if buffer is None:
                    buffer = self.state[p]["kd_momentum_buffer"] = grad.clone()
                elif p.grad is not None:
                    buffer.mul_(kd_momentum).add_(grad)
                else:
                    buffer.mul_(one_loss).add_(grad.add(p, alpha=wd) if wd else grad)
                p.add_(buffer, alpha=-lr)
        return loss


# Each optimiser gets the parameters and the stage's OptimSettings.
OPTIMIZERS: dict[str, Callable[[Iterable[nn.Parameter], OptimSettings], torch.optim.Optimizer]] = {
    "sgd": lambda params, o: torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay),
    "adam": lambda params, o: torch.optim.Adam(params, lr=o.lr, betas=(o.momentum, 0.999),
                                               weight_decay=o.weight_decay),
    "adamw": lambda params, o: torch.optim.AdamW(params, lr=o.lr, betas=(o.momentum, 0.999),
                                                 weight_decay=o.weight_decay),
    "dot": lambda params, o: DistillationOrientedTrainer(params, lr=o.lr, momentum=o.momentum, delta=o.dot_delta,
                                                         weight_decay=o.weight_decay),
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
    dot_delta: float = FIELDS["dot_delta"].default

    @classmethod
    def from_config(cls, config: Config) -> OptimSettings:
        return cls(config.optimizer, config.lr, config.momentum, config.weight_decay, config.scheduler,
                   config.warmup_epochs, tuple(config.milestones), config.lr_decay, config.dot_delta)

    def configure(self, params: Iterable[torch.nn.Parameter], total_steps: int, epochs: int) -> dict[str, Any]:
        """Lightning's ``configure_optimizers`` answer: the optimiser and a per-step schedule over ``total_steps``.

        A linear warm-up of ``warmup_epochs`` (of ``epochs``) precedes the schedule; ``milestones`` count
        epochs from the start of the run, warm-up included.
        """
        optimizer = OPTIMIZERS[self.optimizer](params, self)
        steps_per_epoch = total_steps / max(1, epochs)
        warmup = min(int(self.warmup_epochs * steps_per_epoch), total_steps - 1)
        milestones = [max(1, round(m * steps_per_epoch) - warmup) for m in self.milestones]
        schedule = SCHEDULERS[self.scheduler](optimizer, total_steps - warmup, milestones, self.lr_decay)
        if warmup > 0:
            ramp = lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), total_iters=warmup)
            schedule = lr_scheduler.SequentialLR(optimizer, [ramp, schedule], milestones=[warmup])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def check_optimizer(c: Config) -> None:
    """Refuse optimiser flags that cannot work together, in one line naming them (before anything runs).

    A stage without distillation (teacher, baseline) is allowed with ``--optimizer dot``: with the
    cross-entropy's gradient alone, DOT is SGD with momentum ``--momentum``.
    """
    if c.optimizer != "dot":
        if c.dot_delta != FIELDS["dot_delta"].default:
            raise KDError(f"--dot_delta {c.dot_delta}: it is for --optimizer dot, not {c.optimizer}")
        return
    if c.dot_delta > c.momentum:
        raise KDError(f"--optimizer dot --dot_delta {c.dot_delta} --momentum {c.momentum}: the cross-entropy's "
                      f"momentum, --momentum - --dot_delta, would be negative; keep --dot_delta at most --momentum")
    if c.momentum + c.dot_delta >= 1:
        raise KDError(f"--optimizer dot --dot_delta {c.dot_delta} --momentum {c.momentum}: the distillation "
                      "gradient's momentum, --momentum + --dot_delta, must stay below 1 (at 1 it never decays)")
    if "fsdp" in c.strategy or "deepspeed" in c.strategy:
        raise KDError(f"--optimizer dot --strategy {c.strategy}: DOT takes the distillation gradient of whole "
                      "parameters outside the strategy's backward pass, which a sharding strategy does not allow; "
                      "use --strategy auto or ddp")


def check_dot_backward(model: nn.Module, own_parameters: Sequence[nn.Parameter]) -> None:
    """Refuse DOT under DDP without unused-parameter detection when the distillation has parameters of its own.

    ``model`` is the strategy's (DDP-wrapped) module and ``own_parameters`` the trained parameters outside the
    student (connectors, a loss's parameters). Lightning's backward pass only computes the cross-entropy's
    gradient, which never reaches those, and DDP without detection waits for their gradients forever.
    """
    if own_parameters and isinstance(model, DistributedDataParallel) and not model.find_unused_parameters:
        raise KDError("--optimizer dot under DDP: the cross-entropy's backward pass does not reach the distillation's "
                      "own parameters (connectors, loss parameters), which DDP then waits for; use --strategy "
                      "ddp_find_unused_parameters_true")


def distillation_gradients(part: torch.Tensor, params: Sequence[torch.Tensor], scale: float,
                           mean: Callable[[torch.Tensor], torch.Tensor] | None) -> list[torch.Tensor | None]:
    """The gradient of ``part`` for each of ``params`` (None where it does not reach), the graph kept for the
    backward pass that follows.

    ``scale`` is the mixed-precision loss scale (1 without one): the part is multiplied by it so that small
    half-precision gradients do not vanish, and the gradients divided by it. ``mean`` averages a tensor over the
    processes (None with one process): DDP averages the other gradient the same way.
    """
    grads = list(torch.autograd.grad(part * scale if scale != 1 else part, params, retain_graph=True,
                                     allow_unused=True))
    grads = [g if g is None or scale == 1 else g / scale for g in grads]
    if mean is not None:  # every parameter goes in, a zero where this process has no gradient: the shapes agree
        flat = mean(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]))
        averaged = [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in params]), params)]
        grads = [None if g is None else a for g, a in zip(grads, averaged)]
    return grads
