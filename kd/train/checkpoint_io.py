"""How training checkpoints reach the disk: written beside their final name and renamed, and saved on Ctrl+C."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from kd.errors import KDError
from kd.files import check_writable, written_atomically


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint beside its final name, then renames: a kill leaves the old file or the new one.

    Lightning's own writer stages the file in $TMPDIR first (a small /tmp fails a run whose output disk
    has room, and a kill leaves a partial file there); this one writes nowhere else, and a failed write
    names the checkpoint and why (:class:`kd.files.WriteError`).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        buffer = io.BytesIO()  # serialised first: torch.save straight to a full disk fails with a bare RuntimeError
        torch.save(checkpoint, buffer)
        with written_atomically(path) as tmp:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(buffer.getbuffer())


class InterruptCheckpoint(pl.Callback):
    """Saves ``interrupted.ckpt`` on Ctrl+C or SIGTERM (not on errors, whose state may be broken).

    --resume restarts from ``last.ckpt`` (the end of the last whole epoch), which replays exactly;
    this one keeps the work of the interrupted epoch for whoever wants it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before any work: the run folder (logs) and its checkpoint folder, if they exist (--resume), must be
        writable."""
        check_writable(self.path.parent.parent, "--output_dir")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            trainer.save_checkpoint(self.path)


def stage_parts(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The weights a finished stage in log ``folder`` ended with (its last.ckpt), by part: ``model`` (the student),
    ``objective`` (the losses' own modules), ``connectors``: where the distillation after an init phase starts."""
    path = folder / "checkpoints" / "last.ckpt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    except (OSError, RuntimeError, KeyError, pickle.UnpicklingError) as exc:
        raise KDError(f"cannot read the init phase's last weights in {path}: {exc}; delete its folder to run the "
                      "phase again") from None
    parts: dict[str, dict[str, torch.Tensor]] = {"model": {}, "objective": {}, "connectors": {}}
    for key, value in state.items():
        part, _, name = key.partition(".")
        parts.setdefault(part, {})[name] = value
    return parts
