"""Losses with an init phase before distillation: flow of solution procedure (FSP), activation boundaries (AB) and
factor transfer (FT).

All three follow HobbitLong/RepDistiller (commit b84f547): ``distiller_zoo/FSP.py``, ``AB.py``, ``FT.py``, their
heads in ``models/util.py``, the init phase in ``helper/pretrain.py`` (``init()``) and the main phase in
``helper/loops.py`` and ``train_student.py`` (lines 227-262). Each takes ``init_epochs`` (RepDistiller's
``--init_epochs``, 30): the epochs of a stage before distillation that minimises :meth:`init_loss` alone, unweighted,
training the loss's :meth:`init_parameters` (and the student, for FSP and AB), at ``init_lr`` (None: --lr; RepDistiller
gives FT 0.01 with ResNet and WRN students) and a constant rate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.config import FLOAT32_MAX
from kd.losses.base import LOSSES, Range
from kd.losses.features import FeatureLoss, Shapes, check_built, feature_pairs, layer_pairs, pool_to_smaller
from kd.losses.hints import ConvReg
from kd.losses.transfer import check_features, check_layers, check_maps

Features = dict[str, torch.Tensor]


def check_init_epochs(loss: str, init_epochs: int, init_lr: float | None = None) -> int:
    """``init_epochs`` if it is a whole number of epochs, at least 0, and ``init_lr`` (the init phase's learning rate,
    read by the plan; None: --lr) a positive number or None; a ValueError otherwise."""
    if isinstance(init_epochs, bool) or not isinstance(init_epochs, int) or init_epochs < 0:
        raise ValueError(f"{loss}: init_epochs is a whole number of epochs >= 0, got {init_epochs!r}")
    if init_lr is not None and (isinstance(init_lr, bool) or not isinstance(init_lr, (int, float))
                                or not 0 < init_lr <= FLOAT32_MAX):
        raise ValueError(f"{loss}: init_lr is the init phase's learning rate, above 0 and at most {FLOAT32_MAX:.4g} "
                         f"(float32), got {init_lr!r}")
    return init_epochs


# ---- FSP ------------------------------------------------------------------------------------------------------


def fsp_matrix(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """The FSP matrix of two maps of one network: ``G[b, i, j]`` = mean over positions of bottom_i · top_j,
    (B, C_bottom, C_top), the larger map pooled to the smaller's size first."""
    bottom, top = pool_to_smaller(bottom, top)
    return torch.einsum("bihw,bjhw->bij", bottom, top) / (bottom.shape[2] * bottom.shape[3])


def fsp_distance(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Σ over consecutive layers of the mean squared difference between the student's and the teacher's FSP
    matrices."""
    return sum(((fsp_matrix(*student[i:i + 2]) - fsp_matrix(*teacher[i:i + 2])).pow(2).mean()
                for i in range(len(student) - 1)), student[0].new_zeros(()))


def check_fsp_channels(student: list[tuple[str, int]], teacher: list[tuple[str, int]]) -> None:
    """A ValueError naming both flags unless each (layer, channels) of the student has its teacher's channels."""
    for (s_name, s_c), (t_name, t_c) in zip(student, teacher):
        if s_c != t_c:
            raise ValueError(f"fsp compares FSP matrices entry by entry, so each of --student_layers needs as many "
                             f"channels as its pair in --teacher_layers, but student '{s_name}' has {s_c} and "
                             f"teacher '{t_name}' {t_c}")


@LOSSES.register("fsp")
class FlowOfSolutionProcedure(FeatureLoss):
    """Flow of solution procedure (Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network
    Minimization and Transfer Learning", CVPR 2017), as RepDistiller's ``FSP`` (``distiller_zoo/FSP.py``).

    Between each two consecutive hooked maps of a network, the FSP matrix ``G[i, j]`` = mean over positions of
    bottom_i · top_j (the larger map average-pooled to the smaller's size); the loss is the sum over consecutive pairs
    of the mean squared difference between the student's matrices and the teacher's. It needs at least two hooked
    layers a side, each with its teacher layer's channel count; RepDistiller hooks the stem and every stage
    (``feat[:-1]``: relu layer1 layer2 layer3 of a CIFAR ResNet).

    It is an init phase only: RepDistiller trains the student's feature layers on it for ``init_epochs`` (30), then
    distils with CE alone (``loss_kd = 0``, ``helper/loops.py`` line 176), so its weight is 0 and CE's 1 (its
    script's ``-b 50`` multiplies that 0); ``--kd_weights`` may weigh it into the main phase. RepDistiller pools by
    height to a square and forms ``G`` transposed (C_top, C_bottom); kd pools to the smaller height and width, the
    same on square maps, and the transpose leaves the loss as it is.
    """

    weight = 0.0
    init_trains_student = True
    space = {}  # weight 0 in the paper's main phase, and --tune refuses losses with an init phase

    def __init__(self, student_shapes: Shapes | None = None, teacher_shapes: Shapes | None = None,
                 init_epochs: int = 30, init_lr: float | None = None) -> None:
        super().__init__()
        check_layers("fsp", student_shapes, teacher_shapes, least=2)
        check_fsp_channels([(name, shape[0]) for name, shape in (student_shapes or {}).items()],
                           [(name, shape[0]) for name, shape in (teacher_shapes or {}).items()])
        self.init_epochs = check_init_epochs("fsp", init_epochs, init_lr)

    def init_loss(self, student_features: Features, teacher_features: Features) -> torch.Tensor:
        """The FSP distance that the init phase minimises."""
        check_features("fsp", student_features, teacher_features)
        pairs = feature_pairs(student_features, teacher_features)
        if len(pairs) < 2:
            raise ValueError("fsp relates consecutive layers: give at least two --student_layers and "
                             f"--teacher_layers, got {len(pairs)} pair")
        check_fsp_channels([(name, s.shape[1]) for name, (s, _) in zip(student_features, pairs)],
                           [(name, t.shape[1]) for name, (_, t) in zip(teacher_features, pairs)])
        return fsp_distance([s for s, _ in pairs], [t for _, t in pairs])

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                student_features: Features, teacher_features: Features) -> torch.Tensor:
        """The same loss as the init phase's, for ``--kd_weights`` to weigh into distillation."""
        return self.init_loss(student_features, teacher_features)


