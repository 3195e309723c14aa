"""What the losses on hooked intermediate features share: pairing student and teacher layers, shape checks and
the base classes. The losses themselves, one file per family: hints.py (FitNets), attention.py (AT),
relations.py (RKD, PKT, SP), contrastive.py (CRD), transfer.py (NST, KDSVD), information.py (CC, VID),
correlation.py (ICKD, PAD-L2), review.py (ReviewKD).

Each loss gets ``student_features`` / ``teacher_features`` (hooked outputs by layer name; student
layer i pairs with teacher layer i) and, built with the run's settings, the per-sample shapes of
those features. The conventions follow the reference implementations in megvii-research/mdistiller
(``mdistiller/distillers/*.py``), whose configuration (``mdistiller/engine/cfg.py``) gives the
default weights; each class says where it departs from them. Teacher features come from a frozen
teacher; the losses detach them, so no gradient ever reaches them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.losses.base import DistillationLoss, Range

Shapes = dict[str, tuple[int, ...]]


def feature_pairs(student_features: dict[str, torch.Tensor],
                  teacher_features: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(student, detached teacher) features paired in order; the two must hook as many layers."""
    if len(student_features) != len(teacher_features):
        raise ValueError(f"{len(student_features)} student features ({', '.join(student_features)}) but "
                         f"{len(teacher_features)} teacher features ({', '.join(teacher_features)}): "
                         "hook as many layers on each side, student layer i pairs with teacher layer i")
    if not student_features:
        raise ValueError("no hooked features: a feature loss needs at least one student/teacher layer pair")
    return [(s, t.detach()) for s, t in zip(student_features.values(), teacher_features.values())]


def pool_to_smaller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (B, C, H, W) maps average-pooled to their smaller height and width, where they differ from it."""
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    return tuple(F.adaptive_avg_pool2d(x, size) if tuple(x.shape[2:]) != size else x for x in (a, b))


def flat(feature: torch.Tensor) -> torch.Tensor:
    """A batch of features as rows: (B, ...) -> (B, prod(...))."""
    return feature.reshape(feature.shape[0], -1)


def require_maps(loss: str, shapes: Shapes | None, side: str, per_sample: bool = True) -> None:
    """Raise a ValueError unless every shape is that of a 4-D feature map (3-D per sample)."""
    for layer, shape in (shapes or {}).items():
        if len(shape) != (3 if per_sample else 4):
            wanted = "(C, H, W) per sample" if per_sample else "(B, C, H, W)"
            raise ValueError(f"{loss} needs 4-D feature maps, but {side} layer '{layer}' has shape "
                             f"{tuple(shape)}, not {wanted}: hook a convolutional layer, not a pooled vector")


Layer = tuple[str, tuple[int, ...]]  # a hooked layer's name and per-sample shape
SIDES = ("student", "teacher")  # as in the flags --student_layers / --teacher_layers


def layer_pairs(loss: str, student_shapes: Shapes | None, teacher_shapes: Shapes | None) -> list[tuple[Layer, Layer]]:
    """The hooked (student, teacher) layers and per-sample shapes, paired in order; a ValueError naming the flags
    unless both sides hook as many layers, at least one."""
    student, teacher = list((student_shapes or {}).items()), list((teacher_shapes or {}).items())
    if not student or not teacher:
        raise ValueError(f"{loss} builds a head per hooked layer pair: give --student_layers and --teacher_layers "
                         f"(got {len(student)} student and {len(teacher)} teacher layers)")
    if len(student) != len(teacher):
        raise ValueError(f"{loss} pairs --student_layers with --teacher_layers in order, but got {len(student)} "
                         f"student layer(s) ({', '.join(name for name, _ in student)}) and {len(teacher)} teacher "
                         f"layer(s) ({', '.join(name for name, _ in teacher)})")
    return [((s_name, tuple(s_shape)), (t_name, tuple(t_shape)))
            for (s_name, s_shape), (t_name, t_shape) in zip(student, teacher)]


def check_built(loss: str, built: int, student_features: dict[str, torch.Tensor]) -> None:
    """A ValueError unless the call hooks as many layers as the loss built heads for."""
    if len(student_features) != built:
        raise ValueError(f"{loss} was built for {built} --student_layers but got {len(student_features)} features "
                         f"({', '.join(student_features)})")

def check_map_channels(loss: str, head: str, named: tuple[tuple[str, str, torch.Tensor, int], ...]) -> None:
    """A ValueError unless each (side, layer, feature, channels) is a (B, channels, H, W) map, as the loss's ``head``
    was built for."""
    for side, name, feature, channels in named:
        if feature.dim() != 4 or feature.shape[1] != channels:
            raise ValueError(f"{loss}: --{side}_layers '{name}' gives {tuple(feature.shape)}, but its {head} was "
                             f"built for (B, {channels}, H, W) maps")


class FeatureLoss(DistillationLoss):
    """Base of the feature losses: they ask for hooked features and weigh CE 1, as their papers do."""

    features = True
    ce_range = Range(0.1, 2.0, log=True)  # the CE weight each feature loss's --tune space searches


class FeaturePairLoss(FeatureLoss):
    """A feature loss that is a sum over layer pairs of :meth:`pair_loss`."""

    def pair_loss(self, layer: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The loss of one (student, detached teacher) pair; ``layer`` names the student's, for errors."""
        raise NotImplementedError

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                student_features: dict[str, torch.Tensor],
                teacher_features: dict[str, torch.Tensor]) -> torch.Tensor:
        pairs = feature_pairs(student_features, teacher_features)
        return sum((self.pair_loss(layer, s, t) for layer, (s, t) in zip(student_features, pairs)),
                   student_logits.new_zeros(()))
