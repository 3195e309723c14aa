"""What ``--tune`` searches for a student stage, and the settings a point of that search stands for.

Every tuned student stage searches the same training settings (:func:`training_ranges`: the learning rate,
weight decay and label smoothing, around the flags' values), so a tuned baseline and a tuned distillation
differ only by what distillation adds. A distill stage also searches each chosen loss's declared ``space``
(its weight, the CE weight, its temperature and own settings), less what the run fixes with --kd_weights,
--ce_weight, --temperature or --loss_options. ``--tune_space NAME=LOW:HIGH[:log]`` replaces a range. A point
becomes ordinary flags: --lr, --weight_decay, --label_smoothing, --kd_weights, --ce_weight and
``NAME.SETTING=VALUE`` loss options, which the stage records. A loss with ``share_of_total`` searched alone
gives the CE weight the rest of the papers' total.
"""

from __future__ import annotations

from dataclasses import replace

from kd.config import Config, Role
from kd.errors import KDError
from kd.losses.base import Range, loss_property
from kd.losses.spec import Setting, paper_value, resolve_losses
from kd.registry import did_you_mean

CE = "ce_weight"
TRAINING = ("lr", "weight_decay", "label_smoothing")  # searched by every tuned student stage


def training_ranges(c: Config) -> dict[str, Range]:
    """The training settings every tuned student stage searches: the learning rate from a fifth to five times
    --lr, the weight decay from a tenth to ten times --weight_decay (not searched when it is 0: no decay was
    asked for), and label smoothing from 0 to 0.2 (or to --label_smoothing, if higher); each range holds the
    flag's value, the first trial."""
    ranges = {"lr": Range(c.lr / 5, c.lr * 5, log=True)}
    if c.weight_decay > 0:
        ranges["weight_decay"] = Range(c.weight_decay / 10, c.weight_decay * 10, log=True)
    ranges["label_smoothing"] = Range(0.0, max(0.2, c.label_smoothing))
    return ranges


def _declared(c: Config) -> dict[str, tuple[Range, str]]:
    """Every setting the chosen losses declare a range for, with the flag that fixes it in this run ('' if none)."""
    losses = resolve_losses(c)
    ce_ranges = [loss.space[CE] for loss in losses.losses if CE in loss.space]
    declared = {}
    if ce_ranges:
        declared[CE] = (Range(min(r.low for r in ce_ranges), max(r.high for r in ce_ranges),
                              all(r.log for r in ce_ranges)), _fixed_by(losses.ce_weight))
    for loss in losses.losses:
        for setting, bounds in loss.space.items():
            if setting == CE:
                continue
            if setting != "weight" and setting not in loss.settings:
                raise KDError(f"--tune: {loss.key} declares a search range for {setting}, which is not a setting of "
                              f"its constructor (its settings: {', '.join(loss.settings) or 'none'})")
            value = loss.weight if setting == "weight" else loss.settings[setting]
            declared[f"{loss.key}.{setting}"] = (bounds, _fixed_by(value))
    return declared


def _fixed_by(setting: Setting) -> str:
    """The flag that set a value (the first word of its source), or '' for the paper's."""
    return setting.source.split()[0] if setting.given else ""


def parse_range(option: str) -> tuple[str, Range]:
    """``NAME=LOW:HIGH[:log]`` as a name and a Range, refusing empty ranges and log scales reaching 0."""
    name, eq, text = option.partition("=")
    parts = text.split(":")
    try:
        low, high = float(parts[0]), float(parts[1])
        ok = eq and len(parts) in (2, 3) and parts[2:] in ([], ["log"])
    except (ValueError, IndexError):
        ok = False
    if not ok:
        raise KDError(f"--tune_space {option}: expected NAME.SETTING=LOW:HIGH or NAME.SETTING=LOW:HIGH:log, "
                      "e.g. kl_softmax.temperature=1:8")
    if not low < high:
        raise KDError(f"--tune_space {option}: the range {low:g} to {high:g} is empty; LOW must be below HIGH")
    if parts[2:] and low <= 0:
        raise KDError(f"--tune_space {option}: a log range must start above 0")
    return name, Range(low, high, bool(parts[2:]))


