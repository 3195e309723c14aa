"""SRD: the distillation of Miles & Mikolajczyk, "Understanding the Role of the Projector in Knowledge Distillation"
(AAAI 2024), as torchdistill computes it (``SRDLoss`` in ``torchdistill/losses/mid_level.py``, ``SRDModelWrapper`` in
``torchdistill/models/wrapper.py`` and the sample config ``configs/sample/ilsvrc2012/srd/resnet18_from_resnet34.yaml``).

The student's pooled penultimate feature goes through a learned linear projector to the teacher's width; both sides
are then standardised by a BatchNorm without affine parameters, and the loss is the log of the summed p-th powers of
their absolute differences, beside a KL divergence between the two networks' own logits.
"""

from __future__ import annotations

import torch
from torch import nn

from kd.losses.base import LOSSES, Range
from kd.losses.features import SIDES, FeatureLoss, Shapes, check_built, feature_pairs, flat, layer_pairs
from kd.losses.logits import kl_softmax


def log_power_distance(projected: torch.Tensor, teacher: torch.Tensor, exponent: float) -> torch.Tensor:
    """SRD's feature term: ``log Σ |projected − teacher|^exponent`` over the whole batch and all dimensions."""
    return (projected - teacher).abs().pow(exponent).sum().log()


def pooled_width(loss: str, flag: str, name: str, shape: tuple[int, ...]) -> int:
    """The width C of a pooled feature of per-sample shape (C,) or (C, 1, 1); a ValueError naming the flag else."""
    if len(shape) == 1 or (len(shape) == 3 and shape[1:] == (1, 1)):
        return shape[0]
    raise ValueError(f"{loss} compares pooled penultimate features, but --{flag}_layers '{name}' gives shape {shape} "
                     "per sample, not (C,) or (C, 1, 1): hook the global average pool (e.g. avgpool)")


@LOSSES.register("srd")
class ProjectorDistillation(FeatureLoss):
    """SRD (Miles & Mikolajczyk, "Understanding the Role of the Projector in Knowledge Distillation", AAAI 2024), as
    torchdistill's ``SRDLoss`` with the ``SRDModelWrapper`` around each network.

    On one hooked pair of pooled penultimate features, the student's s (width C_s) is projected by
    ``BN(Linear(C_s → C_t)(s))`` and the teacher's t by ``BN(t)``, each BN a ``BatchNorm1d`` with eps 1e-4 and no
    affine parameters (so batch statistics in training, running ones in evaluation); the projector's Linear has a
    bias and is trained with the student; the teacher's BN has no parameters, only running statistics. The loss is
    ``feature_weight · log Σ |BN(W s + b) − BN(t)|^exponent`` (summed over batch and dimensions, teacher detached) plus
    ``kl_weight · KL(softmax(z_t/T) ‖ softmax(z_s/T))`` (batch mean, no T²) on the two networks' own logits. The
    defaults are the reference's: exponent 4 and T = 1 (sample config, lines 187-188), the feature term doubled and
    the KL term once (``2 * feat_distill_loss + kl_loss``, ``mid_level.py`` line 1720), the loss weighted 1 beside
    CE 1 (config, lines 174 and 190), BN eps 1e-4 without affine (config, lines 112-115 and 131-134), a Linear
    projector with bias on the student side only (``SRDModelWrapper``, ``wrapper.py`` lines 901-913; config lines
    135-137). Lines are of torchdistill commit 3e4373c.

    torchdistill hooks ``layer4``'s output and averages it over space; kd hooks the pooled vector itself (``avgpool``
    in kd's CIFAR networks), the same numbers. Returns the terms ``feature`` and ``kl``, each times its factor, so
    that ``weight`` scales their sum as the reference's loss weight does.
    """

    weight = 1.0
    space = {"weight": Range(0.1, 10.0, log=True), "ce_weight": FeatureLoss.ce_range,
             "exponent": Range(1.0, 6.0), "temperature": Range(0.5, 8.0, log=True),
             "feature_weight": Range(0.25, 8.0, log=True)}

    def __init__(self, student_shapes: Shapes, teacher_shapes: Shapes, exponent: float = 4.0,
                 temperature: float = 1.0, feature_weight: float = 2.0, kl_weight: float = 1.0,
                 eps: float = 1e-4) -> None:
        super().__init__()
        pairs = layer_pairs("srd", student_shapes, teacher_shapes)
        if len(pairs) != 1:
            raise ValueError(f"srd distils one pair of pooled penultimate features: give one --student_layers and "
                             f"one --teacher_layers (e.g. avgpool), got {len(pairs)} pairs")
        s_width, t_width = (pooled_width("srd", flag, name, shape) for flag, (name, shape) in zip(SIDES, pairs[0]))
        if not exponent > 0 or not temperature > 0 or not eps > 0:
            raise ValueError(f"srd: exponent, temperature and eps must be > 0, got exponent={exponent}, "
                             f"temperature={temperature}, eps={eps}")
        self.exponent, self.temperature = float(exponent), float(temperature)
        self.feature_weight, self.kl_weight, self.eps = float(feature_weight), float(kl_weight), float(eps)
        self.projector = nn.Sequential(nn.Linear(s_width, t_width), nn.BatchNorm1d(t_width, eps=eps, affine=False))
        self.teacher_norm = nn.BatchNorm1d(t_width, eps=eps, affine=False)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                student_features: dict[str, torch.Tensor],
                teacher_features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_built("srd", 1, student_features)
        ((s, t),) = feature_pairs(student_features, teacher_features)
        s, t = flat(s), flat(t)
        widths = (self.projector[0].in_features, self.teacher_norm.num_features)
        for flag, name, feature, width in zip(SIDES, (*student_features, *teacher_features), (s, t), widths):
            if feature.shape[1] != width:
                raise ValueError(f"srd: --{flag}_layers '{name}' gives {feature.shape[1]} numbers per sample, but the "
                                 f"loss was built for a pooled feature of width {width}")
        feature = log_power_distance(self.projector(s), self.teacher_norm(t), self.exponent)
        # torchdistill's nn.KLDivLoss(reduction='batchmean'): Hinton's KL without its T² factor
        kl = kl_softmax(student_logits, teacher_logits.detach(), self.temperature) / self.temperature**2
        return {"feature": self.feature_weight * feature, "kl": self.kl_weight * kl}
