"""The Lightning Trainer of a stage, on the hardware the flags name."""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities import rank_zero_only

from kd.config import Config
from kd.errors import KDError


def _devices(devices: str) -> Any:
    return int(devices) if devices.isdigit() else devices


def make_trainer(c: Config, **options: Any) -> pl.Trainer:
    """A Trainer on the hardware ``c`` names; Lightning's refusals become one-line errors."""
    try:
        return pl.Trainer(accelerator=c.accelerator, devices=_devices(c.devices), num_nodes=c.num_nodes,
                          strategy=c.strategy, precision=c.precision, enable_model_summary=False, **options)
    except (MisconfigurationException, ValueError, RuntimeError, TypeError, ImportError) as exc:  # ImportError: XLA
        raise KDError(f"--accelerator {c.accelerator} --devices {c.devices} --num_nodes {c.num_nodes} "
                      f"--strategy {c.strategy} --precision {c.precision}: {str(exc).splitlines()[0]}") from None


def is_main_process() -> bool:
    """True in the one process that writes summaries, configurations and reports (global rank 0).

    Under DDP every rank runs this script; Lightning's rank comes from RANK/LOCAL_RANK/SLURM_PROCID,
    and NODE_RANK tells a second machine's first process from the first machine's.
    """
    return rank_zero_only.rank == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
