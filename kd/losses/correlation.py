"""Two feature losses from torchdistill that train their own heads: inter-channel correlation (ICKD) and prime-aware
adaptive distillation with an L2 distance (PAD-L2).

Both follow yoshitomo-matsubara/torchdistill (fetched snapshot 3e4373c): the losses in
``torchdistill/losses/mid_level.py`` (``ChSimLoss``, lines 1538-1594; ``PADL2Loss``, lines 1262-1325) and the
auxiliary modules torchdistill wraps around the student for them in ``torchdistill/models/wrapper.py``
(``ChannelSimilarityEmbed`` / ``Student4ICKD``, lines 802-859; ``VarianceBranch4PAD``, lines 606-654). The weights
are those of torchdistill's sample configurations (``configs/sample/ilsvrc2012/ickd/resnet18_from_resnet34.yaml``
and ``configs/sample/ilsvrc2012/pad/resnet18_from_resnet34.yaml``), ImageNet only. kd's heads are parameters of the
loss, so the student's optimiser trains them, as torchdistill's wrappers put them in the student's optimiser.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import LOSSES, Range
from kd.losses.features import (SIDES, FeatureLoss, Shapes, check_built, check_map_channels, feature_pairs, flat,
                                layer_pairs)

# ---- ICKD ------------------------------------------------------------------------------------------------------


class ChannelEmbed(nn.Module):
    """ICKD's student-side embedding: a k x k convolution (stride 1, 'same' padding, no bias) to the teacher's channels,
    then BatchNorm2d (torchdistill ``ChannelSimilarityEmbed``, ``models/wrapper.py`` lines 802-822, k = 3)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=kernel_size // 2,
                                bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv2d(x))


def channel_correlation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """torchdistill's ``ChSimLoss.batch_loss`` of two (B, C, H, W) maps of as many channels (sizes may differ): with
    ``G = f fᵀ`` per sample over the C x (HW) map and each row of G L2-normalised, ``Σ (G_s - G_t)² / (C·B²)``."""
    b, c = student.shape[:2]
    gram_s = F.normalize(torch.bmm(student.reshape(b, c, -1), student.reshape(b, c, -1).transpose(1, 2)), dim=2)
    gram_t = F.normalize(torch.bmm(teacher.reshape(b, c, -1), teacher.reshape(b, c, -1).transpose(1, 2)), dim=2)
    return (gram_s - gram_t).pow(2).sum() / (c * b * b)


@LOSSES.register("ickd")
class InterChannelCorrelation(FeatureLoss):
    """Inter-channel correlation (Liu et al., "Exploring Inter-Channel Correlation for Diversity-Preserved Knowledge
    Distillation", ICCV 2021), as torchdistill's ``ChSimLoss`` with its ``Student4ICKD`` embedding.

    Each student map is embedded to the teacher's channel count by a 3x3 convolution without bias and BatchNorm
    (``ChannelEmbed``; ``kernel_size`` = 3 as ``ChannelSimilarityEmbed``); per sample, the C x C Gram matrix of the
    channels (each flattened over positions) has its rows L2-normalised, for the embedded student and the teacher
    alike, and the loss is ``Σ (G_s - G_t)² / (C·B²)`` over the batch (``mid_level.py`` lines 1571-1584), summed
    over layer pairs (torchdistill's per-pair ``weight`` is 1). The maps' sizes may differ: G is C x C.

    Weight 500, CE weight 0.5: the sample config (``configs/sample/ilsvrc2012/ickd/resnet18_from_resnet34.yaml``,
    lines 141-170) sums ``KDLoss`` at T = 1, α = 0.5 (0.5·CE + 0.5·KL, ``mid_level.py`` lines 178-189) and 500 ×
    ``ChSimLoss`` between the embedded student ``layer4`` and the teacher's ``layer4`` (512 → 512 channels). kd's
    ``ickd`` is the correlation term alone; the reference's whole objective is ``--kd_loss kl_softmax ickd
    --kd_weights 0.5 500 --ce_weight 0.5 --loss_options kl_softmax.temperature=1``.

    Departures: none in the formula. The divisor C·B² is torchdistill's; the authors' CIFAR-style code (a RepDistiller
    ``ICKDLoss`` with a 1x1 ``Embed``) divides by C·B, which only rescales the weight by B. ``kernel_size=1`` gives
    that 1x1 embedding.
    """

    weight = 500.0
    ce_weight = 0.5
    space = {"weight": Range(10.0, 5000.0, log=True), "ce_weight": FeatureLoss.ce_range}

    def __init__(self, student_shapes: Shapes, teacher_shapes: Shapes, kernel_size: int = 3) -> None:
        super().__init__()
        pairs = layer_pairs("ickd", student_shapes, teacher_shapes)
        for flag, (name, shape) in ((flag, layer) for pair in pairs for flag, layer in zip(SIDES, pair)):
            if len(shape) != 3:
                raise ValueError(f"ickd correlates the channels of feature maps, but --{flag}_layers '{name}' gives "
                                 f"shape {shape} per sample, not (C, H, W): hook convolutional stages (e.g. layer3)")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"ickd: kernel_size must be odd and >= 1 (to keep the map's size), got {kernel_size}")
        self.kernel_size = int(kernel_size)
        self.embeds = nn.ModuleList(ChannelEmbed(s_shape[0], t_shape[0], self.kernel_size)
                                    for (_, s_shape), (_, t_shape) in pairs)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                student_features: dict[str, torch.Tensor],
                teacher_features: dict[str, torch.Tensor]) -> torch.Tensor:
        pairs = feature_pairs(student_features, teacher_features)
        check_built("ickd", len(self.embeds), student_features)
        loss = student_logits.new_zeros(())
        for (s_name, t_name), (s, t), embed in zip(zip(student_features, teacher_features), pairs, self.embeds):
            check_map_channels("ickd", "embedding", (("student", s_name, s, embed.conv2d.in_channels),
                                                     ("teacher", t_name, t, embed.conv2d.out_channels)))
            loss = loss + channel_correlation_loss(embed(s), t)
        return loss


