"""Knowledge review (ReviewKD): the student's stages, fused deepest first by attention-based fusion (ABF) modules,
matched with the teacher's stages by the hierarchical context loss (HCL).

Follows megvii-research/mdistiller (commit a08d46f): ``mdistiller/distillers/ReviewKD.py`` (``hcl_loss``, the
``ReviewKD`` distiller and ``ABF``) and the ``REVIEWKD`` section of ``mdistiller/engine/cfg.py``, itself taken from
the authors' dvlab-research/ReviewKD (``CIFAR-100/model/reviewkd.py``). torchdistill's ``HierarchicalContextLoss``
(``torchdistill/losses/mid_level.py``) computes the same HCL of one pair. The ABF modules are parameters of the loss,
so the student's optimiser trains them, as mdistiller's ``get_learnable_parameters`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.errors import KDError
from kd.losses.base import LOSSES, Range
from kd.losses.features import FeatureLoss, Shapes

POOL_SIZES = (4, 2, 1)  # the HCL's pyramid: average-pooled to 4x4, 2x2 and 1x1 where the map is larger


def hierarchical_context_loss(student: torch.Tensor, teacher: torch.Tensor,
                              pool_sizes: tuple[int, ...] = POOL_SIZES) -> torch.Tensor:
    """HCL of one pair of (B, C, H, W) maps (mdistiller ``hcl_loss``, lines 11-28, for one pair).

    The MSE of the maps (weight 1), plus for each size l in ``pool_sizes`` smaller than H the MSE of both maps
    average-pooled to l x l, weighted 1/2, 1/4, 1/8 in turn, all divided by the sum of the weights used.
    """
    height = student.shape[2]
    loss = F.mse_loss(student, teacher)
    weight = total = 1.0
    for size in pool_sizes:
        if size >= height:
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, (size, size)),
                                          F.adaptive_avg_pool2d(teacher, (size, size)))
        total += weight
    return loss / total


class ABF(nn.Module):
    """Attention-based fusion of one student stage with the fused output of the deeper stages (mdistiller ``ABF``,
    lines 106-144).

    ``conv1`` (1x1 conv to ``mid_channels``, BN) maps the stage; with ``fuse``, the residual from the deeper stage
    is resized (nearest) to the stage's size and ``att_conv`` (1x1 conv with bias on both, sigmoid) gives two
    per-pixel weights of the sum ``x * a0 + residual * a1``. The result, resized (nearest) to the teacher's size,
    is the next residual; ``conv2`` (3x3 conv to the teacher's channels, BN) of it is compared with the teacher.
    Both conv weights start Kaiming-uniform with a = 1, as in the references.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = (nn.Sequential(nn.Conv2d(mid_channels * 2, 2, kernel_size=1), nn.Sigmoid())
                         if fuse else None)
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                out_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(output compared with the teacher, residual passed to the next shallower stage)."""
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("a fusing ABF needs the residual of the deeper stage")
            residual = F.interpolate(residual, tuple(x.shape[2:]), mode="nearest")
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, 0:1] + residual * attention[:, 1:2]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, tuple(out_size), mode="nearest")
        return self.conv2(x), x


def as_map(feature: torch.Tensor) -> torch.Tensor:
    """A (B, C, H, W) map as it is; a pooled (B, D) vector as (B, D, 1, 1), as mdistiller unsqueezes its
    ``pooled_feat``."""
    return feature.reshape(*feature.shape, 1, 1) if feature.dim() == 2 else feature


def _check_layers(student_shapes: Shapes | None, teacher_shapes: Shapes | None) -> tuple[list, list]:
    """The hooked (name, per-sample shape) of each side, in order; a KDError naming the flags unless both sides
    hook as many layers, at least one, each a map (C, H, W) or a pooled vector (D,)."""
    student, teacher = list((student_shapes or {}).items()), list((teacher_shapes or {}).items())
    if not student or not teacher:
        raise KDError("reviewkd fuses the student's hooked stages and compares them with the teacher's: give "
                      "--student_layers and --teacher_layers, shallowest first (e.g. layer1 layer2 layer3 avgpool), "
                      f"got {len(student)} student and {len(teacher)} teacher layers")
    if len(student) != len(teacher):
        raise KDError(f"reviewkd pairs --student_layers with --teacher_layers in order, but got {len(student)} "
                      f"student layer(s) ({', '.join(name for name, _ in student)}) and {len(teacher)} teacher "
                      f"layer(s) ({', '.join(name for name, _ in teacher)})")
    for flag, layers in (("--student_layers", student), ("--teacher_layers", teacher)):
        for name, shape in layers:
            if len(shape) not in (1, 3) or 0 in shape:
                raise KDError(f"reviewkd: {flag} '{name}' gives shape {tuple(shape)} per sample, not a map (C, H, W) "
                              "or a pooled vector (D,): hook a network's stages and its pooled feature")
    return student, teacher


@LOSSES.register("reviewkd")
class ReviewKD(FeatureLoss):
    """Knowledge review (Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021), as mdistiller's
    ``ReviewKD`` computes it.

    Hook n student stages and n teacher stages, shallowest first, the last usually the pooled feature (``avgpool``;
    a (D,) vector counts as a 1x1 map). Stage i of the student gets an ABF module (``ABF``: in_channels of student
    stage i, out_channels of teacher stage i, mid_channels ``min(max_mid_channels, channels of the student's last
    stage)`` with ``max_mid_channels`` = 512; all but the deepest fuse). From the deepest stage up, each ABF fuses
    its stage with the residual of the one below and resizes it to teacher stage i's size; its output o_i is
    compared with teacher stage i (detached) by the hierarchical context loss, summed over stages:
    ``Σ_i HCL(o_i, t_i)`` (``hierarchical_context_loss``). At 0-based epoch e the sum is weighed
    ``min((e + 1) / warmup, 1)``, warmup = 20 epochs (mdistiller's trainer counts epochs from 1; warmup <= 0: none).
    Weight 1 and CE weight 1: cfg.py's ``REVIEWKD_WEIGHT``, ``CE_WEIGHT`` and ``WARMUP_EPOCHS`` (lines 150-159);
    its CIFAR-100 config (``configs/cifar100/reviewkd.yaml``, resnet32x4 -> resnet8x4) sets the weight to 5.

    mdistiller hooks the student's stage outputs (``feats``; ``STU_PREACT`` False) and the teacher's stages before
    their last ReLU (``preact_feats[1:]``), each followed by the pooled feature; with kd's CIFAR ResNets that is
    ``layer1 layer2 layer3 avgpool`` against ``layerN.K.preact`` of each stage's last block and ``avgpool``. kd takes
    the sizes from the hooked features (mdistiller's ``SHAPES``: the student's, ``OUT_SHAPES``: the teacher's) and
    the channels from the hooked shapes (``IN_CHANNELS``, ``OUT_CHANNELS``), and resizes to a map's height and
    width where the references resize to a square. The authors' code weighs epoch e (from 0) ``min(e / 20, 1)``,
    so their first epoch does not distil; kd follows mdistiller.
    """

    weight = 1.0
    space = {"weight": Range(0.1, 20.0, log=True), "ce_weight": FeatureLoss.ce_range}

    def __init__(self, student_shapes: Shapes, teacher_shapes: Shapes, warmup: int = 20,
                 max_mid_channels: int = 512) -> None:
        super().__init__()
        student, teacher = _check_layers(student_shapes, teacher_shapes)
        if max_mid_channels < 1:
            raise KDError(f"reviewkd: max_mid_channels must be >= 1, got {max_mid_channels}")
        self.warmup, self.max_mid_channels = int(warmup), int(max_mid_channels)
        self.in_channels = [int(shape[0]) for _, shape in student]
        self.out_channels = [int(shape[0]) for _, shape in teacher]
        self.mid_channels = min(self.max_mid_channels, self.in_channels[-1])
        last = len(student) - 1
        # abfs[i] serves hooked stage i (mdistiller keeps them deepest first; kd keeps the hooks' order).
        self.abfs = nn.ModuleList(ABF(c_in, self.mid_channels, c_out, fuse=i < last)
                                  for i, (c_in, c_out) in enumerate(zip(self.in_channels, self.out_channels)))

    def warmup_factor(self, epoch: int) -> float:
        """The warm-up weight of 0-based ``epoch``: (epoch + 1) / warmup, capped at 1."""
        return 1.0 if self.warmup <= 0 else min((epoch + 1) / self.warmup, 1.0)

    def _maps(self, flag: str, features: dict[str, torch.Tensor], channels: list[int]) -> list[torch.Tensor]:
        if len(features) != len(channels):
            raise KDError(f"reviewkd was built for {len(channels)} {flag} but got {len(features)} features "
                          f"({', '.join(features)})")
        maps = []
        for (name, feature), wanted in zip(features.items(), channels):
            if feature.dim() not in (2, 4) or feature.shape[1] != wanted:
                raise KDError(f"reviewkd: {flag} '{name}' gives {tuple(feature.shape)}, but its ABF was built for "
                              f"(B, {wanted}, H, W) maps or (B, {wanted}) vectors")
            maps.append(as_map(feature))
        return maps

    def review(self, student_maps: list[torch.Tensor], teacher_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """The ABF outputs, one per stage in the hooks' order, computed deepest first."""
        outputs: list[torch.Tensor] = []
        residual = None
        for abf, student, size in zip(reversed(self.abfs), reversed(student_maps), reversed(teacher_sizes)):
            output, residual = abf(student, residual, size)
            outputs.insert(0, output)
        return outputs

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                student_features: dict[str, torch.Tensor], teacher_features: dict[str, torch.Tensor],
                epoch: int = 0) -> torch.Tensor:
        student_maps = self._maps("--student_layers", student_features, self.in_channels)
        teacher_maps = self._maps("--teacher_layers", {name: t.detach() for name, t in teacher_features.items()},
                                  self.out_channels)  # from the frozen teacher: no gradient reaches it
        outputs = self.review(student_maps, [tuple(t.shape[2:]) for t in teacher_maps])
        loss = sum((hierarchical_context_loss(o, t) for o, t in zip(outputs, teacher_maps)),
                   student_logits.new_zeros(()))
        return self.warmup_factor(epoch) * loss
