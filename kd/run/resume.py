"""Finding a stage's earlier run for --resume: same flags, same classes, a checkpoint that still loads."""

from __future__ import annotations

import filecmp
from pathlib import Path
from typing import Any

import yaml

from kd.config import Config, Role
from kd.errors import KDError
from kd.models.build import build_model
from kd.models.checkpoints import load_weights, read_checkpoint
from kd.report.provenance import mistyped
from kd.report.results import RESULT_FILE, StageResult
from kd.run.plan import saved_identity


def find_earlier(folder: Path, config: Config, role: Role, arch: str, classes: list[str],
                 tune: tuple[int, str] | None = None) -> tuple[StageResult | Path | None, list[str]]:
    """The latest run under stage ``folder`` whose saved flags of ``role`` are ``config``'s (the stage's record), and
    why others were passed over.

    Its result if it finished, its folder if it can continue from ``last.ckpt``, None if none can. A run
    whose checkpoint cannot be read, does not fit an ``arch``, or learned other ``classes`` is left as it is.
    A finished run is reused only if the same tune chose its settings (``tune``: trials and study; None: untuned),
    so a tuned stage is never an untuned one that happened to keep the flags' values, nor the other way round.
    """
    passed, wanted = list[str](), config.identity(role)
    for version in _versions(folder):
        if saved_identity(_moved_along(_saved_config(version), folder.parent), config, role) != wanted:
            continue
        result = StageResult.load(version / RESULT_FILE) if (version / RESULT_FILE).is_file() else None
        if result is not None and (tune or (None, None)) != (result.tune_trials, result.tune_study):
            continue
        checkpoint = result.best_checkpoint if result else version / "checkpoints" / "last.ckpt"
        if result is None and not checkpoint.is_file():  # stopped in its first epoch, before last.ckpt
            passed.append(f"--resume: {version} stopped before its first epoch ended, so it has no last.ckpt to "
                          "continue from; it is left as it is, and this stage starts again in a new folder")
            continue
        why = _unusable(checkpoint, arch, classes)
        if why is None:
            return result or version, passed
        passed.append(f"--resume: {'reusing' if result else 'continuing'} {version} is not possible: {why}; "
                      "it is left as it is, and not used")
    return None, passed


TUNED = ("lr", "weight_decay", "label_smoothing", "kd_weights", "ce_weight", "loss_options", "temperature")


def check_tuned_resume(folder: Path, config: Config, role: Role, study: str, trials: int) -> None:
    """Refuse --resume of a tuned stage that a finished run of it says the same study (``study``, ``trials``) tuned
    to other settings than this run's tune chose: the study under that name is not the one that tuned it (another
    --tune_storage, a replaced study.db), and reusing either would compare stages tuned by different studies. A
    different study or trial count (other flags, a larger --tune) asks for a new tune: the stage trains anew."""
    def untuned(flags: dict[str, Any]) -> dict[str, Any]:
        return {name: value for name, value in flags.items() if name not in TUNED}

    wanted = config.identity(role)
    for version in _versions(folder):
        if not (version / RESULT_FILE).is_file():
            continue
        result = StageResult.load(version / RESULT_FILE)
        recorded = saved_identity(_moved_along(_saved_config(version), folder.parent), config, role)
        if (result.tune_study, result.tune_trials) != (study, trials) or untuned(recorded) != untuned(wanted):
            continue
        changed = [f"{name} {recorded[name]} → {wanted[name]}" for name in TUNED
                   if name in wanted and recorded[name] != wanted[name]]
        if changed:
            raise KDError(f"--resume: {version} finished tuned by --tune {config.tune}, and this run's tune chose "
                          f"other settings ({', '.join(changed)}): its study is not the one that tuned it (another "
                          "--tune_storage, or a replaced study.db); resume with that study, or tune anew under another "
                          "--experiment_name")


def _unusable(checkpoint: Path, arch: str, classes: list[str]) -> str | None:
    """Why a stage's ``checkpoint`` cannot be reused or continued from (None when it can): unreadable,
    trained on other classes, or holding weights that do not fit an ``arch``."""
    try:
        state, meta = read_checkpoint(checkpoint, "--resume")
        saved = list(meta.get("class_names", classes))
        if saved == classes:
            load_weights(build_model(arch, len(classes), flag="--resume"), state, len(classes), str(checkpoint),
                         "--resume", new_head=False)
            return None
    except KDError as exc:
        return str(exc).removeprefix("--resume: ")
    added, gone = [c for c in classes if c not in saved], [c for c in saved if c not in classes]
    change = "; ".join([*([f"added: {_names(added)}"] if added else []),
                        *([f"gone: {_names(gone)}"] if gone else [])]) or "in another order"
    return f"it learned other classes: {len(saved)}, the data now has {len(classes)} ({change})"


def _versions(folder: Path) -> list[Path]:
    """The runs of a stage, newest first: ``version_N`` folders with their config.yaml (other names are not kd's)."""
    numbered = [p for p in folder.glob("version_*") if p.name.removeprefix("version_").isdigit()]
    return sorted((p for p in numbered if (p / "config.yaml").is_file()),
                  key=lambda p: int(p.name.removeprefix("version_")), reverse=True)


def _saved_config(folder: Path) -> dict[str, Any]:
    """The flags a stage folder was trained with (its config.yaml), or a one-line error naming the file."""
    path = folder / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError, RecursionError) as exc:  # ValueError: not UTF-8
        raise KDError(f"--resume: {path} cannot be read ({type(exc).__name__}); restore it, or move {folder} "
                      "out of the experiment") from None
    wrong = mistyped(saved) if isinstance(saved, dict) else {"": "not a mapping of flag: value"}
    if wrong:
        raise KDError(f"--resume: {path} is not a kd configuration ({next(iter(wrong.values()))}); restore it, "
                      f"or move {folder} out of the experiment")
    return saved


def _moved_along(saved: dict[str, Any], root: Path) -> dict[str, Any]:
    """A stage's saved flags with each teacher checkpoint it recorded in experiment ``root`` before it was moved
    or copied read where it lies now: ``<stage>/version_N/checkpoints/<file>`` here, and the recorded file
    gone or of the same bytes."""
    def now(recorded: Any) -> Any:
        path = Path(recorded) if isinstance(recorded, str) else None
        if path is None or len(path.parts) < 6 or path.parts[-5] != root.name:
            return recorded
        here = root.resolve().joinpath(*path.parts[-4:])
        same = here.is_file() and (not path.exists() or filecmp.cmp(path, here, shallow=False))
        return str(here) if same else recorded

    checkpoints = saved.get("teacher_checkpoint")
    return saved | {"teacher_checkpoint": [now(p) for p in checkpoints]} if isinstance(checkpoints, list) else saved


def _names(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
