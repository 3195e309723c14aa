"""Tests of OFD (kd/losses/overhaul.py) against mdistiller's ``OFD.py`` formula, computed independently in float64:
the margins by hand with scipy's normal distribution, the loss in the paper's clamped form ``(s - max(t, m))^2`` kept
where ``s > max(t, m)`` or ``t > 0``, with the connector's conv and BN and the pooling written out; value and gradient
(autograd through that independent computation) w.r.t. the student's features and the connectors. Plus real CIFAR
features hooked at ``layerN.K.preact``, the setting's forms and the refusals."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm
from torch import nn

import kd.losses.overhaul  # noqa: F401 - registers ofd
from kd.errors import KDError
from kd.losses.base import LOSSES, DistillationLoss, build_loss, loss_property
from kd.losses.options import parse_loss_options
from kd.losses.overhaul import OverhaulFeatureDistillation, bn_names, gaussian_margin
from kd.models.build import build_model
from kd.train.hooks import FeatureHooks, feature_shapes


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


class Teacher(nn.Module):
    """A stand-in teacher holding BatchNorms (float64) with drawn weights and biases, and a conv that is not one."""

    def __init__(self, channels: tuple[int, ...], seed: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in channels).double()
        with torch.no_grad():
            for i, bn in enumerate(self.bns):
                bn.weight.copy_(rand(bn.num_features, seed=seed + 10 * i, scale=0.8))
                bn.bias.copy_(rand(bn.num_features, seed=seed + 10 * i + 1, scale=1.5))


# Student (C, H, W) and teacher maps: channels differ, the teacher's first map twice the student's size (pooled).
STUDENT = {"s1": (3, 4, 4), "s2": (5, 2, 2), "s3": (4, 2, 2)}
TEACHER = {"t1": (6, 8, 8), "t2": (4, 2, 2), "t3": (7, 2, 2)}
BNS = "bns.0,bns.1,bns.2"


def ofd(teacher: nn.Module | None = None, teacher_bns=BNS, **settings) -> OverhaulFeatureDistillation:
    teacher = Teacher(tuple(shape[0] for shape in TEACHER.values())) if teacher is None else teacher
    return build_loss("ofd", student_shapes=STUDENT, teacher_shapes=TEACHER, teacher_network=teacher,
                      teacher_bns=teacher_bns, **settings)


def call(loss, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    batch = len(next(iter(student.values())))
    logits = torch.zeros(batch, 3, dtype=torch.float64)
    return loss(logits, logits, torch.zeros(batch, dtype=torch.long), student_features=student,
                teacher_features=teacher)


def hand_margin(gamma: float, beta: float) -> float:
    """mdistiller's get_margin_from_BN for one channel, with scipy's normal pdf and cdf."""
    s, m = abs(gamma), beta
    if norm.cdf(-m / s) > 0.001:
        return -s * norm.pdf(m / s) / norm.cdf(-m / s) + m
    return -3 * s


def reference(loss: OverhaulFeatureDistillation, teacher: Teacher, student: dict[str, torch.Tensor],
              teacher_maps: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss as the paper writes it, each step by hand: conv as a channel contraction, BN with the batch's
    (biased) statistics, the teacher's map average-pooled by blocks, the target clamped to the margin."""
    n, total = len(student), torch.zeros((), dtype=torch.float64)
    for i, (s, t, head, bn) in enumerate(zip(student.values(), teacher_maps.values(), loss.connectors, teacher.bns)):
        conv, norm_layer = head
        y = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], s)
        mean, var = y.mean(dim=(0, 2, 3), keepdim=True), y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        y = (y - mean) / torch.sqrt(var + norm_layer.eps) * norm_layer.weight.view(1, -1, 1, 1) \
            + norm_layer.bias.view(1, -1, 1, 1)
        b, c, h, w = t.shape
        k = h // y.shape[2]
        t = t.reshape(b, c, h // k, k, w // k, k).mean(dim=(3, 5))
        margin = torch.tensor([hand_margin(g, m) for g, m in zip(bn.weight.tolist(), bn.bias.tolist())],
                              dtype=torch.float64).view(1, -1, 1, 1)
        target = torch.maximum(t, margin)
        kept = (y > target) | (target > 0)
        total = total + ((y - target) ** 2 * kept).sum() / b / 2 ** (n - 1 - i)
    return total


def test_registered_with_mdistillers_defaults() -> None:
    cls = OverhaulFeatureDistillation
    assert LOSSES.get("ofd") is cls and issubclass(cls, DistillationLoss)
    assert (cls.weight, cls.ce_weight, cls.features, cls.connect) == (0.001, 1.0, True, False)
    assert loss_property(cls, "needs_teacher") and set(cls.space) == {"weight", "ce_weight"}
    assert cls.space["weight"].low <= cls.weight <= cls.space["weight"].high
    assert cls.__doc__ and "2019" in cls.__doc__


def test_the_margin_is_the_mean_of_the_negative_part_of_the_bns_gaussian() -> None:
    assert gaussian_margin(1.0, 0.0) == pytest.approx(-2 / math.sqrt(2 * math.pi), rel=1e-15)  # -0.7978845608
    assert gaussian_margin(-2.0, 0.0) == pytest.approx(-4 / math.sqrt(2 * math.pi), rel=1e-15)  # |γ|
    assert gaussian_margin(1.0, 4.0) == -3.0  # Φ(-4) = 3.2e-5 <= 0.001: -3s
    assert gaussian_margin(0.5, 1.5) == pytest.approx(0.5 * -math.exp(-4.5) / math.sqrt(2 * math.pi)
                                                      / (0.5 * math.erfc(3 / math.sqrt(2))) + 1.5, rel=1e-13)
    assert (gaussian_margin(0.0, 2.0), gaussian_margin(0.0, -2.0)) == (0.0, -2.0)  # γ = 0: the limit min(β, 0)
    for gamma, beta in [(0.3, -1.0), (1.7, 0.4), (0.2, 0.6), (2.0, -5.0), (-0.9, 2.5)]:
        assert gaussian_margin(gamma, beta) == pytest.approx(hand_margin(gamma, beta), rel=1e-12, abs=1e-14)
        assert gaussian_margin(gamma, beta) < 0


def test_the_connectors_are_mdistillers() -> None:
    torch.manual_seed(0)
    loss = build_loss("ofd", student_shapes={"s": (64, 4, 4)}, teacher_shapes={"t": (256, 4, 4)},
                      teacher_network=Teacher((256,)), teacher_bns="bns.0")
    conv, bn = loss.connectors[0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding, conv.bias) == (64, 256, (1, 1),
                                                                                               (0, 0), None)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.03)
    assert bool((bn.weight == 1).all() and (bn.bias == 0).all()) and isinstance(bn, nn.BatchNorm2d)
    wide = build_loss("ofd", student_shapes={"s": (64, 4, 4)}, teacher_shapes={"t": (256, 4, 4)},
                      teacher_network=Teacher((256,)), teacher_bns=["bns.0"], kernel_size=3)
    assert (wide.connectors[0][0].kernel_size, wide.connectors[0][0].padding) == ((3, 3), (1, 1))
    assert wide.connectors[0][0].weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 256)), rel=0.03)


