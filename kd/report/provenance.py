"""How each finished stage was trained, for reports: what it learned from and with which settings.

Everything is read from the ``config.yaml`` a stage saves beside its ``result.json``. Reading is
lenient: a missing file or key (a run saved by an older kd, a flag another version added) shows as
``-`` or "not recorded", so a report of old runs still shows their results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import yaml

from kd.config import FIELDS, TYPES, is_list, scalar_type
from kd.errors import warn
from kd.losses.base import LOSSES  # its package registers every loss
from kd.losses.options import loss_key
from kd.losses.spec import losses_in_force
from kd.report.results import StageResult
from kd.tables import text_table

CONFIG_FILE = "config.yaml"
# Settings some runs record and others lack; shown (as flag=value) when a stage's config sets them.
OPTIONAL_PREFIXES = ("label_smoothing", "mixup", "cutmix", "ema")
_LONGEST_CHAIN = 20  # assistants followed at most, in case checkpoints were copied into a loop


def _fits(name: str, value: Any) -> bool:
    """Whether a saved ``value`` of flag ``name`` is of the flag's type: a number for a number (true and false are
    no numbers), any scalar for a string; a list flag's items each so, or its one value saved alone by an older kd."""
    kind = scalar_type(name)
    if value is None:
        return is_list(name) or type(None) in get_args(TYPES[name])
    if is_list(name) and isinstance(value, list):
        return all(item is not None and _fits(name, item) for item in value)
    if kind is str:
        return isinstance(value, (str, int, float))
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def mistyped(config: dict[str, Any]) -> dict[str, str]:
    """The flags of a saved config.yaml whose value is of the wrong type (a hand edit), each with what is wrong.

    Flags kd does not know (from another version) are not judged.
    """
    return {name: f"{name} is {type(value).__name__} {_short(value)}, not "
                  f"{f'a list of {scalar_type(name).__name__}' if is_list(name) else scalar_type(name).__name__}"
            for name, value in config.items() if name in FIELDS and not _fits(name, value)}


def _short(value: Any) -> str:
    """``value`` as an error shows it: repr'd and cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "…"


def saved_config(log_dir: Path) -> dict[str, Any] | None:
    """The stage's saved settings; None when its config.yaml is missing or unreadable. A flag of the wrong type (a
    hand edit) is left out, as not recorded, with a warning naming it: a report still shows the stage's results."""
    path = log_dir / CONFIG_FILE
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError, RecursionError):  # ValueError: a NUL in a recorded path, or not UTF-8
        return None
    if not isinstance(data, dict):
        return None
    wrong = mistyped(data)
    for why in wrong.values():
        warn(f"{path}: {why}; the report shows it as not recorded")
    return {name: value for name, value in data.items() if name not in wrong}


def shown_path(path: str | Path, experiment: Path) -> str:
    """``path`` relative to the experiment folder when it lies inside it, else as recorded."""
    try:
        return str(Path(path).resolve().relative_to(experiment.resolve()))
    except (ValueError, OSError):
        return str(path)


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [] if value is None else [value]


def _teachers(config: dict[str, Any], result: StageResult | None) -> list[tuple[str, str]]:
    """(arch, checkpoint) of each teacher: from the config, else from result.json's record."""
    checkpoints = [str(path) for path in _listed(config.get("teacher_checkpoint"))]
    archs = [str(arch) for arch in _listed(config.get("teacher_arch"))]
    if checkpoints and archs:
        return list(zip(archs * len(checkpoints) if len(archs) == 1 else archs, checkpoints))
    return [(str(t.get("arch", "?")), str(t.get("checkpoint", "?"))) for t in (result.teachers if result else [])]


