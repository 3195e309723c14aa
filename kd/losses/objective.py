"""The training objective of a distillation stage: ce_weight·CE(labels, label smoothing) + Σ weightᵢ·lossᵢ.

Any number of registered or user losses combine; each gets only the settings and extras it names,
and every term is returned by name so that it is logged on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd.errors import KDError
from kd.losses.base import STRONG_VIEW, Loss, build_loss, loss_property, loss_terms, wanted_extras
from kd.losses.spec import ResolvedLosses


class _Function(nn.Module):
    """A plain loss function held as a module, so every loss sits in one ModuleDict."""

    def __init__(self, function: Callable[..., Any]) -> None:
        super().__init__()
        self.function = function

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)


class Objective(nn.Module):
    """The weighted sum of the label cross-entropy and the distillation losses, term by term."""

    def __init__(self, losses: dict[str, Loss], weights: dict[str, float], ce_weight: float,
                 label_smoothing: float = 0.0, init_keys: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.losses = nn.ModuleDict({k: v if isinstance(v, nn.Module) else _Function(v) for k, v in losses.items()})
        self.extras = {key: wanted_extras(loss) for key, loss in losses.items()}
        self.connect = {key: bool(loss_property(loss, "connect")) for key, loss in losses.items()}
        self.weights = dict(weights)
        self.ce_weight, self.label_smoothing = ce_weight, label_smoothing
        self.needs_features = any(loss_property(loss, "features") for loss in losses.values())
        self.needs_connectors = any(self.connect.values())
        self.needs_strong_view = any(STRONG_VIEW in extras for extras in self.extras.values())
        self.init_keys = list(init_keys)  # the losses with an init phase of at least one epoch
        self.init_trains_student = any(loss_property(losses[key], "init_trains_student") for key in self.init_keys)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                targets: torch.Tensor | None = None, **extras: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss and its terms (``ce``, ``kd/<loss>`` or ``kd/<loss>/<term>``), each unweighted.

        The cross-entropy compares with ``targets`` (label distributions of mixed images) when given, else
        with ``labels``, which the losses get. ``extras`` holds the features, indices, epoch and the strong view's
        logits (MLKD's, student's and teacher's);
        ``connected_features`` replaces the student's features for losses that compare them element by element.
        """
        ce = F.cross_entropy(student_logits, labels if targets is None else targets,
                             label_smoothing=self.label_smoothing)
        total, terms = self.ce_weight * ce, {"ce": ce}
        for key, loss in self.losses.items():
            given = {name: extras[name] for name in self.extras[key]}
            if self.connect[key]:
                given["student_features"] = extras["connected_features"]
            try:
                output = loss_terms(key, loss(student_logits, teacher_logits, labels, **given))
            except KDError:
                raise
            except Exception as exc:  # a loss that fails on this batch: name it (a user's loss, a shape mismatch)
                raise KDError(f"--kd_loss {key}: {type(exc).__name__}: {exc}") from None
            total = total + self.weights[key] * sum(output.values())
            terms |= {f"kd/{key}" if name == key else f"kd/{key}/{name}": value for name, value in output.items()}
        return total, terms

    def init_step(self, student_features: dict[str, torch.Tensor], teacher_features: dict[str, torch.Tensor],
                  connected_features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The init phase's loss (the init losses summed, unweighted, as RepDistiller's ``init()``) and its terms
        (``init/<loss>``)."""
        terms = {}
        for key in self.init_keys:
            student = connected_features if self.connect[key] else student_features
            try:
                value = self.losses[key].init_loss(student, teacher_features)
            except Exception as exc:  # a shape the loss cannot take: name it
                raise KDError(f"--kd_loss {key}: its init phase: {type(exc).__name__}: {exc}") from None
            terms[f"init/{key}"] = loss_terms(key, value)[key]
        return sum(terms.values()), terms

    def init_parameters(self) -> list[nn.Parameter]:
        """What the init phase trains of the losses: each init loss's :meth:`init_parameters`."""
        return [p for key in self.init_keys
                for p in getattr(self.losses[key], "init_parameters", self.losses[key].parameters)()]

    def main_parameters(self) -> list[nn.Parameter]:
        """What distillation trains of the losses: each loss's own ``main_parameters()``, or all of its parameters."""
        return [p for loss in self.losses.values() for p in getattr(loss, "main_parameters", loss.parameters)()]

    def split(self, terms: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The two parts that :meth:`forward` sums, from the ``terms`` it returned: ce_weight·CE, and Σ weightᵢ·lossᵢ
        over the distillation losses (None without one), for an optimiser that treats their gradients apart (DOT).

        A term ``kd/<loss>`` or ``kd/<loss>/<term>`` belongs to the loss of the longest key that names it so.
        """
        distillation = None
        for name, value in terms.items():
            if name == "ce":
                continue
            key = max((k for k in self.losses if name == f"kd/{k}" or name.startswith(f"kd/{k}/")), key=len)
            weighted = self.weights[key] * value
            distillation = weighted if distillation is None else distillation + weighted
        return self.ce_weight * terms["ce"], distillation


def build_objective(losses: ResolvedLosses, label_smoothing: float = 0.0, **settings: Any) -> Objective:
    """The objective of a run's resolved losses (see :mod:`kd.losses.spec`), and ``--label_smoothing`` of its
    cross-entropy.

    ``settings`` are what the run knows (num_classes, num_samples, feature shapes); each loss takes those it
    names, besides the settings the flags gave it.
    """
    built = {loss.key: build_loss(loss.spec, **(settings | loss.options)) for loss in losses.losses}
    weights = {loss.key: loss.weight.value for loss in losses.losses}
    return Objective(built, weights, losses.ce_weight.value, label_smoothing,
                     tuple(loss.key for loss in losses.with_init))
