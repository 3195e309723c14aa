"""An exponential moving average of a network's weights and buffers (torch's AveragedModel), and how it is saved.

With --ema the average is the network a stage delivers: it is what ``val/top1`` measures, what picks
``best.ckpt``, and what a checkpoint holds as ``model.*`` (read by --evaluate, --export and the stages
that learn from it). The trained weights are kept beside it as ``raw_model.*``, for --resume.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

# Distiller state key prefix → checkpoint key prefix, with an average: the average takes the network's name.
_SAVED_AS = {"ema.module.": "model.", "model.": "raw_model."}


def weight_average(model: nn.Module, decay: float) -> AveragedModel:
    """A frozen copy of ``model`` whose parameters and buffers (BatchNorm statistics) follow it as an EMA.

    ``update_parameters(model)`` copies the weights the first time, then sets avg = decay·avg + (1 - decay)·w.
    """
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True).requires_grad_(False)


def _renamed(state: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    def rename(key: str) -> str:
        prefix = next((p for p in names if key.startswith(p)), None)
        return key if prefix is None else names[prefix] + key.removeprefix(prefix)
    return {rename(key): value for key, value in state.items()}


def saved_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A distiller's state with an average as checkpoints hold it: the average as ``model.*``, the raw weights
    as ``raw_model.*``."""
    return _renamed(state, _SAVED_AS)


def training_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's state read back into a distiller with an average (the inverse of :func:`saved_layout`)."""
    return _renamed(state, {saved: own for own, saved in _SAVED_AS.items()})
