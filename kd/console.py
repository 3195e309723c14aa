"""What a run shows on the console: kd's own progress and real warnings, not Lightning's banners and tips."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm

# Lightning reports the hardware it found, tips and why fit stopped at INFO level on these loggers.
LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric")
# Warnings that come from inside Lightning or torch and that nothing a user can change would silence.
LIBRARY_WARNINGS = (r".*isinstance\(treespec, LeafSpec\).*",)


# Warnings every stage's fit raises on purpose: --num_workers is the user's call, the frozen teacher is in eval mode.
FIT_WARNINGS = (".*does not have many workers.*", ".*module\\(s\\) in eval mode.*")


@contextlib.contextmanager
def fit_warnings_silenced(*patterns: str) -> Iterator[None]:
    """Inside, the warnings a stage's fit raises on purpose (and those matching ``patterns``) are not shown."""
    with warnings.catch_warnings():
        for pattern in (*FIT_WARNINGS, *patterns):
            warnings.filterwarnings("ignore", pattern)
        yield


def quiet_lightning() -> None:
    """Keep Lightning's warnings and errors on the console and drop its informational lines."""
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", pattern)


def _epoch_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The progress bar's metrics without Lightning's version number and the last step's values."""
    return {name: value for name, value in metrics.items() if name != "v_num" and not name.endswith("_step")}


class EpochBar(TQDMProgressBar):
    """On a terminal: one training bar per epoch, left with its metrics; no sanity-check or validation bars."""

    def __init__(self) -> None:
        super().__init__(leave=True)

    def init_sanity_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def on_train_start(self, *_: Any) -> None:
        self.train_progress_bar = Tqdm(disable=True)  # each epoch opens its own bar

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class EpochLines(ProgressBar):
    """Into a file or a pipe: one line per epoch with its metrics, instead of a bar redrawn at every step."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled, self._started = True, 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled:
            return
        metrics = _epoch_metrics(self.get_metrics(trainer, pl_module))
        shown = ", ".join(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
                          for name, value in metrics.items())
        print(f"Epoch {trainer.current_epoch}/{trainer.max_epochs - 1} ({time.monotonic() - self._started:.1f}s): "
              f"{shown}", flush=True)


def progress_bar() -> ProgressBar:
    """The progress display for this console: a bar per epoch on a terminal, a line per epoch otherwise."""
    return EpochBar() if sys.stdout.isatty() else EpochLines()