def _share(c: Config, searched: set[str]) -> tuple[str, float] | None:
    """The loss whose searched weight leaves the CE weight the rest of its papers' total, and that total.

    That is the one chosen loss with ``share_of_total``, when no other range or flag sets the CE weight.
    """
    shares = [loss for loss in resolve_losses(c).losses if loss_property(loss.factory, "share_of_total")]
    if len(shares) != 1 or CE in searched or c.ce_weight is not None or f"{shares[0].key}.weight" not in searched:
        return None
    return shares[0].key, paper_value(shares[0].factory, "weight") + paper_value(shares[0].factory, CE)


def search_space(c: Config, role: Role = Role.DISTILL) -> dict[str, Range]:
    """The ranges ``--tune`` samples for the student stage of ``role``, by name (``lr``, ``ce_weight``,
    ``kl_softmax.weight``, ``dkd.beta``, ...). A ``--tune_space`` range of a setting this stage does not search
    (a loss's, for the baseline) is left to the stage that does; one no tuned stage searches is refused."""
    distill = role is Role.DISTILL
    training = training_ranges(c)
    losses = _declared(c) if distill or c.distill else {}
    declared = {**losses, **{name: (bounds, "") for name, bounds in training.items()}}
    space = {name: bounds for name, (bounds, fixed) in declared.items() if not fixed and (distill or name in training)}
    for option in c.tune_space:
        name, bounds = parse_range(option)
        if name not in declared and name not in TRAINING:
            raise KDError(f"--tune_space {option}: no setting {name} to search"
                          f"{did_you_mean(name, [*declared, *TRAINING])}; the tuned stages' settings: "
                          f"{', '.join(declared) or 'none'}")
        if name in declared and declared[name][1]:
            raise KDError(f"--tune_space {option}: {name} is fixed by {declared[name][1]}; drop one of the two")
        if distill or name in TRAINING:
            space[name] = bounds
    share = _share(c, set(space)) if distill else None
    if share and space[f"{share[0]}.weight"].high >= share[1]:
        raise KDError(f"--tune_space: {share[0]}.weight is its share of the papers' total weight {share[1]:g} (the CE "
                      f"weight gets the rest), so its range must stay below {share[1]:g}")
    return space


def paper_point(c: Config, space: dict[str, Range]) -> dict[str, float]:
    """The first trial of a study: the flags' training settings and the papers' values of the losses' settings,
    those that lie inside their ranges."""
    losses = resolve_losses(c) if any(name not in TRAINING for name in space) else None
    by_key = {loss.key: loss for loss in losses.losses} if losses else {}
    point = {}
    for name, bounds in space.items():
        key, _, setting = name.rpartition(".")
        loss = by_key.get(key)
        value = float(getattr(c, name) if name in TRAINING else losses.ce_weight.default if name == CE else
                      loss.weight.default if setting == "weight" else loss.settings[setting].default)
        if bounds.low <= value <= bounds.high:
            point[name] = value
    return point


def rounded(point: dict[str, float]) -> dict[str, float]:
    """A point's values to 4 significant digits: what trials train with and the stage records, readably."""
    return {name: float(f"{value:.4g}") for name, value in point.items()}


def settings_at(c: Config, point: dict[str, float]) -> Config:
    """``c`` with the settings of a point of the search: --lr, --weight_decay and --label_smoothing, and, when the
    point holds loss settings, --kd_weights, --ce_weight and loss options."""
    point = rounded(point)
    c = replace(c, **{name: point[name] for name in TRAINING if name in point})
    point = {name: value for name, value in point.items() if name not in TRAINING}
    if not point:
        return c
    losses = resolve_losses(c)
    keys, weights, ce_weight = [loss.key for loss in losses.losses], losses.weights, losses.ce_weight.value
    if share := _share(c, set(point)):
        ce_weight = rounded({CE: share[1] - point[f"{share[0]}.weight"]})[CE]
    options = [f"{name}={value:g}" for name, value in point.items() if name != CE and not name.endswith(".weight")]
    return replace(c, kd_weights=[point.get(f"{key}.weight", weight) for key, weight in zip(keys, weights)],
                   ce_weight=point.get(CE, ce_weight), loss_options=[*c.loss_options, *options])
