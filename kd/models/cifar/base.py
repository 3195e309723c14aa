"""What the CIFAR families share: their registry, and the initialisation the references give most of them."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kd.registry import Registry

# cifar:NAME → a constructor taking num_classes; NAME is the reference's own name (RepDistiller's model_dict).
MODELS: Registry[Callable[..., nn.Module]] = Registry("cifar model")


def he_init(model: nn.Module, linear_std: float | None = None) -> None:
    """Initialise as the references do, so networks trained here from scratch start where theirs did.

    Convolutions: normal with std sqrt(2 / (k·k·out_channels)) (He, fan-out), biases 0; BatchNorm: 1 and 0;
    with ``linear_std``, linear layers normal with that std and biases 0 (VGG, MobileNetV2).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and linear_std is not None:
            nn.init.normal_(module.weight, 0, linear_std)
            nn.init.zeros_(module.bias)
