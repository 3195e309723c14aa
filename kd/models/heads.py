"""Classifier heads: found by their class count, and resized for another dataset's classes."""

from __future__ import annotations

from torch import nn


def class_layers(model: nn.Module, out_features: int) -> list[str]:
    """Names of the layers that produce ``out_features`` class scores (the classifier heads)."""
    return [name for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) and m.out_features == out_features)
            or (isinstance(m, nn.Conv2d) and m.out_channels == out_features and m.kernel_size == (1, 1))]


def replace_heads(model: nn.Module, old_classes: int, num_classes: int) -> None:
    """Resize every classifier head (main and auxiliary) from ``old_classes`` to ``num_classes`` outputs."""
    for name in class_layers(model, old_classes):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        new = (nn.Linear(old.in_features, num_classes) if isinstance(old, nn.Linear)
               else nn.Conv2d(old.in_channels, num_classes, 1))
        setattr(parent, child, new)
