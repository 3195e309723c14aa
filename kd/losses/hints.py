"""Hint losses: the student's features regressed onto the teacher's (FitNets)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.losses.base import LOSSES, Range
from kd.losses.features import FeatureLoss, FeaturePairLoss


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
