"""The distillation losses of a run, resolved once: each loss with every setting in force and where it came from.

The precedence rule lives here alone: a loss's own ``--loss_options NAME.SETTING=V``, then a shared
``--loss_options SETTING=V``, then ``--temperature`` (for a temperature), then the paper's default; a weight
is ``--kd_weights``' or the paper's, the CE weight ``--ce_weight`` or the smallest paper CE weight. Building
the objective, the stage record, ``--tune``'s space, the report's provenance and the up-front checks all read
this one resolution.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from kd.errors import KDError
from kd.losses.base import LOSSES, RUN_SETTINGS, Range, accepted_settings, loss_property, wanted_extras
from kd.losses.options import loss_key, parse_loss_options
from kd.registry import did_you_mean

if TYPE_CHECKING:
    from kd.config import Config

DEFAULT = "default"  # the source of a value nobody set: the loss's paper
_REQUIRED = inspect.Parameter.empty  # a constructor setting without a default


@dataclass(frozen=True)
class Setting:
    """One value in force: what it is, where it came from (a flag, or ``default``) and the paper's default."""

    value: Any
    source: str
    default: Any

    @property
    def given(self) -> bool:
        """Whether a flag set it (rather than the paper)."""
        return self.source != DEFAULT


@dataclass(frozen=True)
class ResolvedLoss:
    """One ``--kd_loss`` entry: its factory, its weight and settings in force, and what it needs from the run."""

    spec: str  # as written: kl_softmax, my_losses.py:SoftCE
    key: str  # the name it is logged and configured under
    factory: Any  # the registered class or function, or the user's
    weight: Setting
    settings: dict[str, Setting]  # its constructor's settings (those the run supplies left out)
    accepts_any: bool  # its constructor takes **kwargs: options pass through as given

    @property
    def features(self) -> bool:
        return bool(loss_property(self.factory, "features"))

    @property
    def needs_teacher(self) -> bool:
        return bool(loss_property(self.factory, "needs_teacher"))

    @property
    def extras(self) -> tuple[str, ...]:
        """The extras (features, indices, epoch) its call names."""
        return wanted_extras(getattr(self.factory, "forward", self.factory))

    @property
    def space(self) -> dict[str, Range]:
        """What --tune may search of it (its declared ranges)."""
        return dict(getattr(self.factory, "space", {}))

    @property
    def init_epochs(self) -> int:
        """The epochs of its init phase before distillation (RepDistiller's ``init()``: FSP, AB, FT); 0 without."""
        has = hasattr(self.factory, "init_loss") and "init_epochs" in self.settings
        return int(self.settings["init_epochs"].value) if has else 0

    @property
    def options(self) -> dict[str, Any]:
        """The settings flags gave it, as its constructor receives them (defaults stay the constructor's own)."""
        return {name: setting.value for name, setting in self.settings.items() if setting.given}


@dataclass(frozen=True)
class ResolvedLosses:
    """Every loss of a run and the label cross-entropy's weight beside them."""

    losses: tuple[ResolvedLoss, ...]
    ce_weight: Setting
    temperature: float | None  # the one temperature all losses having one run at (see :func:`_one_temperature`)

    @property
    def weights(self) -> list[float]:
        return [loss.weight.value for loss in self.losses]

    @property
    def features(self) -> bool:
        """Whether any loss compares hooked features."""
        return any(loss.features for loss in self.losses)

    @property
    def teacher_free(self) -> bool:
        """Whether no loss reads the teacher's outputs (USKD, TF-KD's virtual teacher): a distill stage needs none."""
        return not any(loss.needs_teacher for loss in self.losses)

    @property
    def with_init(self) -> list[ResolvedLoss]:
        """The losses whose init phase runs before distillation (a stage of its own; see :mod:`kd.run.plan`)."""
        return [loss for loss in self.losses if loss.init_epochs > 0]

    def needing(self, extra: str) -> list[ResolvedLoss]:
        """The losses whose call names ``extra`` (``indices``, ``epoch``, ...)."""
        return [loss for loss in self.losses if extra in loss.extras]


def resolve_losses(c: Config) -> ResolvedLosses:
    """The run's losses as ``c``'s --kd_loss, --kd_weights, --ce_weight, --temperature and --loss_options set them."""
    return losses_in_force(c.kd_loss, c.kd_weights, c.ce_weight, c.temperature, c.loss_options)