@pytest.mark.parametrize("batch, spread", [(2, 1.0), (5, 0.3), (4, 3.0)])
def test_equals_mdistillers_formula_value_and_gradient(batch: int, spread: float) -> None:
    torch.manual_seed(batch)
    teacher = Teacher(tuple(shape[0] for shape in TEACHER.values()), seed=batch)
    loss = ofd(teacher).double()
    with torch.no_grad():  # connectors' BNs away from their initial weight 1, bias 0
        for head in loss.connectors:
            head[1].weight.copy_(1 + 0.2 * torch.randn_like(head[1].weight))
            head[1].bias.copy_(0.3 * torch.randn_like(head[1].bias))
    for margin, bn in zip(loss.margins(), teacher.bns):
        expected = [hand_margin(g, m) for g, m in zip(bn.weight.tolist(), bn.bias.tolist())]
        assert margin.dtype == torch.float64 and margin.shape == (1, bn.num_features, 1, 1)
        assert torch.allclose(margin.flatten(), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    student = {k: rand(batch, *shape, seed=i, scale=spread).requires_grad_() for i, (k, shape) in
               enumerate(STUDENT.items())}
    teacher_maps = {k: rand(batch, *shape, seed=10 + i, scale=spread) for i, (k, shape) in enumerate(TEACHER.items())}
    value = call(loss, student, teacher_maps)
    params = list(loss.parameters())
    grads = torch.autograd.grad(value, [*student.values(), *params])
    expected = reference(loss, teacher, student, teacher_maps)
    expected_grads = torch.autograd.grad(expected, [*student.values(), *params])
    assert value.item() > 0 and torch.allclose(value, expected, rtol=1e-12, atol=0)
    for got, want in zip(grads, expected_grads):
        assert want.abs().sum() > 0 and torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_a_student_below_the_margin_where_the_teacher_is_cut_costs_nothing() -> None:
    loss = ofd().double().eval()  # eval: the connectors' BN is the identity at its initial statistics
    for margin, head in zip(loss.margins(), loss.connectors):
        nn.init.zeros_(head[0].weight)
        with torch.no_grad():
            head[1].bias.copy_(margin.flatten() - 0.01)  # the student at just below each channel's margin
    student = {k: rand(2, *shape, seed=i) for i, (k, shape) in enumerate(STUDENT.items())}
    cut = {k: -5 - rand(2, *shape, seed=9 + i).abs() for i, (k, shape) in enumerate(TEACHER.items())}
    assert call(loss, student, cut).item() == 0
    positive = {k: t.abs() + 0.1 for k, t in cut.items()}
    assert call(loss, student, positive).item() > 0


def test_the_setting_takes_a_list_or_names_split_on_commas_or_plus_signs() -> None:
    own, _ = parse_loss_options(["ofd.teacher_bns=layer1.8.bn2,layer2.8.bn2"], ["ofd"])
    assert bn_names(own["ofd"]["teacher_bns"]) == ["layer1.8.bn2", "layer2.8.bn2"]
    own, _ = parse_loss_options(["ofd.teacher_bns=[layer1.8.bn2, layer2.8.bn2]"], ["ofd"])
    assert own["ofd"]["teacher_bns"] == ["layer1.8.bn2", "layer2.8.bn2"]
    assert bn_names("layer1.8.bn2+layer2.8.bn2") == ["layer1.8.bn2", "layer2.8.bn2"] == bn_names(("layer1.8.bn2",
                                                                                                  "layer2.8.bn2"))
    first, second = ofd(teacher_bns=BNS), ofd(teacher_bns=BNS.split(","))
    assert all(torch.equal(a, b) for a, b in zip(first.margins(), second.margins()))
    assert first.teacher_bns == ["bns.0", "bns.1", "bns.2"]


def test_on_cifar_resnets_hooked_before_the_relu_the_loss_takes_a_step(one_thread) -> None:
    torch.manual_seed(0)
    student, teacher = build_model("cifar:resnet20", 100), build_model("cifar:resnet56", 100).eval()
    with torch.no_grad():  # a trained teacher's BNs: weights and biases away from 1 and 0
        for module in teacher.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.2, 1.5)
                module.bias.normal_(0, 0.5)
    s_layers = ["layer1.2.preact", "layer2.2.preact", "layer3.2.preact"]
    t_layers = ["layer1.8.preact", "layer2.8.preact", "layer3.8.preact"]
    bns = "layer1.8.bn2,layer2.8.bn2,layer3.8.bn2"
    loss = build_loss("ofd", student_shapes=feature_shapes(student, s_layers, 32, "--student_layers"),
                      teacher_shapes=feature_shapes(teacher, t_layers, 32, "--teacher_layers"), teacher_network=teacher,
                      teacher_bns=bns, num_classes=100)
    for margin, name in zip(loss.margins(), bns.split(",")):
        bn = teacher.get_submodule(name)
        expected = torch.tensor([hand_margin(g, m) for g, m in zip(bn.weight.tolist(), bn.bias.tolist())],
                                dtype=torch.float32)
        assert margin.dtype == torch.float32 and torch.allclose(margin.flatten(), expected, rtol=1e-6)
        assert bool((margin < 0).all())
    s_hooks, t_hooks = FeatureHooks(student, s_layers, "--student_layers"), FeatureHooks(teacher, t_layers, "t")
    optimiser = torch.optim.SGD([*student.parameters(), *loss.parameters()], lr=0.05)
    images = torch.randn(4, 3, 32, 32)
    values = []
    for _ in range(2):
        logits = student(images)
        with torch.no_grad():
            teacher_logits = teacher(images)
        s_features, t_features = s_hooks.take(), t_hooks.take()
        assert bool((t_features["layer1.8.preact"] < 0).any())  # before the ReLU
        value = loss(logits, teacher_logits, torch.zeros(4, dtype=torch.long), student_features=s_features,
                     teacher_features=t_features)
        optimiser.zero_grad()
        value.backward()
        values.append(value.item())
        for name, parameter in [*student.named_parameters(), *loss.named_parameters()]:
            assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name
        assert student.conv1.weight.grad.abs().sum() > 0
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())
        optimiser.step()
    assert all(math.isfinite(v) and v > 0 for v in values) and values[1] != values[0]
    s_hooks.remove()
    t_hooks.remove()


