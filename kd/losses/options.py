"""How losses are named and configured on the command line: ``--kd_loss`` keys and ``--loss_options``."""

from __future__ import annotations

from typing import Any

import yaml

from kd.errors import KDError
from kd.registry import did_you_mean


def loss_key(spec: str) -> str:
    """The name a loss is logged and configured under: ``pkg.mod:MyLoss`` → ``MyLoss``."""
    return spec.rpartition(":")[2]


def parse_loss_options(options: list[str], keys: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``NAME.SETTING=VALUE`` options per loss, and ``SETTING=VALUE`` ones for every loss (values read as YAML)."""
    own: dict[str, dict[str, Any]] = {key: {} for key in keys}
    shared: dict[str, Any] = {}
    for option in options:
        target, eq, raw = option.partition("=")
        name, dot, setting = target.rpartition(".")
        if not eq or not setting.isidentifier() or (dot and not name):
            raise KDError(f"--loss_options {option}: expected NAME.SETTING=VALUE or SETTING=VALUE, e.g. dkd.beta=4")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if not dot:
            shared[setting] = value
        elif name in own:
            own[name][setting] = value
        else:
            raise KDError(f"--loss_options {option}: {name} is not one of --kd_loss ({', '.join(keys)})"
                          f"{did_you_mean(name, keys)}")
    return own, shared
