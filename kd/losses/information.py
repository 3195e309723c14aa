"""Feature losses that train their own heads on the hooked features: correlation congruence (CC) and variational
information distillation (VID).

Both follow HobbitLong/RepDistiller (commit b84f547), whose CIFAR-100 figures they reproduce; their heads are
parameters of the loss, so the student's optimiser trains them, as RepDistiller's ``trainable_list`` does
(``train_student.py``, lines 212-226).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import LOSSES, Range
from kd.losses.features import (SIDES, FeatureLoss, Shapes, check_built, check_map_channels, feature_pairs, flat,
                                layer_pairs, pool_to_smaller)


# ---- CC -------------------------------------------------------------------------------------------------------


class LinearEmbed(nn.Module):
    """CC's embedding head: flatten, then a linear map to ``dim_out``, not normalised (RepDistiller
    ``models/util.py``, ``LinearEmbed``, lines 185-194)."""

    def __init__(self, dim_in: int, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(flat(x))


def correlation_congruence(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    """RepDistiller's ``Correlation`` of two (B, D) embeddings: with ``d_i = |e_s,i - e_t,i|``, the mean over
    i = 1 .. B-1 of ``<d_i, d_(i+1)>``. A batch of one sample has no neighbour: 0 (the reference gives NaN)."""
    delta = (e_s - e_t).abs()
    if len(delta) < 2:
        return 0 * delta.sum()
    return (delta[:-1] * delta[1:]).sum(1).mean()


@LOSSES.register("cc")
class CorrelationCongruence(FeatureLoss):
    """Correlation congruence (Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019), as
    HobbitLong/RepDistiller implements it from code its authors shared.

    Each hooked feature, flattened, is embedded by a linear head of its own side (``LinearEmbed``, 128-d, with
    bias, not normalised; ``--feat_dim 128``); with ``d_i = |e_s,i - e_t,i|`` the loss is the mean over
    consecutive samples of the batch of ``<d_i, d_(i+1)>`` (``distiller_zoo/CC.py``, lines 14-17). Weight 0.02,
    CE weight 1, no KL term (``scripts/run_cifar_distill.sh``, line 13: ``-a 0 -b 0.02``; ``-r`` defaults to 1).
    RepDistiller embeds the pooled feature before the classifier (``feat[-1]``, ``helper/loops.py`` lines
    162-165); kd embeds every hooked pair with a head pair of its own and sums the losses, which for one pair is
    the reference. A batch of one sample gives 0 rather than the reference's NaN.

    The paper's loss differs: ``||C_t - C_s||^2 / n^2`` of the batch's correlation matrices under a Gaussian RBF
    kernel expanded to order 2 (γ = 0.4), which torchdistill's ``CCKDLoss`` computes (``losses/mid_level.py``;
    ``torch.dist``, not squared, over the linear heads of its ``Linear4CCKD`` wrapper). mdistiller has no CC.
    kd follows RepDistiller, the code behind the CIFAR-100 figures.
    """

    weight = 0.02
    space = {"weight": Range(0.001, 1.0, log=True), "ce_weight": FeatureLoss.ce_range}

    def __init__(self, student_shapes: Shapes, teacher_shapes: Shapes, feat_dim: int = 128) -> None:
        super().__init__()
        pairs = layer_pairs("cc", student_shapes, teacher_shapes)
        if feat_dim < 1:
            raise ValueError(f"cc: feat_dim must be >= 1, got {feat_dim}")
        self.feat_dim = int(feat_dim)
        self.embed_s = nn.ModuleList(LinearEmbed(math.prod(shape), self.feat_dim) for (_, shape), _ in pairs)
        self.embed_t = nn.ModuleList(LinearEmbed(math.prod(shape), self.feat_dim) for _, (_, shape) in pairs)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                student_features: dict[str, torch.Tensor],
                teacher_features: dict[str, torch.Tensor]) -> torch.Tensor:
        pairs = feature_pairs(student_features, teacher_features)
        check_built("cc", len(self.embed_s), student_features)
        loss = student_logits.new_zeros(())
        for (s_name, t_name), (s, t), embed_s, embed_t in zip(zip(student_features, teacher_features), pairs,
                                                              self.embed_s, self.embed_t):
            for name, f, embed in ((s_name, s, embed_s), (t_name, t, embed_t)):
                if flat(f).shape[1] != embed.linear.in_features:
                    raise ValueError(f"cc: feature '{name}' has {flat(f).shape[1]} numbers per sample but its "
                                     f"embedding was built for {embed.linear.in_features}")
            loss = loss + correlation_congruence(embed_s(s), embed_t(t))
        return loss


# ---- VID ------------------------------------------------------------------------------------------------------


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, padding=0, bias=False)


class VIDRegressor(nn.Module):
    """VID's Gaussian for one layer pair: mean ``regressor(f_s)`` (1x1 conv, ReLU, 1x1 conv, ReLU, 1x1 conv, no
    biases, ``mid_channels`` wide) and per-channel variance ``softplus(log_scale) + eps``, with ``log_scale``
    starting at ``log(exp(init_pred_var - eps) - 1)`` so that the variance starts at ``init_pred_var``
    (RepDistiller ``distiller_zoo/VID.py``, lines 20-36)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, init_pred_var: float = 5.0,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.regressor = nn.Sequential(conv1x1(in_channels, mid_channels), nn.ReLU(),
                                       conv1x1(mid_channels, mid_channels), nn.ReLU(),
                                       conv1x1(mid_channels, out_channels))
        self.log_scale = nn.Parameter(torch.full((out_channels,), math.log(math.exp(init_pred_var - eps) - 1.0)))
        self.eps = eps

    def variance(self) -> torch.Tensor:
        return F.softplus(self.log_scale) + self.eps

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Mean over (B, C, H, W) of the Gaussian's negative log-likelihood of ``teacher`` (less 0.5·log 2π)."""
        student, teacher = pool_to_smaller(student, teacher)
        pred_mean = self.regressor(student)
        pred_var = self.variance().view(1, -1, 1, 1)
        return (0.5 * ((pred_mean - teacher) ** 2 / pred_var + torch.log(pred_var))).mean()


