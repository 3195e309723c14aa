"""OFD: the feature distillation of Heo et al., "A Comprehensive Overhaul of Feature Distillation" (ICCV 2019), as
megvii-research/mdistiller computes it (``mdistiller/distillers/OFD.py``, commit a08d46f).

The teacher's features are taken before their ReLU; the student's pass through a learned connector (1x1 conv and BN)
to the teacher's channels; the loss is a partial L2 distance that ignores where the student is already below a
per-channel margin at which the teacher's ReLU cuts. The margin is the mean of the teacher's pre-ReLU response over
its negative part, a Gaussian of the mean and spread of the BatchNorm before that ReLU (its bias and |weight|), so the
loss reads the loaded teacher network when it is built.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kd.errors import KDError
from kd.losses.base import LOSSES, Range
from kd.losses.features import SIDES, FeatureLoss, Shapes, check_built, check_map_channels, feature_pairs, layer_pairs

OPTION = "--loss_options ofd.teacher_bns"
EXAMPLE = f"{OPTION}=layer1.8.bn2,layer2.8.bn2,layer3.8.bn2"


def gaussian_margin(scale: float, mean: float) -> float:
    """mdistiller's margin of one channel (``init_ofd_modules``, ``OFD.py`` lines 90-109; the authors'
    ``get_margin_from_BN``): with s = |γ| and m = β, the mean of a N(m, s²) variable over its negative part,
    E[x | x < 0] = m − s·φ(m/s)/Φ(−m/s), where Φ(−m/s) > 0.001, else −3s.
    A channel with γ = 0 (the constant β, where the reference divides by zero) gets the limit min(β, 0)."""
    s, m = abs(scale), mean
    if s == 0:
        return min(m, 0.0)
    cdf = 0.5 * math.erfc(m / s / math.sqrt(2.0))  # Φ(−m/s), as scipy.stats.norm.cdf(-m / s)
    if cdf > 0.001:
        return -s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf + m
    return -3 * s


def bn_margins(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """The per-channel margins of one teacher BatchNorm, shaped (1, C, 1, 1), in its parameters' dtype."""
    weight, bias = bn.weight.detach().double().cpu().tolist(), bn.bias.detach().double().cpu().tolist()
    margins = [gaussian_margin(s, m) for s, m in zip(weight, bias)]
    return torch.tensor(margins, dtype=bn.weight.dtype, device=bn.weight.device).view(1, -1, 1, 1)


def connector(s_channels: int, t_channels: int, kernel_size: int = 1) -> nn.Sequential:
    """mdistiller's ``_build_feature_connector`` (``OFD.py``, lines 41-59): conv (no bias, stride 1, 'same' padding)
    then BN, the conv drawn from N(0, 2 / (k·k·t_channels)), the BN at weight 1 and bias 0."""
    conv = nn.Conv2d(s_channels, t_channels, kernel_size, stride=1, padding=(kernel_size - 1) // 2, bias=False)
    bn = nn.BatchNorm2d(t_channels)
    with torch.no_grad():
        conv.weight.normal_(0, math.sqrt(2.0 / (kernel_size * kernel_size * t_channels)))
        bn.weight.fill_(1)
        bn.bias.zero_()
    return nn.Sequential(conv, bn)


def partial_l2(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """mdistiller's ``feat_loss`` (``OFD.py``, lines 11-19): squared differences, kept where the teacher is positive,
    where the student is above a teacher between margin and 0, and, against the margin, where the student is above it
    and the teacher at or below it; averaged over the batch, summed over channels and positions. For margins ≤ 0
    (always) it is the paper's ``(s − max(t, m))²`` kept where ``s > max(t, m)`` or ``t > 0``."""
    margin = margin.to(source)
    loss = ((source - margin) ** 2 * ((source > margin) & (target <= margin))
            + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0))
            + (source - target) ** 2 * (target > 0))
    return loss.mean(dim=0).sum()


def bn_names(value: Any) -> list[str]:
    """The ``teacher_bns`` setting as module names: a list, or one string of names split on commas or '+'."""
    if value is None:
        return []
    if isinstance(value, str):
        return [name.strip() for name in value.replace("+", ",").split(",") if name.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value):
        return [name.strip() for name in value]
    raise KDError(f"{OPTION}: expected teacher module names, e.g. {EXAMPLE}, got {value!r}")