def test_refuses_without_the_teacher_network() -> None:
    with pytest.raises(KDError) as error:
        build_loss("ofd", student_shapes=STUDENT, teacher_shapes=TEACHER, teacher_network=None, teacher_bns=BNS)
    assert "needs the teacher network loaded" in str(error.value) and "cache" in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("bns, message", [
    (None, r"--loss_options ofd\.teacher_bns: name the teacher BatchNorm .* 3 --teacher_layers \(t1, t2, t3\).*got 0"),
    ("bns.0,bns.1", r"--loss_options ofd\.teacher_bns: .*got 2; Teacher's BatchNorms: bns\.0, bns\.1, bns\.2"),
    ("bns.0,conv,bns.2", r"--loss_options ofd\.teacher_bns: 'conv' is a Conv2d, not an affine BatchNorm of the "
                         r"teacher; Teacher's BatchNorms: bns\.0, bns\.1, bns\.2"),
    ("bns.0,bns.9,bns.2", r"'bns\.9' is no such module of the teacher; Teacher's BatchNorms: bns\.0"),
    ("bns.0,bns.2,bns.1", r"'bns\.2' has 7 channels but --teacher_layers 't2' gives \(4, 2, 2\)"),
    (3, r"--loss_options ofd\.teacher_bns: expected teacher module names"),
])
def test_refuses_missing_or_wrong_batchnorms(bns, message) -> None:
    with pytest.raises(KDError, match=message):
        ofd(teacher_bns=bns)


def test_refuses_vectors_and_odd_kernel_sizes() -> None:
    teacher = Teacher((6,))
    with pytest.raises(KDError, match=r"--student_layers 'avgpool' gives shape \(64,\) per sample, not \(C, H, W\)"):
        build_loss("ofd", student_shapes={"avgpool": (64,)}, teacher_shapes={"t": (6, 2, 2)}, teacher_network=teacher,
                   teacher_bns="bns.0")
    with pytest.raises(KDError, match=r"ofd\.kernel_size: an odd size"):
        build_loss("ofd", student_shapes={"s": (3, 2, 2)}, teacher_shapes={"t": (6, 2, 2)}, teacher_network=teacher,
                   teacher_bns="bns.0", kernel_size=2)