@LOSSES.register("vid")
class VariationalInformationDistillation(FeatureLoss):
    """Variational information distillation (Ahn et al., "Variational Information Distillation for Knowledge
    Transfer", CVPR 2019), as HobbitLong/RepDistiller's ``VIDLoss`` (``distiller_zoo/VID.py``, from the authors'
    code).

    For each pair of feature maps, the larger map is average-pooled to the smaller's size, the teacher's map t is
    modelled as a Gaussian of mean ``μ = regressor(f_s)`` (three 1x1 convolutions without bias, ReLU between,
    as many channels in the middle as the teacher has) and a learned per-channel variance
    ``σ² = softplus(log_scale) + eps``, starting at ``init_pred_var`` = 5 (eps = 1e-5), and the loss is the mean
    over batch, channels and positions of ``0.5 · ((μ - t)² / σ² + log σ²)``, summed over pairs. Weight 1, CE
    weight 1, no KL term (``scripts/run_cifar_distill.sh``, line 15: ``-a 0 -b 1``; mdistiller's
    ``VID.LOSS.FEAT_WEIGHT``/``CE_WEIGHT``, ``mdistiller/engine/cfg.py`` lines 125-132). The references hook
    the stages' outputs (``feat[1:-1]``: layer1..3 of a CIFAR ResNet).

    The references pick the side to pool by height alone and pool to a square; kd pools each side to the smaller
    height and width, the same on square maps. The regressors and the variance are trained with the student, as
    in RepDistiller (``trainable_list.append(criterion_kd)``); mdistiller's ``VID`` keeps its ``log_scales`` in
    a plain list, so its optimiser never sees them and its variance stays 5. torchdistill's ``VIDLoss`` with
    ``Regressor4VID`` computes the same terms without pooling. The softplus is ``F.softplus`` (the references
    write ``log(1 + exp(x))``; the two agree to rounding below x = 20).
    """

    weight = 1.0
    space = {"weight": Range(0.01, 10.0, log=True), "ce_weight": FeatureLoss.ce_range,
             "init_pred_var": Range(0.5, 20.0, log=True)}

    def __init__(self, student_shapes: Shapes, teacher_shapes: Shapes, init_pred_var: float = 5.0,
                 eps: float = 1e-5) -> None:
        super().__init__()
        pairs = layer_pairs("vid", student_shapes, teacher_shapes)
        for flag, (name, shape) in ((flag, layer) for pair in pairs for flag, layer in zip(SIDES, pair)):
            if len(shape) != 3:
                raise ValueError(f"vid regresses feature maps with 1x1 convolutions, but --{flag}_layers '{name}' "
                                 f"gives shape {shape} per sample, not (C, H, W): hook convolutional stages "
                                 "(e.g. layer1 layer2 layer3)")
        if not init_pred_var > eps or eps <= 0:
            raise ValueError(f"vid: need init_pred_var > eps > 0, got init_pred_var={init_pred_var}, eps={eps}")
        self.init_pred_var, self.eps = float(init_pred_var), float(eps)
        self.regressors = nn.ModuleList(VIDRegressor(s_shape[0], t_shape[0], t_shape[0], self.init_pred_var, self.eps)
                                        for (_, s_shape), (_, t_shape) in pairs)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                student_features: dict[str, torch.Tensor],
                teacher_features: dict[str, torch.Tensor]) -> torch.Tensor:
        pairs = feature_pairs(student_features, teacher_features)
        check_built("vid", len(self.regressors), student_features)
        loss = student_logits.new_zeros(())
        for (s_name, t_name), (s, t), head in zip(zip(student_features, teacher_features), pairs, self.regressors):
            check_map_channels("vid", "regressor", (("student", s_name, s, head.regressor[0].in_channels),
                                                    ("teacher", t_name, t, head.log_scale.numel())))
            loss = loss + head(s, t)
        return loss
