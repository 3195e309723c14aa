"""Distillation losses on hooked intermediate features: FitNets, AT, RKD, PKT, SP and CRD.

Each loss gets ``student_features`` / ``teacher_features`` (hooked outputs by layer name; student
layer i pairs with teacher layer i) and, built with the run's settings, the per-sample shapes of
those features. The conventions follow the reference implementations in megvii-research/mdistiller
(``mdistiller/distillers/*.py``), whose configuration (``mdistiller/engine/cfg.py``) gives the
default weights; each class says where it departs from them. Teacher features come from a frozen
teacher; the losses detach them, so no gradient ever reaches them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import LOSSES, DistillationLoss, Range

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


@LOSSES.register("fitnets")
class FitNets(FeaturePairLoss):
    """FitNets hint loss (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

    The mean squared error between the student's feature, passed through kd's learned connector
    (``connect``) to the teacher's shape, and the teacher's, summed over layer pairs. As in
    mdistiller's ``FitNet`` (``F.mse_loss`` weighted by ``FITNET.LOSS.FEAT_WEIGHT = 100``, CE weight 1);
    mdistiller hints one layer, kd sums over every hooked pair, and its connector is kd's (1x1 conv,
    BN, resize) rather than mdistiller's ``ConvReg``.
    """

    weight = 100.0
    connect = True
    # Reaches far below the paper's 100: on the digits preset the best tuned weight sat at 0.1, the old floor.
    space = {"weight": Range(0.001, 200.0, log=True), "ce_weight": FeatureLoss.ce_range}

    def pair_loss(self, layer: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if student.shape != teacher.shape:
            raise ValueError(f"fitnets: student feature '{layer}' has shape {tuple(student.shape)} but the teacher's "
                             f"has {tuple(teacher.shape)}; fitnets compares them element by element")
        return F.mse_loss(student, teacher)


def attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    """Zagoruyko & Komodakis's spatial attention before normalisation: mean over channels of |f|^p, (B, H, W)."""
    return feature.pow(p).mean(1)


@LOSSES.register("at")
class AttentionTransfer(FeaturePairLoss):
    """Activation-based attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

    For each pair of 4-D feature maps, ``at(f) = normalize(mean_c f^p, flattened)`` and the loss is
    ``(at(f_s) - at(f_t)).pow(2).mean()``, summed over pairs, with p = 2 and β = 1000 (the paper's
    and mdistiller's ``AT.LOSS.FEAT_WEIGHT``; CE weight 1), exactly as mdistiller's ``single_stage_at_loss``
    / ``at_loss``. Where the spatial sizes differ, kd resizes the student's attention map (not the
    features) to the teacher's size: adaptive average pooling when the student's map is at least as
    large in both dimensions, bilinear interpolation otherwise. mdistiller instead pools whichever
    feature map is larger, before the power, to a square of the smaller height.
    """

    weight = 1000.0
    # Reaches far below the paper's 1000, which cost the digits preset's student 16 points: at 0.1 the term's
    # gradient starts under 1% of the cross-entropy's, so the tune can turn AT down where it does not pay.
    space = {"weight": Range(0.1, 2000.0, log=True), "ce_weight": FeatureLoss.ce_range, "p": Range(1.0, 4.0)}

    def __init__(self, p: float = 2.0, student_shapes: Shapes | None = None,
                 teacher_shapes: Shapes | None = None) -> None:
        super().__init__()
        require_maps("at", student_shapes, "student")
        require_maps("at", teacher_shapes, "teacher")
        self.p = p

    def pair_loss(self, layer: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The attention-transfer loss of one pair of (B, C, H, W) maps (channel counts may differ)."""
        am_s, am_t = attention_map(student, self.p), attention_map(teacher, self.p)
        size = am_t.shape[-2:]
        if am_s.shape[-2:] != size:
            if am_s.shape[-2] >= size[0] and am_s.shape[-1] >= size[1]:
                am_s = F.adaptive_avg_pool2d(am_s.unsqueeze(1), size).squeeze(1)
            else:
                am_s = F.interpolate(am_s.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
        return (F.normalize(flat(am_s)) - F.normalize(flat(am_t))).pow(2).mean()

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                student_features: dict[str, torch.Tensor],
                teacher_features: dict[str, torch.Tensor]) -> torch.Tensor:
        require_maps("at", {k: tuple(v.shape) for k, v in student_features.items()}, "student", per_sample=False)
        require_maps("at", {k: tuple(v.shape) for k, v in teacher_features.items()}, "teacher", per_sample=False)
        return super().forward(student_logits, teacher_logits, labels, student_features, teacher_features)


def pairwise_distances(e: torch.Tensor, squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """mdistiller's ``_pdist``: Euclidean distances between rows (clamped at ``eps``), zero diagonal."""
    e_square = e.pow(2).sum(dim=1)
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps)
    if not squared:
        res = res.sqrt()
    eye = torch.eye(len(e), dtype=torch.bool, device=e.device)
    return res.masked_fill(eye, 0.0)


