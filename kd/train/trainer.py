"""The Lightning Trainer of a stage, on the hardware the flags name."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from lightning_fabric.utilities.exceptions import MisconfigurationException

from kd.config import Config
from kd.errors import KDError


def _devices(devices: str) -> Any:
    return int(devices) if devices.isdigit() else devices


def make_trainer(c: Config, **options: Any) -> pl.Trainer:
    """A Trainer on the hardware ``c`` names; Lightning's refusals become one-line errors."""
    try:
        return pl.Trainer(accelerator=c.accelerator, devices=_devices(c.devices), num_nodes=c.num_nodes,
                          strategy=c.strategy, precision=c.precision, enable_model_summary=False, **options)
    except (MisconfigurationException, ValueError, RuntimeError) as exc:
        raise KDError(f"--accelerator {c.accelerator} --devices {c.devices} --num_nodes {c.num_nodes} "
                      f"--strategy {c.strategy} --precision {c.precision}: {str(exc).splitlines()[0]}") from None