def teacher_batchnorms(teacher_network: nn.Module | None, value: Any,
                       teacher_layers: list[tuple[str, tuple[int, ...]]]) -> list[nn.modules.batchnorm._BatchNorm]:
    """The teacher BatchNorms ``value`` names, one per hooked teacher layer, each as wide as that layer's map."""
    if teacher_network is None:
        raise KDError("ofd reads the teacher's BatchNorm weights and biases for its margins, so it needs the teacher "
                      "network loaded: a teacher cache (cached logits) cannot serve it")
    modules = dict(teacher_network.named_modules())
    batchnorms = [name for name, module in modules.items() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    listing = (f"{type(teacher_network).__name__}'s BatchNorms: {', '.join(batchnorms[:60]) or 'none'}"
               f"{' ...' if len(batchnorms) > 60 else ''}")
    names = bn_names(value)
    if len(names) != len(teacher_layers):
        raise KDError(f"{OPTION}: name the teacher BatchNorm before the ReLU of each of the {len(teacher_layers)} "
                      f"--teacher_layers ({', '.join(name for name, _ in teacher_layers)}), in order, e.g. {EXAMPLE}; "
                      f"got {len(names)}; {listing}")
    found = []
    for name, (layer, shape) in zip(names, teacher_layers):
        module = modules.get(name) if name else None
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or not module.affine:
            what = "no such module" if module is None else f"a {type(module).__name__}, not an affine BatchNorm"
            raise KDError(f"{OPTION}: '{name}' is {what} of the teacher; {listing}")
        if len(shape) != 3 or module.num_features != shape[0]:
            raise KDError(f"{OPTION}: '{name}' has {module.num_features} channels but --teacher_layers '{layer}' "
                          f"gives {tuple(shape)} per sample")
        found.append(module)
    return found


@LOSSES.register("ofd")
class OverhaulFeatureDistillation(FeatureLoss):
    """Overhaul of feature distillation (Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019),
    as mdistiller's ``OFD`` computes it.

    For each pair i of n hooked layers, the student's map goes through a connector (conv k×k, k = 1, and BN, to the
    teacher's channels), the teacher's pre-ReLU map is average-pooled to the student's size, and the loss is
    ``partial_l2(connector(s), t, margin) / 2^(n-1-i)`` summed over pairs (the deepest pair counts 1, each shallower
    one half the next), times weight 0.001, beside CE 1 (``ofd_loss`` and ``forward_train``, ``OFD.py`` lines 129-161;
    ``mdistiller/engine/cfg.py``, lines 99-105).

    ``teacher_bns`` names, one per teacher layer, the BatchNorm whose weight and bias give the margins (mdistiller's
    ``get_bn_before_relu``). mdistiller distils ``preact_feats[1:]``, the three stages' outputs before their ReLU
    (four for VGG); in kd's CIFAR networks these are: ResNet ``layerN.K.preact`` of each stage's last block with BNs
    ``layerN.K.bn2``; WRN ``block2.layer.0.bn1``, ``block3.layer.0.bn1``, ``bn1`` (hooked and margins alike); VGG
    ``block1`` .. ``block4`` with BNs ``blockN.<last index>``; ShuffleV2 (a student only) has no hookable pre-ReLU
    concat, so its stages ``layerN`` stand in (the reference's map, shuffled, its second half after the ReLU).

    kd keeps the teacher in eval mode; mdistiller's ``OFD.train`` (lines 114-121) sets every child to train mode, the
    teacher included, so its teacher's maps use batch statistics (as the authors' code, which calls ``t_net.train()``).
    """

    weight = 0.001
    space = {"weight": Range(1e-4, 1e-2, log=True), "ce_weight": FeatureLoss.ce_range}

    def __init__(self, student_shapes: Shapes, teacher_shapes: Shapes, teacher_network: nn.Module | None = None,
                 teacher_bns: Any = None, kernel_size: int = 1) -> None:
        super().__init__()
        pairs = layer_pairs("ofd", student_shapes, teacher_shapes)
        for flag, (name, shape) in ((flag, layer) for pair in pairs for flag, layer in zip(SIDES, pair)):
            if len(shape) != 3:
                raise KDError(f"ofd compares feature maps, but --{flag}_layers '{name}' gives shape {shape} per "
                              "sample, not (C, H, W): hook the stages before their ReLU (e.g. layer1.2.preact)")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise KDError(f"--loss_options ofd.kernel_size: an odd size of at least 1, got {kernel_size!r}")
        bns = teacher_batchnorms(teacher_network, teacher_bns, [t for _, t in pairs])
        self.teacher_bns, self.kernel_size = bn_names(teacher_bns), kernel_size
        self.connectors = nn.ModuleList(connector(s[0], t[0], kernel_size) for (_, s), (_, t) in pairs)
        for i, bn in enumerate(bns):  # fixed: the teacher is frozen (not saved: rebuilt from the teacher)
            self.register_buffer(f"margin{i}", bn_margins(bn), persistent=False)

    def margins(self) -> list[torch.Tensor]:
        return [getattr(self, f"margin{i}") for i in range(len(self.connectors))]

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                student_features: dict[str, torch.Tensor],
                teacher_features: dict[str, torch.Tensor]) -> torch.Tensor:
        pairs = feature_pairs(student_features, teacher_features)
        check_built("ofd", len(self.connectors), student_features)
        n, loss = len(pairs), student_logits.new_zeros(())
        for i, ((s_name, t_name), (s, t), head, margin) in enumerate(
                zip(zip(student_features, teacher_features), pairs, self.connectors, self.margins())):
            check_map_channels("ofd", "connector", (("student", s_name, s, head[0].in_channels),
                                                    ("teacher", t_name, t, head[0].out_channels)))
            source = head(s)
            target = nn.functional.adaptive_avg_pool2d(t, source.shape[-2:])
            loss = loss + partial_l2(source, target, margin) / 2 ** (n - i - 1)
        return loss
