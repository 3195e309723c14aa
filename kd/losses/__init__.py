"""Loss modules by name. Adding one: a class in a file here and ``@LOSSES.register("name")``."""

from kd.losses import features, labels, logits
from kd.losses.base import LOSSES, Loss, build_loss, loss_terms

__all__ = ["LOSSES", "Loss", "build_loss", "loss_terms", "features", "labels", "logits"]
