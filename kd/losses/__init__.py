"""Loss modules by name. Adding one: a class in a file here and ``@LOSSES.register("name")``."""

from kd.losses import (attention, contrastive, correlation, curriculum, flow, hints, information, labels,
                       logits, multilevel, overhaul, projector, relations, review, self_distill, soft_labels, transfer)
from kd.losses.base import LOSSES, Loss, build_loss, loss_terms

__all__ = ["LOSSES", "Loss", "build_loss", "loss_terms", "attention", "contrastive", "correlation", "curriculum",
           "flow", "hints", "information", "labels", "logits", "multilevel", "overhaul", "projector", "relations",
           "review", "self_distill", "soft_labels", "transfer"]