def triplet_cosines(e: torch.Tensor) -> torch.Tensor:
    """cos of the angle at e_i between e_j and e_k, for all (i, j, k), flattened; 0 where j or k is i."""
    directions = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [i, j] = (e_j - e_i) / |.|
    return torch.bmm(directions, directions.transpose(1, 2)).reshape(-1)


@LOSSES.register("rkd")
class RelationalKD(FeatureLoss):
    """Relational knowledge distillation (Park et al., "Relational Knowledge Distillation", CVPR 2019).

    On each pair of flattened features: the distance-wise loss, smooth L1 between the pairwise
    Euclidean distances each divided by their mean over non-zero pairs, weighted 25, and the
    angle-wise loss, smooth L1 between the cosines of the angles of all triplets, weighted 50;
    returned as the terms ``distance`` and ``angle``. Follows mdistiller's ``rkd_loss`` exactly
    (``_pdist`` with eps = 1e-12, not squared; smooth L1 averaged over all B² distances and all B³
    triplets, degenerate ones included, where both sides are 0), except that mdistiller uses only the
    pooled feature while kd sums over every hooked pair. A batch of one sample has no relations: 0.
    """

    weight = 1.0
    space = {"weight": Range(0.01, 2.0, log=True), "ce_weight": FeatureLoss.ce_range,
             "distance_weight": Range(1.0, 50.0, log=True), "angle_weight": Range(1.0, 100.0, log=True)}

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, squared: bool = False,
                 eps: float = 1e-12) -> None:
        super().__init__()
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight
        self.squared = squared
        self.eps = eps

    def normalized_distances(self, e: torch.Tensor) -> torch.Tensor:
        d = pairwise_distances(e, self.squared, self.eps)
        return d / d[d > 0].mean()

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                student_features: dict[str, torch.Tensor],
                teacher_features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        distance = angle = student_logits.new_zeros(())
        for s, t in feature_pairs(student_features, teacher_features):
            s, t = flat(s), flat(t)
            if len(s) < 2:
                distance, angle = distance + 0 * s.sum(), angle + 0 * s.sum()
                continue
            distance = distance + F.smooth_l1_loss(self.normalized_distances(s), self.normalized_distances(t))
            angle = angle + F.smooth_l1_loss(triplet_cosines(s), triplet_cosines(t))
        return {"distance": self.distance_weight * distance, "angle": self.angle_weight * angle}


