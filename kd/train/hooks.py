"""Intermediate features for feature losses: forward hooks by module name, and learned connectors.

A connector maps a student feature to the shape of the teacher feature it is compared with (a 1×1
convolution and BatchNorm for the channels, a resize for the spatial size). Connectors are trained
with the student and live beside it, not in it, so exported students never carry them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.errors import KDError
from kd.registry import did_you_mean


def _tensor(output: object) -> torch.Tensor | None:
    """The tensor a module returned (the first one, for modules returning tuples)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


class FeatureHooks:
    """Records the outputs of the named modules of ``model`` on every forward pass, in ``outputs``."""

    def __init__(self, model: nn.Module, names: list[str], flag: str) -> None:
        modules = dict(model.named_modules())
        for name in names:
            if name not in modules or not name:
                valid = [n for n in modules if n]
                raise KDError(f"{flag}: {type(model).__name__} has no module {name!r}{did_you_mean(name, valid)}; "
                              f"its modules: {', '.join(valid[:60])}{' ...' if len(valid) > 60 else ''}")
        if len(set(names)) != len(names):
            raise KDError(f"{flag}: {' '.join(names)} names a module twice")
        self.names = list(names)
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [modules[name].register_forward_hook(self._hook(name)) for name in names]

    def _hook(self, name: str):  # noqa: ANN202 - a forward hook
        def record(module: nn.Module, inputs: object, output: object) -> None:
            tensor = _tensor(output)
            if tensor is None:
                raise KDError(f"module {name!r} returned {type(output).__name__}, not a tensor: hook another one")
            # A copy: a ReLU(inplace=True) after the module (torchvision's and kd's ResNets, WRN) would otherwise
            # rectify the recorded output, and a hooked BatchNorm would give post-activation values.
            self.outputs[name] = tensor.clone()
        return record

    def take(self) -> dict[str, torch.Tensor]:
        """This forward pass's features in the order named, forgetting them (so none outlives its step)."""
        outputs, self.outputs = self.outputs, {}
        return {name: outputs[name] for name in self.names}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class Connector(nn.Module):
    """Maps a student feature of shape ``source`` to ``target`` (per-sample shapes, (C, H, W) or (D,))."""

    def __init__(self, source: tuple[int, ...], target: tuple[int, ...]) -> None:
        super().__init__()
        if len(source) != len(target) or len(source) not in (1, 3):
            raise KDError(f"cannot connect a student feature of shape {source} to a teacher feature of shape "
                          f"{target}: pair maps with maps (C, H, W) or vectors with vectors")
        self.size = tuple(target[1:])
        if len(source) == 1:
            self.project: nn.Module = nn.Linear(source[0], target[0]) if source != target else nn.Identity()
        elif source[0] != target[0]:
            self.project = nn.Sequential(nn.Conv2d(source[0], target[0], 1, bias=False), nn.BatchNorm2d(target[0]))
        else:
            self.project = nn.Identity()

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        feature = self.project(feature)
        if feature.dim() == 4 and tuple(feature.shape[2:]) != self.size:
            smaller = feature.shape[2] >= self.size[0] and feature.shape[3] >= self.size[1]
            feature = (F.adaptive_avg_pool2d(feature, self.size) if smaller
                       else F.interpolate(feature, self.size, mode="bilinear", align_corners=False))
        return feature


def feature_shapes(model: nn.Module, names: list[str], image_size: int, flag: str) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of the named modules' outputs for a batch of ``image_size`` images (eval mode)."""
    hooks = FeatureHooks(model, names, flag)
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, 3, image_size, image_size))
        return {name: tuple(feature.shape[1:]) for name, feature in hooks.take().items()}
    finally:
        hooks.remove()
        model.train(was_training)
