"""FitNets' regressor: kd's connector by default, or the references' ConvReg (conv chosen by size, BN, ReLU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd.errors import KDError
from kd.losses import build_loss
from kd.losses.objective import Objective
from kd.train.distiller import Distiller


@pytest.mark.parametrize("student, teacher, conv, stride", [
    ((8, 16, 16), (12, 8, 8), nn.Conv2d, 2),  # twice the teacher's height: 3x3, stride 2
    ((8, 4, 4), (12, 8, 8), nn.ConvTranspose2d, 2),  # half: 4x4 transposed, stride 2
    ((8, 6, 6), (12, 4, 4), nn.Conv2d, 1),  # larger by 2: a 3x3 convolution, stride 1
    ((8, 8, 8), (8, 8, 8), nn.Conv2d, 1),  # the same shape: still a 1x1 convolution, BN and ReLU
])
def test_convreg_picks_the_references_convolution_and_the_loss_is_the_mse_after_it(student, teacher, conv, stride):
    torch.manual_seed(0)
    loss = build_loss("fitnets", regressor="convreg", student_shapes={"s": student},
                      teacher_shapes={"t": teacher}).double()
    regressor = loss.regressors[0]
    assert isinstance(regressor[0], conv) and regressor[0].stride == (stride, stride)
    assert isinstance(regressor[1], nn.BatchNorm2d) and isinstance(regressor[2], nn.ReLU) and not loss.connect
    f_s = torch.randn(3, *student, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(3, *teacher, dtype=torch.float64)
    value = loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3), student_features={"s": f_s},
                 teacher_features={"t": f_t})
    conv_layer, bn = regressor[0], regressor[1]
    out = conv_layer(f_s)  # BN in training mode: normalised by the batch's own statistics
    mean, var = out.mean((0, 2, 3), keepdim=True), out.var((0, 2, 3), unbiased=False, keepdim=True)
    scale, shift = bn.weight.view(1, -1, 1, 1), bn.bias.view(1, -1, 1, 1)
    mapped = torch.relu((out - mean) / torch.sqrt(var + bn.eps) * scale + shift)
    expected = ((mapped - f_t) ** 2).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    grad, = torch.autograd.grad(value, f_s)
    assert torch.allclose(grad, torch.autograd.grad(expected, f_s)[0], atol=1e-14)


def test_with_convreg_the_distiller_builds_no_connector_and_the_default_keeps_kds():
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.LazyLinear(5))
    teacher = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Flatten(), nn.LazyLinear(5))
    student(torch.zeros(1, 3, 8, 8)), teacher(torch.zeros(1, 3, 8, 8))
    shapes = ({"0": (4, 8, 8)}, {"0": (6, 8, 8)})
    for regressor, connectors in (("convreg", False), ("connector", True)):
        loss = build_loss("fitnets", regressor=regressor, student_shapes=shapes[0], teacher_shapes=shapes[1])
        distiller = Distiller(student, teacher=teacher, objective=Objective({"fitnets": loss}, {"fitnets": 1.0}, 1.0),
                              student_layers=["0"], teacher_layers=["0"], feature_shapes=shapes)
        assert (distiller.connectors is not None) is connectors
        distiller.step(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), torch.arange(2), 0).loss.backward()
        distiller.remove_hooks()


@pytest.mark.parametrize("options, message", [
    ({"regressor": "linear"}, "regressor is connector"),
    ({"regressor": "convreg", "student_shapes": {"s": (8,)}, "teacher_shapes": {"t": (8, 2, 2)}}, "4-D feature maps"),
    ({"regressor": "convreg", "student_shapes": {"s": (8, 3, 3)}, "teacher_shapes": {"t": (8, 5, 5)}}, "twice, half"),
])
def test_a_regressor_that_cannot_map_the_shapes_is_refused(options, message):
    with pytest.raises(KDError, match=message):
        build_loss("fitnets", **options)


def test_convreg_regresses_layers_whose_names_hold_dots():
    loss = build_loss("fitnets", regressor="convreg", student_shapes={"layer2.1": (4, 8, 8)},
                      teacher_shapes={"layer2.5": (6, 8, 8)})
    value = loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2),
                 student_features={"layer2.1": torch.randn(2, 4, 8, 8)},
                 teacher_features={"layer2.5": torch.randn(2, 6, 8, 8)})
    assert torch.isfinite(value)
