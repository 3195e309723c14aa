"""What a finished stage produced, saved as result.json in its log folder and read back by reports."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd.errors import KDError
from kd.files import write_text

RESULT_FILE = "result.json"


@dataclass
class StageResult:
    """One trained stage: its best validation epoch, its curve, its cost and where its files are."""

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

    @property
    def label(self) -> str:
        """The stage as shown in tables and legends, e.g. ``distill (kl_softmax)``."""
        return f"{self.stage} ({self.kd_loss})" if self.kd_loss else self.stage

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
            data["best_checkpoint"] = _moved(Path(data["best_checkpoint"]), Path(data["log_dir"]), path.parent)
            data["log_dir"] = path.parent
            return cls(**data)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise KDError(f"{path} is not a kd result file ({type(exc).__name__}: {exc}); restore it, or move "
                          f"{path.parent} aside") from None


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
        root = Path(name).expanduser()
        if not root.is_dir():
            raise KDError(f"--report: {root} is not a folder")
        found = sorted(root.rglob(RESULT_FILE))
        if not found:
            raise KDError(f"--report: no finished stage ({RESULT_FILE}) under {root}")
        try:
            results += [StageResult.load(path) for path in found]
        except KDError as exc:
            raise KDError(f"--report: {exc}") from None
    return results
