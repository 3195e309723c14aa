"""torchvision's classification models as a model source (bare names, or ``torchvision:NAME``), with its weights."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from kd.errors import KDError
from kd.models.heads import replace_heads
from kd.models.sources import ModelSource, downloading, register_source
from kd.registry import did_you_mean

# torchvision models that return auxiliary outputs in training mode unless told not to.
AUX_LOGITS = {"googlenet", "inception_v3"}


@register_source
class TorchvisionModels(ModelSource):
    """torchvision's classification models (bare names, or torchvision:NAME), with its weights enums."""

    prefix, bare, named_weights = "torchvision", True, True
    about = "torchvision's classification models; weights DEFAULT, IMAGENET1K_V1, ... into torch's cache"

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(torchvision.models.list_models(module=torchvision.models, include=pattern))

    def has(self, name: str) -> bool:
        return name in torchvision.models.list_models(module=torchvision.models)

    def build(self, name: str, num_classes: int) -> nn.Module:
        return torchvision.models.get_model(name, num_classes=num_classes, **self._options(name))

    def pretrained(self, name: str, weights: str, num_classes: int, flag: str) -> nn.Module:
        """Fetch the weights into torch's cache (failing fast offline) and resize the classifier."""
        enum = torchvision.models.get_model_weights(name)
        member = weights.rpartition(".")[2]
        if member not in enum.__members__:
            raise KDError(f"{flag}: {name} has no weights '{weights}'{did_you_mean(member, enum.__members__)} "
                          f"(choose from {', '.join(enum.__members__)}, or give a local file)")
        chosen = enum[member]
        with downloading(str(chosen), chosen.url, Path(torch.hub.get_dir()) / "checkpoints", flag):
            model = torchvision.models.get_model(name, weights=chosen, **self._options(name))
        replace_heads(model, len(chosen.meta["categories"]), num_classes)
        return model

    @staticmethod
    def _options(name: str) -> dict:
        return {"aux_logits": False} if name in AUX_LOGITS else {}