# ---- AB -------------------------------------------------------------------------------------------------------


def ab_connector(source: tuple[int, ...], target: tuple[int, ...]) -> nn.Module:
    """RepDistiller's AB connector for one pair: nothing where channels and height agree, else :class:`ConvReg`'s
    convolution and BN without its ReLU (a pre-ReLU map keeps its sign)."""
    if source[:2] == target[:2]:
        return nn.Identity()
    return nn.Sequential(*list(ConvReg(source, target))[:-1])  # (conv, BN, ReLU) less the ReLU: use_relu=False


def alternative_l2(source: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """The AB paper's alternative squared hinge, summed over all neurons: (s + m)² where the teacher's neuron is off
    (t <= 0) but s > -m, and (s - m)² where it is on (t > 0) but s <= m."""
    off, on = target <= 0, target > 0
    return ((source + margin).pow(2) * (off & (source > -margin)).to(source.dtype)
            + (source - margin).pow(2) * (on & (source <= margin)).to(source.dtype)).sum()


@LOSSES.register("ab")
class ActivationBoundaries(FeatureLoss):
    """Activation boundaries (Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by
    Hidden Neurons", AAAI 2019), as RepDistiller's ``ABLoss`` (``distiller_zoo/AB.py``) and ``Connector``
    (``models/util.py``, lines 65-90).

    It hooks pre-ReLU maps: RepDistiller's ``preact=True`` features of every stage (``feat[1:-1]``), in kd's CIFAR
    ResNets the taps ``layerN.K.preact`` of each stage's last block (``layer1.0.preact layer2.0.preact
    layer3.0.preact`` on resnet8x4). Each student map passes a connector (nothing where channels and height agree,
    else :class:`ConvReg` without ReLU) and is pushed to the teacher's side of each neuron's boundary by at least
    ``margin`` (1): the loss of layer i of n is ``2**(i - n + 1) · Σ alternative-L2 / B · 3 / 1000``, summed.

    It is an init phase only: RepDistiller trains the student's feature layers and the connectors on it for
    ``init_epochs`` (30), then distils with CE alone (``loss_kd = 0``, ``helper/loops.py`` line 173), so its weight
    is 0 and CE's 1 (its script's ``-b 1`` multiplies that 0); ``--kd_weights`` may weigh it into the main phase.
    The connectors train in the init phase only: RepDistiller leaves them out of the main phase's optimiser (and in
    eval mode there, where kd's BN runs in training mode: a difference only when the loss is weighed in).
    """

    weight = 0.0
    init_trains_student = True
    space = {}  # weight 0 in the paper's main phase, and --tune refuses losses with an init phase

    def __init__(self, student_shapes: Shapes, teacher_shapes: Shapes, margin: float = 1.0,
                 init_epochs: int = 30, init_lr: float | None = None) -> None:
        super().__init__()
        pairs = layer_pairs("ab", student_shapes, teacher_shapes)
        check_maps("ab", student_shapes, "student")
        check_maps("ab", teacher_shapes, "teacher")
        if margin < 0:
            raise ValueError(f"ab: margin must be >= 0, got {margin}")
        self.margin = float(margin)
        self.init_epochs = check_init_epochs("ab", init_epochs, init_lr)
        connectors = []
        for (s_name, s_shape), (t_name, t_shape) in pairs:
            try:
                connectors.append(ab_connector(s_shape, t_shape))
            except ValueError as exc:
                raise ValueError(f"ab: no connector maps --student_layers '{s_name}' {s_shape} onto --teacher_layers "
                                 f"'{t_name}' {t_shape}: {exc}") from None
        self.connectors = nn.ModuleList(connectors)
        self.layer_weights = [2.0 ** (i - len(pairs) + 1) for i in range(len(pairs))]

    def main_parameters(self) -> list[nn.Parameter]:
        """Nothing: the connectors stay as the init phase left them."""
        return []

    def init_loss(self, student_features: Features, teacher_features: Features) -> torch.Tensor:
        """The weighted alternative-L2 loss of the connected student maps that the init phase minimises."""
        check_features("ab", student_features, teacher_features)
        pairs = feature_pairs(student_features, teacher_features)
        check_built("ab", len(self.connectors), student_features)
        total = pairs[0][0].new_zeros(())
        for (s_name, t_name), (s, t), connector, w in zip(zip(student_features, teacher_features), pairs,
                                                          self.connectors, self.layer_weights):
            s = connector(s)
            if s.shape != t.shape:
                raise ValueError(f"ab compares neurons one by one, but --student_layers '{s_name}' connected gives "
                                 f"{tuple(s.shape)} and --teacher_layers '{t_name}' {tuple(t.shape)}")
            total = total + w * alternative_l2(s, t, self.margin) / len(s) * 3 / 1000
        return total

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                student_features: Features, teacher_features: Features) -> torch.Tensor:
        """The same loss as the init phase's, for ``--kd_weights`` to weigh into distillation."""
        return self.init_loss(student_features, teacher_features)


