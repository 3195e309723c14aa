"""The training objective of a distillation stage: ce_weight·CE(labels, label smoothing) + Σ weightᵢ·lossᵢ.

Any number of registered or user losses combine; each gets only the settings and extras it names,
and every term is returned by name so that it is logged on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from kd.errors import KDError
from kd.losses.base import (LOSSES, RUN_SETTINGS, Loss, accepted_settings, build_loss, loss_property, loss_terms,
                            wanted_extras)
from kd.registry import did_you_mean


class _Function(nn.Module):
    """A plain loss function held as a module, so every loss sits in one ModuleDict."""

    def __init__(self, function: Callable[..., Any]) -> None:
        super().__init__()
        self.function = function

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)


def loss_key(spec: str) -> str:
    """The name a loss is logged and configured under: ``pkg.mod:MyLoss`` → ``MyLoss``."""
    return spec.rpartition(":")[2]


def parse_loss_options(options: list[str], keys: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``NAME.SETTING=VALUE`` options per loss, and ``SETTING=VALUE`` ones for every loss (values read as YAML)."""
    own: dict[str, dict[str, Any]] = {key: {} for key in keys}
    shared: dict[str, Any] = {}
    for option in options:
        target, eq, raw = option.partition("=")
        name, dot, setting = target.rpartition(".")
        if not eq or not setting.isidentifier() or (dot and not name):
            raise KDError(f"--loss_options {option}: expected NAME.SETTING=VALUE or SETTING=VALUE, e.g. dkd.beta=4")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if not dot:
            shared[setting] = value
        elif name in own:
            own[name][setting] = value
        else:
            raise KDError(f"--loss_options {option}: {name} is not one of --kd_loss ({', '.join(keys)})"
                          f"{did_you_mean(name, keys)}")
    return own, shared


class Objective(nn.Module):
    """The weighted sum of the label cross-entropy and the distillation losses, term by term."""

    def __init__(self, losses: dict[str, Loss], weights: dict[str, float], ce_weight: float,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.losses = nn.ModuleDict({k: v if isinstance(v, nn.Module) else _Function(v) for k, v in losses.items()})
        self.extras = {key: wanted_extras(loss) for key, loss in losses.items()}
        self.connect = {key: bool(loss_property(loss, "connect")) for key, loss in losses.items()}
        self.weights = dict(weights)
        self.ce_weight, self.label_smoothing = ce_weight, label_smoothing
        self.needs_features = any(loss_property(loss, "features") for loss in losses.values())
        self.needs_connectors = any(self.connect.values())

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                targets: torch.Tensor | None = None, **extras: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss and its terms (``ce``, ``kd/<loss>`` or ``kd/<loss>/<term>``), each unweighted.

        The cross-entropy compares with ``targets`` (label distributions of mixed images) when given, else
        with ``labels``, which the losses get. ``extras`` holds the features, indices and epoch;
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


def build_objective(specs: list[str], weights: list[float], ce_weight: float | None, temperature: float | None,
                    options: list[str], label_smoothing: float = 0.0, **settings: Any) -> Objective:
    """The objective of ``--kd_loss``/``--kd_weights``/``--ce_weight``/``--temperature``/``--loss_options``
    (and ``--label_smoothing`` of its cross-entropy).

    ``settings`` are what the run knows (num_classes, num_samples, feature shapes); each loss takes
    those it names. Unset weights come from each loss's paper (its ``weight`` and ``ce_weight``).
    """
    keys = [loss_key(spec) for spec in specs]
    if not specs:
        raise KDError("--kd_loss: name at least one distillation loss")
    if len(set(keys)) != len(keys):
        raise KDError(f"--kd_loss: {', '.join(specs)} names a loss twice")
    if weights and len(weights) != len(specs):
        raise KDError(f"--kd_weights: {len(weights)} weight(s) for {len(specs)} loss(es) in --kd_loss "
                      f"({' '.join(specs)}); give one per loss, or none for the papers' weights")
    own, shared = parse_loss_options(options, keys)
    for name in [*shared, *(setting for chosen in own.values() for setting in chosen)]:
        if name in RUN_SETTINGS:
            raise KDError(f"--loss_options: {name} is set by kd from the data and networks, not by an option")
    accepted = {key: accepted_settings(LOSSES.get(spec)) for spec, key in zip(specs, keys)}
    for key, names in accepted.items():
        for setting in own[key]:
            if names is not None and setting not in names:
                choices = sorted(names - RUN_SETTINGS)
                raise KDError(f"--loss_options {key}.{setting}: {key} has no setting {setting}"
                              f"{did_you_mean(setting, choices)}; its settings: {', '.join(choices) or 'none'}")
    known = sorted(set().union(*(names for names in accepted.values() if names is not None)) - RUN_SETTINGS)
    for name in shared:
        if name != "temperature" and not any(names is None or name in names for names in accepted.values()):
            raise KDError(f"--loss_options {name}=...: none of --kd_loss ({', '.join(keys)}) has that setting"
                          f"{did_you_mean(name, known)}; their settings: {', '.join(known) or 'none'}")
    if temperature is not None:
        shared.setdefault("temperature", temperature)
    losses = {key: build_loss(spec, **(settings | shared | own[key])) for spec, key in zip(specs, keys)}
    chosen, ce_weight = weights_in_force(list(losses.values()), weights, ce_weight)
    return Objective(losses, dict(zip(keys, chosen)), ce_weight, label_smoothing)


def weights_in_force(losses: list[Any], weights: list[float], ce_weight: float | None) -> tuple[list[float], float]:
    """--kd_weights and --ce_weight as they apply: given, or each loss's paper value (the smallest paper CE weight).

    ``losses`` are the losses or their classes (``LOSSES.get(spec)``): both declare ``weight`` and ``ce_weight``.
    """
    chosen = list(weights) if weights else [float(loss_property(loss, "weight")) for loss in losses]
    if ce_weight is None:
        ce_weight = min(float(loss_property(loss, "ce_weight")) for loss in losses)
    return chosen, ce_weight