def losses_in_force(specs: list[str], weights: list[float], ce_weight: float | None, temperature: float | None,
                    options: list[str]) -> ResolvedLosses:
    """The losses ``specs`` with their settings in force, refusing weights, names and options that do not fit."""
    keys = [loss_key(spec) for spec in specs]
    if not specs:
        raise KDError("--kd_loss: name at least one distillation loss")
    if len(set(keys)) != len(keys):
        raise KDError(f"--kd_loss: {', '.join(specs)} names a loss twice")
    if weights and len(weights) != len(specs):
        raise KDError(f"--kd_weights: {len(weights)} weight(s) for {len(specs)} loss(es) in --kd_loss "
                      f"({' '.join(specs)}); give one per loss, or none for the papers' weights")
    own, shared = parse_loss_options(options, keys)
    factories = [LOSSES.get(spec) for spec in specs]
    accepted = [accepted_settings(factory) for factory in factories]
    _check_options(keys, accepted, own, shared)
    everyone = {"temperature": (temperature, "--temperature")} if temperature is not None else {}
    everyone |= {name: (value, f"--loss_options {name}") for name, value in shared.items()}
    losses = []
    for index, (spec, key, factory, names) in enumerate(zip(specs, keys, factories, accepted)):
        given = everyone | {name: (value, f"--loss_options {key}.{name}") for name, value in own[key].items()}
        settings = {name: Setting(*given[name], default) if name in given else Setting(default, DEFAULT, default)
                    for name, default in _defaults(factory).items() if name in given or default is not _REQUIRED}
        for name, setting in settings.items():
            _check_value(key, name, setting)
        if names is None:  # **kwargs: whatever the flags give passes through
            settings |= {name: Setting(value, source, None) for name, (value, source) in given.items()
                         if name not in settings}
        paper = float(loss_property(factory, "weight"))
        weight = Setting(float(weights[index]), "--kd_weights", paper) if weights else Setting(paper, DEFAULT, paper)
        losses.append(ResolvedLoss(spec, key, factory, weight, settings, names is None))
    paper_ce = min(float(loss_property(factory, "ce_weight")) for factory in factories)
    ce = Setting(ce_weight, "--ce_weight", paper_ce) if ce_weight is not None else Setting(paper_ce, DEFAULT, paper_ce)
    return ResolvedLosses(tuple(losses), ce, _one_temperature(losses, temperature))


def paper_value(factory: Any, setting: str) -> float:
    """The paper's value of one setting of a loss class: its ``weight``, ``ce_weight`` or a constructor default."""
    if setting in ("weight", "ce_weight"):
        return float(loss_property(factory, setting))
    return float(_defaults(factory)[setting])


def _defaults(factory: Any) -> dict[str, Any]:
    """A loss constructor's own named settings (those the run supplies left out) and their defaults, in its order;
    ``_REQUIRED`` for one without a default. A constructor taking ``**kwargs`` still names its own; a plain
    function, or a class without a constructor, has none."""
    inherited = isinstance(factory, type) and factory.__init__ in (object.__init__, nn.Module.__init__)
    if inherited or inspect.isfunction(factory):
        return {}
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name: _REQUIRED if p.default is inspect.Parameter.empty else p.default
            for name, p in parameters.items() if p.kind in named and name not in RUN_SETTINGS}


def _check_options(keys: list[str], accepted: list[set[str] | None], own: dict[str, dict[str, Any]],
                   shared: dict[str, Any]) -> None:
    """Refuse options that set what the run supplies, or that no chosen loss has."""
    for name in [*shared, *(setting for chosen in own.values() for setting in chosen)]:
        if name in RUN_SETTINGS:
            raise KDError(f"--loss_options: {name} is set by kd from the data and networks, not by an option")
    for key, names in zip(keys, accepted):
        for setting in own[key]:
            if names is not None and setting not in names:
                choices = sorted(names - RUN_SETTINGS)
                raise KDError(f"--loss_options {key}.{setting}: {key} has no setting {setting}"
                              f"{did_you_mean(setting, choices)}; its settings: {', '.join(choices) or 'none'}")
    known = sorted(set().union(*(names for names in accepted if names is not None)) - RUN_SETTINGS)
    for name in shared:
        if name != "temperature" and not any(names is None or name in names for names in accepted):
            raise KDError(f"--loss_options {name}=...: none of --kd_loss ({', '.join(keys)}) has that setting"
                          f"{did_you_mean(name, known)}; their settings: {', '.join(known) or 'none'}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_value(key: str, name: str, setting: Setting) -> None:
    """Refuse a flag's value the loss cannot use: text where its paper has a number, a temperature not above 0."""
    if not setting.given:
        return
    if _number(setting.default) and not _number(setting.value):
        raise KDError(f"{setting.source}: {key}'s {name} is a number (its paper's is {setting.default:g}), "
                      f"not {setting.value!r}")
    if name == "temperature" and _number(setting.value) and not setting.value > 0:
        raise KDError(f"{setting.source}: a softmax temperature must be above 0, got {setting.value:g}")


def _one_temperature(losses: list[ResolvedLoss], given: float | None) -> float | None:
    """The one temperature every loss having one runs at, recorded with a distill stage.

    Stays ``given`` (--temperature) where there is no single value (no loss has one, they differ) or a loss takes
    any setting (``**kwargs``), to which a temperature recorded here would be new.
    """
    if any(loss.accepts_any for loss in losses):
        return given
    found = {loss.settings["temperature"].value for loss in losses if "temperature" in loss.settings}
    value = found.pop() if len(found) == 1 else None
    return float(value) if _number(value) else given