def pkt_probabilities(f: torch.Tensor, eps: float) -> torch.Tensor:
    """PKT's conditional probabilities: cosine similarities of rows, shifted to [0, 1], rows summing to 1."""
    f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
    f = torch.where(torch.isnan(f), torch.zeros_like(f), f)  # mdistiller: f[f != f] = 0
    similarity = (f @ f.t() + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


@LOSSES.register("pkt")
class ProbabilisticKT(FeaturePairLoss):
    """Probabilistic knowledge transfer (Passalis & Tefas, "Learning Deep Representations with Probabilistic
    Knowledge Transfer", ECCV 2018).

    On each pair of flattened features: rows L2-normalised (norm + eps), cosine-similarity matrices
    shifted to [0, 1] by (sim + 1) / 2 and normalised row-wise into probabilities, then
    ``mean(P_t * log((P_t + eps) / (P_s + eps)))`` over all B² entries, eps = 1e-7; summed over pairs.
    Exactly mdistiller's ``pkt_loss`` (torchdistill's / the authors' ``cosine_similarity_loss``),
    weight 30000 (``PKT.LOSS.FEAT_WEIGHT``), CE weight 1; mdistiller uses only the pooled feature.
    """

    weight = 30000.0
    space = {"weight": Range(10.0, 50000.0, log=True), "ce_weight": FeatureLoss.ce_range}

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps

    def pair_loss(self, layer: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        p_s, p_t = pkt_probabilities(flat(student), self.eps), pkt_probabilities(flat(teacher), self.eps)
        return torch.mean(p_t * torch.log((p_t + self.eps) / (p_s + self.eps)))


@LOSSES.register("sp")
class SimilarityPreserving(FeaturePairLoss):
    """Similarity-preserving distillation (Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019).

    On each pair of flattened features: Gram matrices ``G = f f^T`` with rows L2-normalised, and
    ``||G_s - G_t||_F^2 / b^2``, summed over pairs; γ = 3000 (the paper's, mdistiller's
    ``SP.LOSS.FEAT_WEIGHT``), CE weight 1. As mdistiller's ``similarity_loss`` / ``sp_loss``, which
    mdistiller applies to the last feature map only.
    """

    weight = 3000.0
    space = {"weight": Range(1.0, 5000.0, log=True), "ce_weight": FeatureLoss.ce_range}

    def pair_loss(self, layer: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = flat(student), flat(teacher)
        g_s, g_t = F.normalize(s @ s.t()), F.normalize(t @ t.t())
        return (g_t - g_s).pow(2).sum() / len(s) ** 2


class Embed(nn.Module):
    """CRD's embedding head: flatten, a linear map to ``dim_out``, L2-normalise (mdistiller's ``Embed``)."""

    def __init__(self, dim_in: int, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(flat(x))
        return x / x.pow(2).sum(1, keepdim=True).sqrt()


def nce_loss(scores: torch.Tensor, num_samples: int, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE loss (Eq. 18; mdistiller/RepDistiller ``ContrastLoss``) of (B, K+1) scores, positive first.

    With m = K negatives from the uniform noise P_n = 1/N: ``-(Σ_b log(P_pos / (P_pos + m P_n + eps))
    + Σ_b,k log(m P_n / (P_neg + m P_n + eps))) / B``.
    """
    m = scores.shape[1] - 1
    noise = m / float(num_samples)
    log_d1 = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    log_d0 = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


@LOSSES.register("crd")
class ContrastiveRepresentationDistillation(FeatureLoss):
    """Contrastive representation distillation (Tian et al., "Contrastive Representation Distillation", ICLR 2020).

    The last feature pair, flattened, is embedded by a student and a teacher head (linear +
    L2-normalise, ``feat_dim`` = 128). A memory bank per side (``num_samples`` × ``feat_dim``,
    initialised uniform in ±1/sqrt(feat_dim/3)) supplies, for each sample, its own row (the positive,
    index 0) and ``nce_k`` = 16384 negatives drawn uniformly with replacement, from torch's global RNG.
    Scores ``exp(<bank row, embedding> / nce_t)`` (nce_t = 0.07) are divided by a constant Z per side,
    ``mean score × num_samples`` estimated on the first training batch and kept as a buffer, and the
    NCE loss (``nce_loss``) of both anchors — the student embedding against the teacher bank and the
    teacher embedding against the student bank — is summed. After the loss, in training mode only,
    the batch's rows of each bank move to ``momentum · row + (1 - momentum) · embedding`` (0.5),
    renormalised. Weight 0.8, CE weight 1 (mdistiller's ``CRD.LOSS``).

    Follows mdistiller's / RepDistiller's ``CRD``, ``ContrastMemory`` and ``ContrastLoss``, with the
    memory's own uniform draw (the ``idx=None`` path) rather than the dataset's ``contrast_idx``
    (which in mdistiller's "exact" mode draws the negatives from other classes). Departures: an eval-mode
    call changes no state (neither the banks nor an unset Z, which it estimates for that call only),
    and the scores are computed in the banks' dtype (float32 under mixed precision, as exp(1/0.07)
    overflows float16).
    """

    weight = 0.8
    space = {"weight": Range(0.01, 2.0, log=True), "ce_weight": FeatureLoss.ce_range,
             "nce_t": Range(0.02, 0.5, log=True)}

    memory_s: torch.Tensor
    memory_t: torch.Tensor
    z_s: torch.Tensor
    z_t: torch.Tensor

    def __init__(self, student_shapes: Shapes, teacher_shapes: Shapes, num_samples: int, feat_dim: int = 128,
                 nce_k: int = 16384, nce_t: float = 0.07, momentum: float = 0.5) -> None:
        super().__init__()
        if not student_shapes or not teacher_shapes:
            raise ValueError("crd needs at least one hooked student and teacher feature")
        if not num_samples or num_samples < 1:
            raise ValueError(f"crd needs the training-set size (num_samples >= 1), got {num_samples}")
        if nce_k < 1 or feat_dim < 1 or nce_t <= 0 or not 0 <= momentum <= 1:
            raise ValueError(f"crd: need nce_k >= 1, feat_dim >= 1, nce_t > 0 and 0 <= momentum <= 1, got "
                             f"nce_k={nce_k}, feat_dim={feat_dim}, nce_t={nce_t}, momentum={momentum}")
        s_dim = math.prod(list(student_shapes.values())[-1])
        t_dim = math.prod(list(teacher_shapes.values())[-1])
        self.num_samples, self.feat_dim = int(num_samples), int(feat_dim)
        self.nce_k, self.nce_t, self.momentum = int(nce_k), float(nce_t), float(momentum)
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(num_samples, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(num_samples, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z_s", torch.tensor(-1.0))  # mdistiller's params[2] (Z_v1), < 0 = unset
        self.register_buffer("z_t", torch.tensor(-1.0))  # params[3] (Z_v2)

    def sample(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, nce_k + 1) bank rows: each sample's own index, then nce_k uniform draws with replacement."""
        drawn = torch.randint(self.num_samples, (len(indices), self.nce_k + 1), device=self.memory_s.device)
        drawn[:, 0] = indices
        return drawn

    def normalizer(self, z: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Z for one side: the stored constant, set from this batch if unset (stored only in training)."""
        value = torch.where(z < 0, scores.detach().mean() * self.num_samples, z)  # no host sync
        if self.training:
            z.copy_(value)
        return value

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                student_features: dict[str, torch.Tensor], teacher_features: dict[str, torch.Tensor],
                indices: torch.Tensor | None = None) -> torch.Tensor:
        if indices is None:
            raise ValueError("crd needs the dataset indices of the batch (indices)")
        f_s, f_t = feature_pairs(student_features, teacher_features)[-1]
        indices = indices.to(device=self.memory_s.device, dtype=torch.long).reshape(-1)
        if len(indices) != len(f_s):
            raise ValueError(f"crd: {len(indices)} indices for a batch of {len(f_s)}")
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise ValueError(f"crd: dataset indices must lie in [0, {self.num_samples}), got "
                             f"{indices.min().item()}..{indices.max().item()}")
        dtype = self.memory_s.dtype
        v_s, v_t = self.embed_s(f_s).to(dtype), self.embed_t(f_t).to(dtype)
        idx = self.sample(indices)
        with torch.autocast(v_s.device.type, enabled=False):  # scores in the banks' dtype, even under AMP
            # Student anchor against the teacher bank (mdistiller's out_v1), teacher anchor against the student's.
            out_s = torch.exp(torch.bmm(self.memory_t[idx].detach(), v_s.unsqueeze(2)).squeeze(2) / self.nce_t)
            out_t = torch.exp(torch.bmm(self.memory_s[idx].detach(), v_t.unsqueeze(2)).squeeze(2) / self.nce_t)
            out_s = out_s / self.normalizer(self.z_s, out_s)
            out_t = out_t / self.normalizer(self.z_t, out_t)
            loss = nce_loss(out_s, self.num_samples) + nce_loss(out_t, self.num_samples)
        if self.training:
            with torch.no_grad():
                for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                    rows = memory[indices] * self.momentum + v.detach() * (1 - self.momentum)
                    memory.index_copy_(0, indices, rows / rows.pow(2).sum(1, keepdim=True).sqrt())
        return loss
