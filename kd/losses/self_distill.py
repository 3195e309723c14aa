"""Self-distillation, "Be Your Own Teacher" (BYOT; Zhang et al., ICCV 2019): a network's deepest classifier
teaches auxiliary classifiers that the loss attaches to its shallower stages; no teacher network is run.

Reference: luanyunteng/pytorch-be-your-own-teacher, an unofficial PyTorch implementation (its README: the paper
gives neither the hyper-parameters nor the branches' details, which it chose). ``train.py`` builds the objective
at lines 193–228; ``models/resnet.py`` the auxiliary branches at lines 11–25 (``branchBottleNeck``), 116–140 and
175–208.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import LOSSES, DistillationLoss, Range
from kd.losses.features import Shapes
from kd.losses.soft_labels import pooled, pooled_width


class Branch(nn.Module):
    """One auxiliary classifier on a shallow stage's (C, H, W) map: the reference's ``branchBottleNeck`` (1×1 conv
    to ``width``/4 channels, a ``stride``×``stride`` conv of that stride, 1×1 conv to ``width``, each followed by
    BatchNorm and ReLU), global average pooling and a linear classifier.

    ``width`` is the deepest feature's, so that the pooled bottleneck output can be compared with it (the hint);
    ``stride`` brings the stage's map down to the deepest map's resolution, as the reference's kernel sizes 8, 4
    and 2 bring ResNet's stages 1–3 to stage 4's.
    """

    def __init__(self, channels: int, width: int, stride: int, num_classes: int) -> None:
        super().__init__()
        middle = max(1, width // 4)
        self.bottleneck = nn.Sequential(
            nn.Conv2d(channels, middle, kernel_size=1), nn.BatchNorm2d(middle), nn.ReLU(),
            nn.Conv2d(middle, middle, kernel_size=stride, stride=stride), nn.BatchNorm2d(middle), nn.ReLU(),
            nn.Conv2d(middle, width, kernel_size=1), nn.BatchNorm2d(width), nn.ReLU(),
        )
        self.classifier = nn.Linear(width, num_classes)
        for module in self.bottleneck:  # the reference initialises every conv of its network so (resnet.py l. 147)
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled bottleneck feature (B, width), for the hint, and the branch's logits (B, classes)."""
        hint = self.bottleneck(feature).mean(dim=(2, 3))
        return hint, self.classifier(hint)


