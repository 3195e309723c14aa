"""Hint losses: the student's features regressed onto the teacher's (FitNets)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import LOSSES, Range
from kd.losses.features import FeatureLoss, FeaturePairLoss, Shapes, require_maps


class ConvReg(nn.Sequential):
    """The references' FitNets regressor (mdistiller's ``ConvReg`` in ``distillers/_common.py``, RepDistiller's in
    ``models/util.py``): a convolution chosen by the two maps' heights, then BN and ReLU, even where shapes agree.

    A student map twice the teacher's height: 3×3, stride 2. Half its height: a 4×4 transposed convolution, stride
    2. Otherwise (at least its height): a (1 + Δh) × (1 + Δw) convolution. A smaller map in other proportions fails.
    """

    def __init__(self, source: tuple[int, ...], target: tuple[int, ...]) -> None:
        (s_c, s_h, s_w), (t_c, t_h, t_w) = source, target
        if s_h == 2 * t_h:
            conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(f"fitnets regressor=convreg maps a student map of height {s_h} onto the teacher's {t_h} "
                             "only when it is twice, half, or at least as large")
        super().__init__(conv, nn.BatchNorm2d(t_c), nn.ReLU())


@LOSSES.register("fitnets")
class FitNets(FeaturePairLoss):
    """FitNets hint loss (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

    The mean squared error between the student's feature, regressed to the teacher's shape, and the teacher's,
    summed over layer pairs, as mdistiller's ``FitNet`` (``F.mse_loss`` weighted by ``FITNET.LOSS.FEAT_WEIGHT =
    100``, CE weight 1; mdistiller hints one layer, kd every hooked pair). The regressor is kd's learned connector
    by default (``regressor="connector"``: a 1×1 convolution and BN where the channels differ, a resize where the
    sizes do, nothing where the shapes agree), or the references' :class:`ConvReg` (``regressor="convreg"``), built
    for every pair, trained with the student.
    """

    weight = 100.0
    connect = True  # with regressor="connector"; an instance with its own regressors sets it False
    # Reaches far below the paper's 100: on the digits preset the best tuned weight sat at 0.1, the old floor.
    space = {"weight": Range(0.001, 200.0, log=True), "ce_weight": FeatureLoss.ce_range}

    def __init__(self, regressor: str = "connector", student_shapes: Shapes | None = None,
                 teacher_shapes: Shapes | None = None) -> None:
        super().__init__()
        if regressor not in ("connector", "convreg"):
            raise ValueError(f"fitnets: regressor is connector (kd's) or convreg (the references'), got {regressor!r}")
        self.regressors = None
        if regressor == "convreg":
            require_maps("fitnets regressor=convreg", student_shapes, "student")
            require_maps("fitnets regressor=convreg", teacher_shapes, "teacher")
            self.connect = False
            pairs = list(zip((student_shapes or {}).items(), (teacher_shapes or {}).values()))
            self.positions = {layer: index for index, ((layer, _), _) in enumerate(pairs)}  # names may hold dots
            self.regressors = nn.ModuleList(ConvReg(s, t) for (_, s), t in pairs)

    def pair_loss(self, layer: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.regressors is not None:
            student = self.regressors[self.positions[layer]](student)
        if student.shape != teacher.shape:
            raise ValueError(f"fitnets: student feature '{layer}' has shape {tuple(student.shape)} but the teacher's "
                             f"has {tuple(teacher.shape)}; fitnets compares them element by element")
        return F.mse_loss(student, teacher)
