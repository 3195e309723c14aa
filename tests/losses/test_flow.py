"""Tests of FSP, AB and FT (kd/losses/flow.py): each init-phase and main-phase loss against RepDistiller's formula
(``distiller_zoo/FSP.py``, ``AB.py``, ``FT.py``, heads in ``models/util.py``) written out here in float64, value and
gradient, with the loss's own heads' weights; what each phase trains; real features of kd's CIFAR networks; and the
layers and settings each loss refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import hooked_features
from kd.losses.base import LOSSES, DistillationLoss
from kd.losses.features import FeatureLoss
from kd.losses.flow import ActivationBoundaries, FactorTransfer, FlowOfSolutionProcedure

B = 4
Maps = dict[str, torch.Tensor]


def rand(*shape: int, seed: int, grad: bool = False, scale: float = 1.0) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    return x.requires_grad_(grad)


def maps(shapes: dict[str, tuple[int, ...]], seed: int, grad: bool = False, scale: float = 1.0) -> Maps:
    return {name: rand(B, *shape, seed=seed + i, grad=grad, scale=scale)
            for i, (name, shape) in enumerate(shapes.items())}


def call(loss: nn.Module, student: Maps, teacher: Maps) -> torch.Tensor:
    logits = torch.zeros(B, 3, dtype=torch.float64)
    return loss(logits, logits, torch.zeros(B, dtype=torch.long), student_features=student, teacher_features=teacher)


def max_difference(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def pooled(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average over blocks down to ``size`` (the maps here shrink by whole factors)."""
    return F.avg_pool2d(x, (x.shape[2] // size[0], x.shape[3] // size[1])) if tuple(x.shape[2:]) != size else x


@pytest.mark.parametrize("name, cls, weight, trains_student", [("fsp", FlowOfSolutionProcedure, 0.0, True),
                                                               ("ab", ActivationBoundaries, 0.0, True),
                                                               ("ft", FactorTransfer, 200.0, False)])
def test_registered_with_repdistillers_defaults(name, cls, weight, trains_student):
    assert LOSSES.get(name) is cls and issubclass(cls, DistillationLoss)
    assert (cls.weight, cls.ce_weight, cls.features, cls.connect) == (weight, 1.0, True, False)
    assert cls.init_trains_student is trains_student and hasattr(cls, "init_loss")
    shapes = {"layer2": (8, 4, 4), "layer3": (8, 4, 4)} if name == "fsp" else {"layer3": (8, 4, 4)}
    assert cls(student_shapes=shapes, teacher_shapes=shapes).init_epochs == 30  # RepDistiller's --init_epochs
    assert cls.__doc__ and "RepDistiller" in cls.__doc__


def test_tune_spaces_hold_the_defaults():
    assert FlowOfSolutionProcedure.space == {} and ActivationBoundaries.space == {}
    assert FactorTransfer.space["ce_weight"] == FeatureLoss.ce_range
    assert FactorTransfer.space["weight"].low <= 200.0 <= FactorTransfer.space["weight"].high


# ---- fsp -------------------------------------------------------------------------------------------------------

# A stem and three stages, as RepDistiller hooks them (feat[:-1]); the teacher's maps larger at two places.
FSP_STUDENT = {"relu": (8, 8, 8), "layer1": (8, 8, 8), "layer2": (16, 4, 4), "layer3": (24, 2, 2)}
FSP_TEACHER = {"relu": (8, 16, 16), "layer1": (8, 8, 8), "layer2": (16, 8, 8), "layer3": (24, 2, 2)}


def fsp_reference(student: Maps, teacher: Maps) -> torch.Tensor:
    """Σ over consecutive maps of mean((G_s − G_t)²), G[b, i, j] = Σ_positions bottom_i · top_j / (H·W), the larger
    map of each two block-averaged to the smaller's size."""

    def gram(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        size = min(tuple(bottom.shape[2:]), tuple(top.shape[2:]))
        bottom, top = pooled(bottom, size), pooled(top, size)
        return bottom.flatten(2) @ top.flatten(2).transpose(1, 2) / (size[0] * size[1])

    s, t = list(student.values()), [f.detach() for f in teacher.values()]
    return sum((gram(s[i], s[i + 1]) - gram(t[i], t[i + 1])).pow(2).mean() for i in range(len(s) - 1))


@pytest.mark.parametrize("seed", [0, 10])
def test_fsp_equals_the_formula_in_value_and_gradient_in_both_phases(seed):
    loss = FlowOfSolutionProcedure(student_shapes=FSP_STUDENT, teacher_shapes=FSP_TEACHER)
    student, teacher = maps(FSP_STUDENT, seed, grad=True), maps(FSP_TEACHER, seed + 10)
    expected = fsp_reference(student, teacher)
    expected_grad = torch.autograd.grad(expected, list(student.values()))
    for value in (loss.init_loss(student, teacher), call(loss, student, teacher)):
        assert value.item() > 0 and abs(value.item() - expected.item()) < 1e-14
        assert max_difference(torch.autograd.grad(value, list(student.values())), expected_grad) < 1e-17


def test_fsp_of_a_student_equal_to_its_teacher_is_zero():
    teacher = maps(FSP_TEACHER, 20)
    student = {k: v.clone() for k, v in teacher.items()}
    assert FlowOfSolutionProcedure().init_loss(student, teacher).item() == 0.0


# ---- ab --------------------------------------------------------------------------------------------------------

# Pre-ReLU maps: equal shapes (no connector), a student map twice the teacher's height (3×3 stride-2 convolution),
# half its height (4×4 transposed convolution), two rows taller (3×3 convolution, no padding).
AB_STUDENT = {"l0": (6, 4, 4), "l1": (6, 8, 8), "l2": (8, 2, 2), "l3": (8, 6, 6)}
AB_TEACHER = {"l0": (6, 4, 4), "l1": (10, 4, 4), "l2": (12, 4, 4), "l3": (16, 4, 4)}


def connect_reference(x: torch.Tensor, source: tuple[int, ...], target: tuple[int, ...],
                      connector: nn.Module) -> torch.Tensor:
    """RepDistiller's Connector by hand, with ``connector``'s weights: the map as it is where channels and height
    agree, else ConvReg's convolution chosen by height, then training-mode BN (batch statistics), no ReLU."""
    if source[:2] == target[:2]:
        assert not list(connector.parameters())
        return x
    conv, bn = connector[0], connector[1]
    if source[1] == 2 * target[1]:
        x = F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)
    elif 2 * source[1] == target[1]:
        x = F.conv_transpose2d(x, conv.weight, conv.bias, stride=2, padding=1)
    else:
        x = F.conv2d(x, conv.weight, conv.bias)
    mean = x.mean((0, 2, 3), keepdim=True)
    variance = (x - mean).pow(2).mean((0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(variance + 1e-5) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def ab_reference(loss: ActivationBoundaries, student: Maps, teacher: Maps, margin: float = 1.0) -> torch.Tensor:
    """Σ_i 2^(i−n+1) · Σ [(s+m)² where s > −m and t ≤ 0, (s−m)² where s ≤ m and t > 0] / B · 3/1000, s connected."""
    total, n = torch.zeros((), dtype=torch.float64), len(student)
    for i, ((s_shape, t_shape), s, t) in enumerate(zip(zip(AB_STUDENT.values(), AB_TEACHER.values()),
                                                       student.values(), teacher.values())):
        s = connect_reference(s, s_shape, t_shape, loss.connectors[i])
        zero = torch.zeros_like(s)
        off = torch.where((s > -margin) & (t <= 0), (s + margin) ** 2, zero)
        on = torch.where((s <= margin) & (t > 0), (s - margin) ** 2, zero)
        total = total + 2.0 ** (i - n + 1) * (off + on).sum() / B * 3 / 1000
    return total


@pytest.mark.parametrize("seed", [0, 10])
def test_ab_equals_the_formula_in_value_and_gradient_in_both_phases(seed):
    torch.manual_seed(seed)
    loss = ActivationBoundaries(AB_STUDENT, AB_TEACHER).double()
    with torch.no_grad():  # BN affine away from (1, 0), the same in the loss and in the formula
        for bn in (m for m in loss.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    student, teacher = maps(AB_STUDENT, seed, grad=True, scale=1.5), maps(AB_TEACHER, seed + 10)
    trained = [*student.values(), *loss.init_parameters()]
    expected = ab_reference(loss, student, teacher)
    expected_grad = torch.autograd.grad(expected, trained)
    for value in (loss.init_loss(student, teacher), call(loss, student, teacher)):
        assert value.item() > 0 and abs(value.item() - expected.item()) < 1e-13
        assert max_difference(torch.autograd.grad(value, trained), expected_grad) < 1e-14


def test_ab_margin_and_connectors():
    loss = ActivationBoundaries(AB_STUDENT, AB_TEACHER, margin=0.5).double()
    assert loss.margin == 0.5 and loss.layer_weights == [0.125, 0.25, 0.5, 1.0]
    assert isinstance(loss.connectors[0], nn.Identity)
    assert [type(c[0]) for c in loss.connectors[1:]] == [nn.Conv2d, nn.ConvTranspose2d, nn.Conv2d]
    assert all(len(c) == 2 and isinstance(c[1], nn.BatchNorm2d) for c in loss.connectors[1:])  # no ReLU
    student, teacher = maps(AB_STUDENT, 30, grad=True), maps(AB_TEACHER, 40)
    assert abs(loss.init_loss(student, teacher).item() - ab_reference(loss, student, teacher, 0.5).item()) < 1e-13


def test_ab_trains_its_connectors_in_the_init_phase_only():
    loss = ActivationBoundaries(AB_STUDENT, AB_TEACHER)
    assert {id(p) for p in loss.init_parameters()} == {id(p) for p in loss.connectors.parameters()}
    assert loss.main_parameters() == []


# ---- ft --------------------------------------------------------------------------------------------------------


def conv_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]


def leaky(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x, 0.1 * x)


def paraphrase_reference(loss: FactorTransfer, t: torch.Tensor, decode: bool) -> torch.Tensor:
    """RepDistiller's Paraphraser (no BN) by hand with the loss's weights: three 3×3 convolutions, padding 1, each
    then LeakyReLU 0.1; with ``decode`` three 3×3 transposed ones after them."""
    convs = conv_layers(loss.paraphraser)
    for conv in convs[:3]:
        t = leaky(F.conv2d(t, conv.weight, conv.bias, padding=1))
    for conv in convs[3:] if decode else []:
        t = leaky(F.conv_transpose2d(t, conv.weight, conv.bias, padding=1))
    return t


def translate_reference(loss: FactorTransfer, s: torch.Tensor) -> torch.Tensor:
    """RepDistiller's Translator by hand: three 3×3 convolutions, padding 1, each then training-mode BN and LeakyReLU
    0.1."""
    bns = [m for m in loss.translator.modules() if isinstance(m, nn.BatchNorm2d)]
    for conv, bn in zip(conv_layers(loss.translator), bns, strict=True):
        s = F.conv2d(s, conv.weight, conv.bias, padding=1)
        mean = s.mean((0, 2, 3), keepdim=True)
        variance = (s - mean).pow(2).mean((0, 2, 3), keepdim=True)
        s = leaky((s - mean) / torch.sqrt(variance + 1e-5) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))
    return s


def factor_transfer_reference(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """mean |φ(f_s) − φ(f_t)|, φ(f) = v / ||v|| with v the flattened channel mean of f², the larger map pooled."""
    size = min(tuple(f_s.shape[2:]), tuple(f_t.shape[2:]))
    f_s, f_t = pooled(f_s, size), pooled(f_t, size)

    def phi(f: torch.Tensor) -> torch.Tensor:
        v = (f ** 2).mean(1).reshape(len(f), -1)
        return v / v.norm(dim=1, keepdim=True)

    return (phi(f_s) - phi(f_t)).abs().mean()


FT_CASES = [((16, 8, 8), (24, 4, 4)), ((12, 4, 4), (20, 4, 4)), ((8, 2, 2), (16, 4, 4))]


@pytest.mark.parametrize("seed, shapes", list(enumerate(FT_CASES)))
def test_ft_equals_the_formula_in_value_and_gradient_in_both_phases(seed, shapes):
    s_shape, t_shape = shapes
    torch.manual_seed(seed)
    loss = FactorTransfer({"s": s_shape}, {"t": t_shape}).double()
    student, teacher = maps({"s": s_shape}, seed, grad=True), maps({"t": t_shape}, seed + 10)
    s, t = student["s"], teacher["t"].relu()
    teacher = {"t": t}
    # init phase: the paraphraser reconstructs the teacher's map
    value = loss.init_loss(student, teacher)
    expected = (paraphrase_reference(loss, t, decode=True) - t).pow(2).mean()
    assert value.item() > 0 and abs(value.item() - expected.item()) < 1e-15
    params = loss.init_parameters()
    assert max_difference(torch.autograd.grad(value, params), torch.autograd.grad(expected, params)) < 1e-15
    # main phase: the translated student map against the paraphrased teacher map
    value = call(loss, student, teacher)
    expected = factor_transfer_reference(translate_reference(loss, s), paraphrase_reference(loss, t, decode=False))
    assert value.item() > 0 and abs(value.item() - expected.item()) < 1e-15
    trained = [s, *loss.main_parameters()]
    assert max_difference(torch.autograd.grad(value, trained), torch.autograd.grad(expected, trained)) < 1e-15


def test_ft_heads_and_what_each_phase_trains():
    loss = FactorTransfer({"s": (12, 4, 4)}, {"t": (20, 4, 4)})
    channels = [(c.in_channels, c.out_channels) for c in conv_layers(loss.paraphraser)]
    assert channels == [(20, 20), (20, 10), (10, 10), (10, 10), (10, 20), (20, 20)]
    assert [(c.in_channels, c.out_channels) for c in conv_layers(loss.translator)] == [(12, 12), (12, 10), (10, 10)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loss.paraphraser.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in loss.translator.modules()) == 3
    assert all(m.negative_slope == 0.1 for m in loss.modules() if isinstance(m, nn.LeakyReLU))
    init, main = loss.init_parameters(), loss.main_parameters()
    assert [id(p) for p in init] == [id(p) for p in loss.paraphraser.parameters()]
    assert [id(p) for p in main] == [id(p) for p in loss.translator.parameters()]
    assert len(init) + len(main) == len(list(loss.parameters()))
    assert (loss.p1, loss.p2, int(20 * 0.5)) == (2, 1, channels[1][1])


def test_ft_main_phase_leaves_the_paraphraser_without_gradient():
    loss = FactorTransfer({"s": (8, 4, 4)}, {"t": (8, 4, 4)}).double()
    call(loss, maps({"s": (8, 4, 4)}, 0, grad=True), maps({"t": (8, 4, 4)}, 1)).backward()
    assert all(p.grad is None for p in loss.paraphraser.parameters())
    assert all(p.grad is not None for p in loss.translator.parameters())


def test_ft_p2_other_than_one_is_a_power():
    loss = FactorTransfer({"s": (8, 4, 4)}, {"t": (8, 4, 4)}, p1=1, p2=2).double()
    student, teacher = maps({"s": (8, 4, 4)}, 2), maps({"t": (8, 4, 4)}, 3)
    with torch.no_grad():
        f_s, f_t = loss.translator(student["s"]), loss.paraphraser.encoder(teacher["t"])
    phi_s, phi_t = (F.normalize(f.mean(1).flatten(1)) for f in (f_s, f_t))
    assert abs(call(loss, student, teacher).item() - (phi_s - phi_t).pow(2).mean().item()) < 1e-15


# ---- real features ---------------------------------------------------------------------------------------------




@pytest.mark.parametrize("cls, student_layers, teacher_layers", [
    (FlowOfSolutionProcedure, ["relu", "layer1", "layer2", "layer3"], ["relu", "layer1", "layer2", "layer3"]),
    (ActivationBoundaries, ["layer1.0.preact", "layer2.0.preact", "layer3.0.preact"],
     ["layer1.4.preact", "layer2.4.preact", "layer3.4.preact"]),
    (FactorTransfer, ["layer3"], ["layer3"]),
])
def test_resnet8x4_from_resnet32x4_gives_finite_losses_and_gradients(cls, student_layers, teacher_layers, one_thread):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    student = hooked_features("cifar:resnet8x4", student_layers, images)
    with torch.no_grad():
        teacher = hooked_features("cifar:resnet32x4", teacher_layers, images)
    loss = cls(student_shapes={k: tuple(v.shape[1:]) for k, v in student.items()},
               teacher_shapes={k: tuple(v.shape[1:]) for k, v in teacher.items()})
    init = loss.init_loss(student, teacher)
    logits = torch.zeros(2, 100)
    main = loss(logits, logits, torch.zeros(2, dtype=torch.long), student_features=student, teacher_features=teacher)
    for value in (init, main):
        assert value.shape == () and torch.isfinite(value) and value.item() > 0
    trained = [*student.values()] if loss.init_trains_student else loss.init_parameters()
    gradients = torch.autograd.grad(init, trained, retain_graph=True)  # the two share the student's graph
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in gradients)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in torch.autograd.grad(main, list(student.values())))


# ---- refusals --------------------------------------------------------------------------------------------------

MAP, VECTOR = (8, 4, 4), (64,)


@pytest.mark.parametrize("cls, student_shapes, teacher_shapes, parts", [
    (FlowOfSolutionProcedure, {"layer3": MAP}, {"layer3": MAP}, ["at least 2", "--student_layers", "--teacher_layers"]),
    (FlowOfSolutionProcedure, {"a": MAP, "b": (16, 4, 4)}, {"a": MAP, "c": (32, 4, 4)},
     ["--student_layers", "--teacher_layers", "'b' has 16", "'c' 32"]),
    (FactorTransfer, {"a": MAP, "b": MAP}, {"a": MAP, "b": MAP}, ["one --student_layers", "--teacher_layers", "2"]),
    (ActivationBoundaries, {"a": MAP, "b": MAP}, {"a": MAP}, ["--student_layers", "--teacher_layers", "2 student",
                                                              "1 teacher"]),
    (ActivationBoundaries, {}, {}, ["--student_layers", "--teacher_layers"]),
    (FlowOfSolutionProcedure, {"a": MAP, "avgpool": VECTOR}, {"a": MAP, "b": MAP}, ["--student_layers", "'avgpool'"]),
    (ActivationBoundaries, {"a": MAP}, {"fc": VECTOR}, ["--teacher_layers", "'fc'", "4-D"]),
    (FactorTransfer, {"avgpool": VECTOR}, {"a": MAP}, ["--student_layers", "'avgpool'", "4-D"]),
    (ActivationBoundaries, {"a": (8, 2, 2)}, {"b": (8, 6, 6)}, ["--student_layers 'a'", "--teacher_layers 'b'"]),
    (FactorTransfer, {"a": MAP}, {"b": (1, 4, 4)}, ["--teacher_layers 'b'", "rate"]),
])
def test_each_loss_refuses_layers_it_cannot_use(cls, student_shapes, teacher_shapes, parts):
    with pytest.raises(ValueError) as info:
        cls(student_shapes=student_shapes, teacher_shapes=teacher_shapes)
    assert all(part in str(info.value) for part in parts), str(info.value)


@pytest.mark.parametrize("cls", [FlowOfSolutionProcedure, ActivationBoundaries, FactorTransfer])
@pytest.mark.parametrize("init_epochs", [-1, 2.5, True, "30"])
def test_init_epochs_is_a_whole_number_of_epochs(cls, init_epochs):
    shapes = {"a": MAP, "b": MAP} if cls is FlowOfSolutionProcedure else {"a": MAP}
    with pytest.raises(ValueError, match="init_epochs"):
        cls(student_shapes=shapes, teacher_shapes=shapes, init_epochs=init_epochs)
    assert cls(student_shapes=shapes, teacher_shapes=shapes, init_epochs=0).init_epochs == 0


def test_features_it_cannot_use_are_refused_when_called():
    fsp = FlowOfSolutionProcedure()
    with pytest.raises(ValueError, match="at least two --student_layers"):
        fsp.init_loss({"a": rand(B, *MAP, seed=0)}, {"b": rand(B, *MAP, seed=1)})
    with pytest.raises(ValueError, match="--teacher_layers names 'v'"):
        call(fsp, {"a": rand(B, *MAP, seed=0), "b": rand(B, *MAP, seed=1)}, {"u": rand(B, *MAP, seed=2),
                                                                             "v": rand(B, 8, seed=3)})
    with pytest.raises(ValueError, match="'b' has 8 and teacher 'v' 4"):
        fsp.init_loss({"a": rand(B, *MAP, seed=0), "b": rand(B, *MAP, seed=1)},
                      {"u": rand(B, *MAP, seed=2), "v": rand(B, 4, 4, 4, seed=3)})
    ft = FactorTransfer({"s": MAP}, {"t": MAP}).double()
    with pytest.raises(ValueError, match="--teacher_layers 't'"):
        ft.init_loss({"s": rand(B, *MAP, seed=0)}, {"t": rand(B, 4, 4, 4, seed=1)})
    ab = ActivationBoundaries({"s": MAP}, {"t": MAP}).double()
    with pytest.raises(ValueError, match="--student_layers 's' connected gives"):
        ab.init_loss({"s": rand(B, 8, 2, 2, seed=0)}, {"t": rand(B, *MAP, seed=1)})