def branch_stride(stage: tuple[int, ...], deepest: tuple[int, ...]) -> int:
    """The stride of a branch's middle conv: the ratio of the stage's resolution to the deepest map's.

    A deepest feature that is already pooled (1×1, or a vector: ``avgpool``, ``pool``) does not tell the final
    stage's resolution; the middle conv then keeps the resolution (stride 1) and the global pooling after it
    does the reduction, rather than a kernel as large as the whole map.
    """
    if len(deepest) != 3 or deepest[1] * deepest[2] == 1:
        return 1
    return max(1, min(stage[1] // deepest[1], stage[2] // deepest[2]))


@LOSSES.register("self_distill")
class SelfDistillation(DistillationLoss):
    """BYOT's self-distillation: for each shallow stage i (``--student_layers`` but the last) a :class:`Branch`
    gives logits zᵢ and a pooled feature fᵢ; the network's own logits s and its deepest hooked feature g
    (``--student_layers``' last, averaged over space if a map) teach them. Per batch of B:

    ``soft`` = α·T²·Σᵢ mean_b KL(softmax(s/T) ‖ softmax(zᵢ/T));
    ``hint`` = β·Σᵢ mean_b Σ_c (fᵢ − g)²·[fᵢ > 0 or g > 0];
    ``aux_ce`` = (1 − α)·Σᵢ CE(zᵢ, y).
    The network's own (1 − α)·CE(s, y) is kd's objective's ``ce_weight``·CE: ``ce_weight`` = 0.9 is 1 − α at the
    default α; giving ``--loss_options self_distill.alpha=A`` asks for ``--ce_weight`` 1 − A beside it.

    As in the reference (train.py lines 206–223), s and g are detached: the deepest classifier teaches and is
    taught by the labels alone, so this loss sends no gradient to the network's logits or to its deepest feature;
    it trains the branches and, through them, the stages they read. The reference's soft term is the cross-
    entropy −Σ p log q (kd_loss_function, lines 360–370), which is the KL plus the teacher's entropy: kd returns
    the KL (zero when a branch matches the deepest classifier), with the same gradient. Its hint mask (line 373)
    keeps the elements where either feature is positive; there both are averaged ReLU outputs, so it only drops
    elements where both are 0 (a no-op), but with a deepest feature that can be negative it binds, so kd keeps it.

    Defaults (train.py lines 64–68): T = 3, α = 0.1, and the hint weight β = 1e-6 on a sum over the batch (line
    374) at the default batch of 128 (line 37); kd averages over the batch, so β = 128 × 1e-6 = 1.28e-4 is the
    same weight at that batch and stays so at others. The reference's README takes them as its own choice: the
    paper does not give them.

    Heads: the reference's branches read ResNet's stages 1–3 and are compared with stage 4's pooled output, with
    middle convs of kernel and stride 8, 4 and 2. kd hooks any named modules, so a branch's stride is the ratio of
    its stage's resolution to the deepest hooked map's (see :func:`branch_stride`: 1 when the deepest is pooled),
    and its width is the deepest feature's channel count (its length, for a vector). The reference's unused
    ``downsample*_1`` modules are left out. The branches are this loss's parameters, trained with the student and
    not part of it: the delivered network is the student alone.
    """

    weight = 1.0
    ce_weight = 0.9
    features = True
    needs_teacher = False
    space = {"weight": Range(0.25, 4.0, log=True), "ce_weight": Range(0.1, 2.0, log=True),
             "alpha": Range(0.02, 0.9, log=True), "beta": Range(1e-6, 1e-2, log=True),
             "temperature": Range(1.0, 8.0, log=True)}

    def __init__(self, num_classes: int, student_shapes: Shapes, temperature: float = 3.0, alpha: float = 0.1,
                 beta: float = 1.28e-4) -> None:
        super().__init__()
        shapes = [tuple(shape) for shape in (student_shapes or {}).values()]
        if len(shapes) < 2:
            raise ValueError(f"self_distill needs at least two --student_layers, got {len(shapes)}: the shallower "
                             "stages in order, then the deepest feature (e.g. layer1 layer2 layer3 layer4)")
        for layer, shape in list(student_shapes.items())[:-1]:
            if len(shape) != 3:
                raise ValueError(f"self_distill attaches a convolutional branch to each --student_layers but the "
                                 f"last; '{layer}' has shape {tuple(shape)}, not a (C, H, W) map")
        self.temperature, self.alpha, self.beta = temperature, alpha, beta
        deepest = shapes[-1]
        width = pooled_width(deepest)
        self.branches = nn.ModuleList(Branch(shape[0], width, branch_stride(shape, deepest), num_classes)
                                      for shape in shapes[:-1])

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                student_features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        *stages, deepest = student_features.values()
        if len(stages) != len(self.branches):
            raise ValueError(f"self_distill was built for {len(self.branches) + 1} --student_layers but got "
                             f"{len(student_features)} features")
        t = self.temperature
        target = F.log_softmax(student_logits.detach() / t, dim=1)
        goal = pooled(deepest.detach())
        soft = hint = aux_ce = student_logits.new_zeros(())
        for branch, stage in zip(self.branches, stages):
            feature, logits = branch(stage)
            soft = soft + F.kl_div(F.log_softmax(logits / t, dim=1), target, reduction="batchmean", log_target=True)
            kept = ((feature > 0) | (goal > 0)).to(feature.dtype)
            hint = hint + ((feature - goal) ** 2 * kept).sum(dim=1).mean()
            aux_ce = aux_ce + F.cross_entropy(logits, labels)
        return {"soft": self.alpha * t**2 * soft, "hint": self.beta * hint, "aux_ce": (1 - self.alpha) * aux_ce}
