"""Relational losses: how samples relate to each other in feature space, matched (RKD, PKT, SP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.losses.base import LOSSES, Range
from kd.losses.features import FeatureLoss, FeaturePairLoss, feature_pairs, flat


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