def learned_from(config: dict[str, Any], experiment: Path, result: StageResult | None = None, depth: int = 0) -> str:
    """The teacher a distilled stage learned from: ``arch (checkpoint)``; an ensemble lists each member
    (with its weight when given), and a teacher that was itself an assistant is preceded by its chain."""
    teachers = _teachers(config, result)
    if not teachers:
        return "not recorded"
    if len(teachers) > 1:
        weights = [f" ×{w:g}" for w in _listed(config.get("ensemble_weights"))] or [""] * len(teachers)
        return f"ensemble of {len(teachers)}: " + ", ".join(
            f"{arch} ({shown_path(path, experiment)}){w}" for (arch, path), w in zip(teachers, weights))
    arch, path = teachers[0]
    here = f"{arch} ({shown_path(path, experiment)})"
    stage_folder = Path(path).parent.parent  # <stage>/version_N/checkpoints/best.ckpt
    earlier = saved_config(stage_folder) if stage_folder.parent.name.startswith("assistant") else None
    if earlier and _teachers(earlier, None) and depth < _LONGEST_CHAIN:
        return f"{learned_from(earlier, experiment, depth=depth + 1)} → {here}"
    return here


def temperature(config: dict[str, Any]) -> str:
    """The softmax temperature in force: --temperature as the stage recorded it, else each loss's own default
    (registered losses only: a report never imports a user's code); --loss_options that set one are added as given
    (they take precedence)."""
    given = config.get("temperature")
    if isinstance(given, (int, float)):
        text = f"{given:g}"
    else:
        registered = list(dict.fromkeys(str(spec) for spec in _listed(config.get("kd_loss")) if str(spec) in LOSSES))
        losses = losses_in_force(registered, [], None, None, []).losses if registered else ()  # each once: no error
        defaults = [(loss.key, loss.settings["temperature"].value) for loss in losses if "temperature" in loss.settings]
        text = ", ".join(f"{t:g} ({key}'s default)" for key, t in defaults if isinstance(t, (int, float))) or "-"
    options = [str(o) for o in _listed(config.get("loss_options")) if "temperature=" in str(o)]
    return "; ".join([text, *options])


def weights(config: dict[str, Any]) -> str:
    """The loss weights in force (a distill stage records them): ``ce 0.1, kl_softmax 0.9``."""
    losses, kd_weights = _listed(config.get("kd_loss")), _listed(config.get("kd_weights"))
    terms = [f"{loss_key(str(spec))} {w:g}" for spec, w in zip(losses, kd_weights) if isinstance(w, (int, float))]
    ce = config.get("ce_weight")
    return ", ".join([*([f"ce {ce:g}"] if isinstance(ce, (int, float)) else []), *terms]) or "-"


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def optional_settings(config: dict[str, Any]) -> str:
    """Label smoothing, mixup, EMA and the like, where the stage recorded them set."""
    return ", ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in config.items()
                     if key.startswith(OPTIONAL_PREFIXES) and value not in (None, False, 0, "", [], "none")) or "-"


def settings_row(result: StageResult) -> tuple[str, ...]:
    """What ``result``'s stage learned from, T, the loss weights, lr, epochs and other recorded settings."""
    config = saved_config(result.log_dir)
    if config is None:
        return ("not recorded (no readable config.yaml)", *["-"] * 5)
    distilled = bool(result.kd_loss or result.teachers)
    source = learned_from(config, result.log_dir.parent.parent, result) if distilled else "labels only"
    return (source, temperature(config) if distilled else "-", weights(config) if distilled else "-",
            _number(config.get("lr")), _number(config.get("epochs")), optional_settings(config))


def settings_table(results: list[StageResult], markdown: bool = False) -> str:
    """One row per stage and set of settings (seeds that share them share a row)."""
    many = len({r.experiment for r in results}) > 1
    rows: dict[tuple[str, ...], list[str]] = {}
    for r in results:
        key = (f"{r.experiment}/{r.label}" if many else r.label, *settings_row(r))
        rows.setdefault(key, []).append(str(r.seed))
    header = ("run", "seeds", "learned from", "temperature", "loss weights", "lr", "epochs", "other")
    return text_table(header, [(key[0], " ".join(seeds), *key[1:]) for key, seeds in rows.items()], markdown)