# ---- PAD-L2 ----------------------------------------------------------------------------------------------------


class VarianceHead(nn.Module):
    """PAD's variance branch: Linear(D, D) then BatchNorm1d(D) of the flattened student feature, read as the log of
    each dimension's variance (torchdistill ``VarianceBranch4PAD``, ``models/wrapper.py`` lines 636-650)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(flat(x)))


def pad_l2(student: torch.Tensor, teacher: torch.Tensor, log_variance: torch.Tensor, eps: float) -> torch.Tensor:
    """``PADL2Loss`` of (B, D) features: the batch mean of ``mean_d [(t - s)² / (eps + exp(v)) + v]``."""
    return ((teacher - student).pow(2) / (eps + log_variance.exp()) + log_variance).mean(1).mean()


@LOSSES.register("pad_l2")
class PrimeAwareAdaptiveL2(FeatureLoss):
    """Prime-aware adaptive distillation with the L2 distance (Zhang et al., "Prime-Aware Adaptive Distillation",
    ECCV 2020), as torchdistill's ``PADL2Loss`` with its ``VarianceBranch4PAD`` head.

    Each pair's student and teacher features are flattened to (B, D); a head of the student's feature (``Linear(D,
    D)`` then ``BatchNorm1d(D)``, ``VarianceHead``) gives a log-variance v per sample and dimension, and the loss is
    the batch mean of ``mean_d [(t - s)² / (eps + exp(v)) + v]``, eps = 1e-6 (``mid_level.py`` lines 1315-1325),
    summed over pairs. The gradient reaches the student both through s and through the head's input, as in
    torchdistill (its wrapper feeds the hooked, undetached output to the head). The references hook the pooled
    embedding (``avgpool``: 512-d on ResNet-18/34); a hooked map is flattened, so the head is D x D (4096-d for a
    64 x 8 x 8 ``layer3``).

    Weight 1, CE weight 1 (``configs/sample/ilsvrc2012/pad/resnet18_from_resnet34.yaml``, lines 193-224; also
    ``configs/official/ilsvrc2012/yoshitomo-matsubara/rrpr2020/pad_l2-resnet18_from_resnet34.yaml``, 71.72 % top-1
    on ImageNet). PAD is the second of two stages there: stage 1 (lines 80-169) trains CE + 1 × ``MSELoss`` of the
    same features for 10 epochs (the official run starts from such a ``ce_l2`` checkpoint), stage 2 CE + PAD-L2 for
    10 more with a fresh head. ``l2_epochs`` = N makes kd's first N epochs stage 1 (plain mean of (s - t)², the head
    unused); the default 0 runs PAD from the first epoch.

    The student's features pass through kd's connector first (``connect``): the identity where the two shapes agree,
    as torchdistill requires them to, else a learned projection to the teacher's shape, which the head then reads.
    """

    weight = 1.0
    connect = True
    space = {"weight": Range(0.1, 10.0, log=True), "ce_weight": FeatureLoss.ce_range}

    def __init__(self, student_shapes: Shapes, teacher_shapes: Shapes, eps: float = 1e-6, l2_epochs: int = 0) -> None:
        super().__init__()
        pairs = layer_pairs("pad_l2", student_shapes, teacher_shapes)
        if eps <= 0 or l2_epochs < 0:
            raise ValueError(f"pad_l2: need eps > 0 and l2_epochs >= 0, got eps={eps}, l2_epochs={l2_epochs}")
        self.eps, self.l2_epochs = float(eps), int(l2_epochs)
        # The connector gives the student's feature the teacher's shape, so each head reads the teacher's size.
        self.heads = nn.ModuleList(VarianceHead(math.prod(t_shape)) for _, (_, t_shape) in pairs)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                student_features: dict[str, torch.Tensor], teacher_features: dict[str, torch.Tensor],
                epoch: int | None = None) -> torch.Tensor:
        pairs = feature_pairs(student_features, teacher_features)
        check_built("pad_l2", len(self.heads), student_features)
        warm = epoch is not None and epoch < self.l2_epochs
        loss = student_logits.new_zeros(())
        for (s_name, t_name), (s, t), head in zip(zip(student_features, teacher_features), pairs, self.heads):
            dim = head.linear.in_features
            for flag, name, f in (("student", s_name, s), ("teacher", t_name, t)):
                if flat(f).shape[1] != dim:
                    raise ValueError(f"pad_l2: --{flag}_layers '{name}' gives {tuple(f.shape)}, {flat(f).shape[1]} "
                                     f"numbers per sample, but its variance head was built for {dim}")
            s_flat, t_flat = flat(s), flat(t)
            loss = loss + ((s_flat - t_flat).pow(2).mean() if warm else pad_l2(s_flat, t_flat, head(s), self.eps))
        return loss