# ---- FT -------------------------------------------------------------------------------------------------------


def conv_stack(channels: list[int], conv: type[nn.Conv2d] | type[nn.ConvTranspose2d],
               batch_norm: bool) -> nn.Sequential:
    """3×3 stride-1 convolutions (size-preserving) through ``channels``, each followed by BN (if asked) and
    LeakyReLU(0.1), as RepDistiller's Paraphraser and Translator stack them."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels, channels[1:]):
        layers += [conv(c_in, c_out, 3, 1, 1), *([nn.BatchNorm2d(c_out)] if batch_norm else []), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """FT's autoencoder of the teacher's map (RepDistiller ``models/util.py``, lines 7-41, without BN): an encoder of
    three convolutions to ``factor_channels`` (the teacher's factor) and a decoder of three transposed ones back."""

    def __init__(self, channels: int, factor_channels: int) -> None:
        super().__init__()
        self.encoder = conv_stack([channels, channels, factor_channels, factor_channels], nn.Conv2d, False)
        self.decoder = conv_stack([factor_channels, factor_channels, channels, channels], nn.ConvTranspose2d, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``x``."""
        return self.decoder(self.encoder(x))


def factor(f: torch.Tensor, p1: int) -> torch.Tensor:
    """A map's factor as FT compares it: the channel mean of f**p1, flattened and L2-normalised, (B, H·W)."""
    return F.normalize(f.pow(p1).mean(1).flatten(1))


def factor_distance(student: torch.Tensor, teacher: torch.Tensor, p1: int, p2: int) -> torch.Tensor:
    """Mean |difference| (p2 = 1) or mean difference**p2 of the two factors, the larger map pooled first."""
    student, teacher = pool_to_smaller(student, teacher)
    difference = factor(student, p1) - factor(teacher, p1)
    return difference.abs().mean() if p2 == 1 else difference.pow(p2).mean()


@LOSSES.register("ft")
class FactorTransfer(FeatureLoss):
    """Factor transfer (Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer",
    NeurIPS 2018), as RepDistiller's ``FactorTransfer`` (``distiller_zoo/FT.py``) with its ``Paraphraser`` and
    ``Translator`` (``models/util.py``).

    One hooked layer pair (RepDistiller's ``feat[-2]``: layer3 of a CIFAR ResNet). The init phase trains a
    paraphraser (three convolutions to ``int(C_t · rate)`` channels, three transposed back; LeakyReLU 0.1, no BN) to
    reconstruct the teacher's map (mean squared error), for ``init_epochs`` (30), the student untouched. Distillation
    then trains a translator of the student's map (three convolutions to the same width, BN, LeakyReLU 0.1) with the
    student, the paraphraser frozen: the loss is ``mean |factor(translator(s)) − factor(encoder(t))|`` (p2 = 1), where
    ``factor(f)`` is the L2-normalised channel mean of ``f**p1`` (p1 = 2), the larger map pooled to the smaller's size.
    Weight 200, CE weight 1, no KL (``scripts/run_cifar_distill.sh``: ``-a 0 -b 200``).

    RepDistiller pools by height to a square; kd to the smaller height and width, the same on square maps. Its
    init phase trains at lr 0.01 for ResNet and WRN students (``helper/pretrain.py``, lines 21-25), which is the
    plumbing's affair, not the loss's.
    """

    weight = 200.0
    space = {"weight": Range(1.0, 1000.0, log=True), "ce_weight": FeatureLoss.ce_range}

    def __init__(self, student_shapes: Shapes, teacher_shapes: Shapes, rate: float = 0.5, p1: int = 2, p2: int = 1,
                 init_epochs: int = 30, init_lr: float | None = None) -> None:
        super().__init__()
        pairs = layer_pairs("ft", student_shapes, teacher_shapes)
        if len(pairs) != 1:
            raise ValueError(f"ft paraphrases one teacher layer: give one --student_layers and one --teacher_layers "
                             f"(RepDistiller's: the last stage, layer3), got {len(pairs)} pairs")
        check_maps("ft", student_shapes, "student")
        check_maps("ft", teacher_shapes, "teacher")
        (_, s_shape), (t_name, t_shape) = pairs[0]
        factor_channels = int(t_shape[0] * rate)
        if rate <= 0 or factor_channels < 1:
            raise ValueError(f"ft: rate {rate} of the {t_shape[0]} channels of --teacher_layers '{t_name}' leaves "
                             f"the factor {factor_channels} channels; it needs at least one")
        for name, value in (("p1", p1), ("p2", p2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ft: {name} is a whole power >= 1, got {value!r}")
        self.p1, self.p2 = p1, p2
        self.init_epochs = check_init_epochs("ft", init_epochs, init_lr)
        self.paraphraser = Paraphraser(t_shape[0], factor_channels)
        self.translator = conv_stack([s_shape[0], s_shape[0], factor_channels, factor_channels], nn.Conv2d, True)

    def init_parameters(self) -> list[nn.Parameter]:
        """The paraphraser's."""
        return list(self.paraphraser.parameters())

    def main_parameters(self) -> list[nn.Parameter]:
        """The translator's: the paraphraser stays as the init phase left it."""
        return list(self.translator.parameters())

    def _pair(self, student_features: Features, teacher_features: Features) -> tuple[torch.Tensor, torch.Tensor]:
        """The (student, detached teacher) maps, checked against the channels the heads were built for."""
        check_features("ft", student_features, teacher_features)
        pairs = feature_pairs(student_features, teacher_features)
        check_built("ft", 1, student_features)
        (s_name, t_name), (s, t) = (next(iter(student_features)), next(iter(teacher_features))), pairs[0]
        for flag, name, f, channels in (("--student_layers", s_name, s, self.translator[0].in_channels),
                                        ("--teacher_layers", t_name, t, self.paraphraser.encoder[0].in_channels)):
            if f.shape[1] != channels:
                raise ValueError(f"ft: {flag} '{name}' gives {tuple(f.shape)}, but ft was built for (B, {channels}, "
                                 "H, W) maps")
        return s, t

    def init_loss(self, student_features: Features, teacher_features: Features) -> torch.Tensor:
        """The paraphraser's reconstruction error of the teacher's map, which the init phase minimises."""
        _, t = self._pair(student_features, teacher_features)
        return F.mse_loss(self.paraphraser(t), t)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                student_features: Features, teacher_features: Features) -> torch.Tensor:
        """The factor transfer loss between the translated student map and the paraphrased teacher map."""
        s, t = self._pair(student_features, teacher_features)
        with torch.no_grad():  # the paraphraser is frozen after the init phase
            factor_t = self.paraphraser.encoder(t)
        return factor_distance(self.translator(s), factor_t, self.p1, self.p2)
