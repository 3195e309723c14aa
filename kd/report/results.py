"""What a finished stage produced, saved as result.json in its log folder and read back by reports."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd.errors import KDError
from kd.files import checked_path, write_text

RESULT_FILE = "result.json"
INIT_PREFIX = "init_"  # an init phase's stage (init_distill): the distillation after it is the row, not the phase


@dataclass
class StageResult:
    """One trained stage: its last and its best validation epoch, its curve, its cost and where its files are.

    The headline figure is the last epoch's (``top1``): the best epoch is selected on val/, so its top-1 is
    val/'s best draw, not an estimate of the student's accuracy. It stays available, labelled as selected on val/.
    """

    experiment: str
    stage: str  # teacher, baseline or distill
    arch: str
    seed: int
    params: int
    best_top1: float  # percent
    best_top5: float  # percent
    best_epoch: int
    seconds: float
    log_dir: Path
    best_checkpoint: Path
    kd_loss: str = ""  # the distillation loss, for distill stages
    val_top1: list[float] = field(default_factory=list)  # percent, one per epoch
    teachers: list[dict[str, Any]] = field(default_factory=list)  # arch, checkpoint, own top-1 of each teacher
    teacher_top1: float | None = None  # percent: the teacher (or the ensemble) the student learned from
    warnings: list[str] = field(default_factory=list)  # what the user was told about this stage, e.g. a weak teacher
    last_top5: float | None = None  # percent, the last epoch's (None: saved before kd recorded it)
    tune_trials: int | None = None  # the --tune N that chose its settings (None: not tuned)
    tune_study: str | None = None  # the name of the Optuna study that chose them

    @property
    def top1(self) -> float:
        """The headline top-1 (percent): the last epoch's, not selected on val/ (the best, for a curveless file)."""
        return self.val_top1[-1] if self.val_top1 else self.best_top1

    @property
    def label(self) -> str:
        """The stage as shown in tables and legends, e.g. ``distill (kl_softmax)``, ``baseline (tuned, 16 trials)``."""
        details = [*([self.kd_loss] if self.kd_loss else []),
                   *([f"tuned, {self.tune_trials} trials"] if self.tune_trials else [])]
        return f"{self.stage} ({', '.join(details)})" if details else self.stage

    def save(self) -> None:
        """Write result.json into the stage's log folder (atomically: a kill leaves no partial file).

        Paths are saved relative to that folder, so the experiment can be moved or copied and still resumed.
        """
        data = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}
        folder, best = self.log_dir.resolve(), self.best_checkpoint.resolve()
        data["log_dir"] = "."
        if best.is_relative_to(folder):
            data["best_checkpoint"] = str(best.relative_to(folder))
        write_text(self.log_dir / RESULT_FILE, json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: Path) -> StageResult:
        """Read a result.json written by :meth:`save`, its paths taken from where it lies now.

        Files from before relative paths name an absolute (or old working-directory) folder: their
        checkpoint is found again in the folder that holds the file.
        """
        try:
            data = json.loads(path.read_text())
            wrong = _wrong_field(data)
        except (OSError, ValueError, RecursionError) as exc:  # unreadable, not UTF-8, not JSON, nested too deep
            wrong = f"{type(exc).__name__}: {exc}"
        if wrong:
            raise KDError(f"{path} is not a kd result file ({wrong}); restore it, or move {path.parent} aside")
        data["best_checkpoint"] = _moved(Path(data["best_checkpoint"]), Path(data["log_dir"]), path.parent)
        data["log_dir"] = path.parent
        return cls(**data)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # JSON's true and false are no numbers


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """A check of a list whose every item passes ``check``."""
    return lambda value: isinstance(value, list) and all(check(item) for item in value)


def _teacher(value: Any) -> bool:
    """One entry of ``teachers``, as the runner saves it: its arch, its checkpoint and its own top-1 (or null)."""
    return (isinstance(value, dict) and _text(value.get("arch")) and _text(value.get("checkpoint"))
            and (value.get("top1") is None or _number(value["top1"])))


# Each field of a result file: how to check its value, and what it must be, as an error says.
FIELD_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "experiment": (_text, "a string"), "stage": (_text, "a string"), "arch": (_text, "a string"),
    "seed": (_whole, "a whole number"), "params": (_whole, "a whole number"), "best_top1": (_number, "a number"),
    "best_top5": (_number, "a number"), "best_epoch": (_whole, "a whole number"), "seconds": (_number, "a number"),
    "log_dir": (_text, "a string"), "best_checkpoint": (_text, "a string"), "kd_loss": (_text, "a string"),
    "val_top1": (_list_of(_number), "a list of numbers"),
    "teachers": (_list_of(_teacher), "a list of {arch, checkpoint, top1} mappings"),
    "teacher_top1": (lambda value: value is None or _number(value), "a number or null"),
    "warnings": (_list_of(_text), "a list of strings"),
    "last_top5": (lambda value: value is None or _number(value), "a number or null"),
    "tune_trials": (lambda value: value is None or _whole(value), "a whole number or null"),
    "tune_study": (lambda value: value is None or _text(value), "a string or null"),
}
REQUIRED = [f.name for f in dataclasses.fields(StageResult) if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING]


def _wrong_field(data: Any) -> str | None:
    """What is wrong with a result file's content, naming the field (None when nothing is): a hand edit or another
    program's file would otherwise fail later with a traceback, in a report or a resume."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object of fields"
    missing = [name for name in REQUIRED if name not in data]
    unknown = [name for name in data if name not in FIELD_KINDS]
    wrong = [name for name, (check, _) in FIELD_KINDS.items() if name in data and not check(data[name])]
    if missing:
        return f"no field {missing[0]!r}"
    if unknown:
        return f"an unknown field {unknown[0]!r}"
    if wrong:
        return f"field {wrong[0]!r} is {_shown(data[wrong[0]])}, not {FIELD_KINDS[wrong[0]][1]}"
    return None


def _shown(value: Any) -> str:
    """A wrong value as an error names it: its JSON type, and the value when short."""
    text = json.dumps(value)
    return f"{type(value).__name__} {text}" if len(text) <= 40 else f"a {type(value).__name__}"


def _moved(path: Path, saved_folder: Path, folder: Path) -> Path:
    """``path``, saved in a stage folder then at ``saved_folder``, in that folder now at ``folder``.

    Saved relative to it (``.``), or, before that, absolute or relative to the working directory of then.
    """
    parts = path.parts
    if saved_folder.name and saved_folder.name in parts:
        return folder.joinpath(*parts[len(parts) - parts[::-1].index(saved_folder.name):])
    return path if path.is_absolute() else folder / path


def find_results(paths: list[str]) -> list[StageResult]:
    """Every finished stage under the given folders (a run, an experiment, or one stage's logs)."""
    results = []
    for name in paths:
        root = checked_path(name, "--report", "read")
        if not root.is_dir():
            raise KDError(f"--report: {root} is not a folder")
        found = sorted(root.rglob(RESULT_FILE))
        if not found:
            raise KDError(f"--report: no finished stage ({RESULT_FILE}) under {root}")
        try:
            results += [result for result in map(StageResult.load, found)
                        if not result.stage.startswith(INIT_PREFIX)]
        except KDError as exc:
            raise KDError(f"--report: {exc}") from None
    return results
