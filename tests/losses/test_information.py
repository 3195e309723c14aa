"""Tests of the losses with their own trained heads (kd/losses/information.py): CC and VID, each against its reference
formula (RepDistiller's ``distiller_zoo/CC.py`` and ``distiller_zoo/VID.py``) computed independently in float64 with
numpy, value and gradient (the gradient derived by hand), at the references' defaults; plus real CIFAR features and
the layers each loss refuses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kd.errors import KDError
from kd.losses.base import LOSSES, DistillationLoss, build_loss, loss_property
from kd.losses.information import CorrelationCongruence, VariationalInformationDistillation
from kd.models.build import build_model
from kd.train.hooks import FeatureHooks, feature_shapes


def rand(*shape: int, seed: int, scale: float = 1.0, relu: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    return x.clamp(min=0) if relu else x


def features(shapes: dict[str, tuple[int, ...]], batch: int, seed: int, **kwargs) -> dict[str, torch.Tensor]:
    return {name: rand(batch, *shape, seed=seed + i, **kwargs) for i, (name, shape) in enumerate(shapes.items())}


def call(loss, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    batch = len(next(iter(student.values())))
    logits = torch.zeros(batch, 3, dtype=torch.float64)
    return loss(logits, logits, torch.zeros(batch, dtype=torch.long), student_features=student,
                teacher_features=teacher)


def numpy_of(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float64)


@pytest.mark.parametrize("name, cls, weight, space", [
    ("cc", CorrelationCongruence, 0.02, {"weight", "ce_weight"}),
    ("vid", VariationalInformationDistillation, 1.0, {"weight", "ce_weight", "init_pred_var"}),
])
def test_registered_with_the_references_defaults(name, cls, weight, space) -> None:
    assert LOSSES.get(name) is cls and issubclass(cls, DistillationLoss)
    assert (cls.weight, cls.ce_weight, cls.features, cls.connect) == (weight, 1.0, True, False)
    assert loss_property(cls, "needs_teacher") and set(cls.space) == space
    assert cls.space["weight"].low <= weight <= cls.space["weight"].high
    assert cls.__doc__ and "2019" in cls.__doc__


# ---- cc --------------------------------------------------------------------------------------------------------

# resnet32x4 -> ShuffleV2 as the preset hooks it (bn2 map vs avgpool vector), and resnet32x4 -> resnet8x4's avgpool.
CC_STUDENT = {"bn2": (1024, 4, 4), "avgpool": (256, 1, 1)}
CC_TEACHER = {"avgpool": (256, 1, 1), "avgpool2": (256, 1, 1)}


def cc_reference(loss: CorrelationCongruence, student: dict[str, torch.Tensor],
                 teacher: dict[str, torch.Tensor]) -> tuple[float, list[np.ndarray], list[np.ndarray]]:
    """CC summed over pairs, its gradient w.r.t. each student feature and each student embedding's weight.

    Per pair, e = f W^T + b, d = e_s - e_t, L = 1/(B-1) Σ_i Σ_k |d_ik| |d_(i+1)k|, so
    dL/de_s[i, k] = sign(d_ik) (|d_(i-1)k| + |d_(i+1)k|) / (B-1) (a missing neighbour counts 0).
    """
    value, grads, weight_grads = 0.0, [], []
    for (s, t), head_s, head_t in zip(zip(student.values(), teacher.values()), loss.embed_s, loss.embed_t):
        fs, ft = numpy_of(s).reshape(len(s), -1), numpy_of(t).reshape(len(t), -1)
        ws, bs = numpy_of(head_s.linear.weight), numpy_of(head_s.linear.bias)
        wt, bt = numpy_of(head_t.linear.weight), numpy_of(head_t.linear.bias)
        d = (fs @ ws.T + bs) - (ft @ wt.T + bt)
        n = len(d)
        value += sum(float(np.dot(np.abs(d[i]), np.abs(d[i + 1]))) for i in range(n - 1)) / (n - 1)
        neighbours = np.zeros_like(d)
        neighbours[1:] += np.abs(d[:-1])
        neighbours[:-1] += np.abs(d[1:])
        g_e = np.sign(d) * neighbours / (n - 1)
        grads.append((g_e @ ws).reshape(s.shape))
        weight_grads.append(g_e.T @ fs)
    return value, grads, weight_grads


@pytest.mark.parametrize("batch", [2, 3, 16])
def test_cc_equals_repdistillers_formula_value_and_gradient(batch: int) -> None:
    torch.manual_seed(batch)
    loss = build_loss("cc", student_shapes=CC_STUDENT, teacher_shapes=CC_TEACHER).double()
    assert loss.feat_dim == 128 and [e.linear.out_features for e in (*loss.embed_s, *loss.embed_t)] == [128] * 4
    student = {k: v.requires_grad_() for k, v in features(CC_STUDENT, batch, seed=10, scale=2.0).items()}
    teacher = features(CC_TEACHER, batch, seed=20, scale=3.0)
    value = call(loss, student, teacher)
    value.backward()
    expected, grads, weight_grads = cc_reference(loss, student, teacher)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    for s, g in zip(student.values(), grads):
        np.testing.assert_allclose(s.grad.numpy(), g, rtol=1e-10, atol=1e-12 * np.abs(g).max())
    for head, g in zip(loss.embed_s, weight_grads):
        np.testing.assert_allclose(head.linear.weight.grad.numpy(), g, rtol=1e-10, atol=1e-12 * np.abs(g).max())
    for head in loss.embed_t:  # the teacher's heads are trained too, as RepDistiller's trainable_list does
        assert head.linear.weight.grad is not None and head.linear.weight.grad.abs().sum() > 0


def test_cc_of_a_single_sample_is_zero_not_nan() -> None:
    loss = build_loss("cc", student_shapes={"a": (8,)}, teacher_shapes={"b": (4,)}).double()
    student = {"a": rand(1, 8, seed=0).requires_grad_()}
    value = call(loss, student, {"b": rand(1, 4, seed=1)})
    value.backward()
    assert value.item() == 0.0 and torch.equal(student["a"].grad, torch.zeros(1, 8, dtype=torch.float64))


# ---- vid -------------------------------------------------------------------------------------------------------

# resnet32x4 -> ShuffleV2 (the teacher's maps twice the student's), a student map larger than the teacher's, equal.
VID_STUDENT = {"layer1": (116, 16, 16), "wide": (24, 8, 8), "layer3": (64, 4, 4)}
VID_TEACHER = {"layer1": (64, 32, 32), "narrow": (32, 4, 4), "layer3": (48, 4, 4)}
INIT_LOG_SCALE = math.log(math.exp(5.0 - 1e-5) - 1.0)


def pool(x: np.ndarray, size: int) -> np.ndarray:
    """Average over k x k blocks of (B, C, H, W), k = H / size."""
    b, c, h, w = x.shape
    k = h // size
    return x.reshape(b, c, size, k, size, k).mean(axis=(3, 5))


def unpool(g: np.ndarray, k: int) -> np.ndarray:
    """The gradient of ``pool`` by k: each block's gradient spread evenly."""
    return np.repeat(np.repeat(g, k, axis=2), k, axis=3) / (k * k)


def vid_reference(loss: VariationalInformationDistillation, student: dict[str, torch.Tensor],
                  teacher: dict[str, torch.Tensor]) -> tuple[float, list[np.ndarray], list[np.ndarray]]:
    """VID summed over pairs, its gradient w.r.t. each student feature and each pair's log_scale.

    Per pair, with x the student's map pooled to the smaller size, μ = W3 relu(W2 relu(W1 x)) (1x1 convolutions),
    v = log(1 + exp(ρ)) + 1e-5 per channel and N = B·C·H·W: L = Σ 0.5 ((μ - t)² / v + log v) / N, so
    dL/dμ = (μ - t) / (v N) and dL/dρ_c = Σ_(b,h,w) 0.5 (1 / v_c - (μ - t)² / v_c²) σ(ρ_c) / N.
    """
    value, grads, rho_grads = 0.0, [], []
    for (s, t), head in zip(zip(student.values(), teacher.values()), loss.regressors):
        x, target = numpy_of(s), numpy_of(t)
        size = min(x.shape[2], target.shape[2])
        k_s = x.shape[2] // size
        x, target = pool(x, size), pool(target, size)
        w1, w2, w3 = (numpy_of(conv.weight)[:, :, 0, 0] for conv in head.regressor[::2])
        a1 = np.einsum("oc,bchw->bohw", w1, x)
        a2 = np.einsum("oc,bchw->bohw", w2, np.maximum(a1, 0))
        mu = np.einsum("oc,bchw->bohw", w3, np.maximum(a2, 0))
        rho = numpy_of(head.log_scale)
        v = (np.log(1.0 + np.exp(rho)) + 1e-5)[None, :, None, None]
        n = mu.size
        value += float(np.sum(0.5 * ((mu - target) ** 2 / v + np.log(v))) / n)
        g_mu = (mu - target) / (v * n)
        g_a2 = np.einsum("oc,bohw->bchw", w3, g_mu) * (a2 > 0)
        g_a1 = np.einsum("oc,bohw->bchw", w2, g_a2) * (a1 > 0)
        grads.append(unpool(np.einsum("oc,bohw->bchw", w1, g_a1), k_s))
        sigmoid = 1.0 / (1.0 + np.exp(-rho))
        rho_grads.append(np.sum(0.5 * (1.0 / v - (mu - target) ** 2 / v**2), axis=(0, 2, 3)) * sigmoid / n)
    return value, grads, rho_grads


def test_vid_builds_the_references_regressors_and_variance() -> None:
    loss = build_loss("vid", student_shapes=VID_STUDENT, teacher_shapes=VID_TEACHER)
    for head, (c_s, c_t) in zip(loss.regressors, [(116, 64), (24, 32), (64, 48)]):
        convs = list(head.regressor[::2])
        assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs] == [
            (c_s, c_t, (1, 1), None), (c_t, c_t, (1, 1), None), (c_t, c_t, (1, 1), None)]
        assert all(isinstance(m, torch.nn.ReLU) for m in head.regressor[1::2]) and len(head.regressor) == 5
        assert head.log_scale.dtype == torch.float32 and head.log_scale.shape == (c_t,)
        assert torch.equal(head.log_scale.detach(), torch.full((c_t,), np.float32(INIT_LOG_SCALE)))
    assert {name for name, _ in loss.named_parameters() if "log_scale" in name} == {
        f"regressors.{i}.log_scale" for i in range(3)}  # registered, so the student's optimiser trains them
    double = loss.double()
    variance = torch.nn.functional.softplus(double.regressors[0].log_scale) + 1e-5
    torch.testing.assert_close(variance, torch.full((64,), 5.0, dtype=torch.float64), rtol=1e-7, atol=0)


@pytest.mark.parametrize("at_init", [True, False])
def test_vid_equals_repdistillers_formula_value_and_gradient(at_init: bool) -> None:
    torch.manual_seed(3)
    loss = build_loss("vid", student_shapes=VID_STUDENT, teacher_shapes=VID_TEACHER).double()
    if not at_init:  # a variance trained away from 5, different per channel
        with torch.no_grad():
            for head in loss.regressors:
                head.log_scale.add_(torch.randn(head.log_scale.shape, dtype=torch.float64) * 2)
    student = {k: v.requires_grad_() for k, v in features(VID_STUDENT, 4, seed=30, relu=True).items()}
    teacher = features(VID_TEACHER, 4, seed=40, relu=True)
    value = call(loss, student, teacher)
    value.backward()
    expected, grads, rho_grads = vid_reference(loss, student, teacher)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    for s, g in zip(student.values(), grads):
        np.testing.assert_allclose(s.grad.numpy(), g, rtol=1e-9, atol=1e-12 * np.abs(g).max())
    for head, g in zip(loss.regressors, rho_grads):
        np.testing.assert_allclose(head.log_scale.grad.numpy(), g, rtol=1e-9, atol=1e-12 * np.abs(g).max())
        assert all(conv.weight.grad.abs().sum() > 0 for conv in head.regressor[::2])


# ---- real features of kd's CIFAR networks ----------------------------------------------------------------------


@pytest.mark.parametrize("name, layers", [("cc", ["avgpool"]), ("vid", ["layer1", "layer2", "layer3"])])
def test_on_cifar_resnets_the_loss_is_finite_and_trains_student_and_heads(name, layers, one_thread) -> None:
    torch.manual_seed(0)
    student, teacher = build_model("cifar:resnet8", 100), build_model("cifar:resnet20", 100).eval()
    loss = build_loss(name, student_shapes=feature_shapes(student, layers, 32, "--student_layers"),
                      teacher_shapes=feature_shapes(teacher, layers, 32, "--teacher_layers"), num_classes=100)
    s_hooks = FeatureHooks(student, layers, "--student_layers")
    t_hooks = FeatureHooks(teacher, layers, "--teacher_layers")
    images = torch.randn(4, 3, 32, 32)
    logits = student(images)
    with torch.no_grad():
        teacher_logits = teacher(images)
    s_features, t_features = s_hooks.take(), t_hooks.take()
    for feature in s_features.values():
        feature.retain_grad()
    value = loss(logits, teacher_logits, torch.zeros(4, dtype=torch.long), student_features=s_features,
                 teacher_features=t_features)
    assert value.shape == () and torch.isfinite(value) and value.item() != 0
    value.backward()
    for feature in s_features.values():
        assert feature.grad is not None and torch.isfinite(feature.grad).all() and feature.grad.abs().sum() > 0
    assert student.conv1.weight.grad is not None and student.conv1.weight.grad.abs().sum() > 0
    for parameter_name, parameter in loss.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), parameter_name
        assert parameter.grad.abs().sum() > 0, parameter_name
    s_hooks.remove()
    t_hooks.remove()


# ---- layers a loss cannot use ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cc", "vid", "ickd", "pad_l2"])
def test_a_loss_refuses_unpaired_or_missing_layers(name: str) -> None:
    """Every loss that builds a head per layer pair (here and in correlation.py) refuses layers it cannot pair."""
    maps = {"layer1": (16, 8, 8), "layer2": (32, 4, 4)}
    with pytest.raises(KDError, match=r"--student_layers with --teacher_layers.*2 student.*1 teacher"):
        build_loss(name, student_shapes=maps, teacher_shapes={"layer1": (16, 8, 8)})
    with pytest.raises(KDError, match="give --student_layers and --teacher_layers"):
        build_loss(name, student_shapes={}, teacher_shapes={})
    loss = build_loss(name, student_shapes=maps, teacher_shapes=maps).double()
    one = {"layer1": rand(2, 16, 8, 8, seed=0)}
    with pytest.raises(ValueError, match="built for 2 --student_layers but got 1"):
        call(loss, one, dict(one))
    with pytest.raises(ValueError, match="student features.*teacher features.*hook as many layers"):
        call(loss, {**one, "layer2": rand(2, 32, 4, 4, seed=1)}, dict(one))


def test_vid_refuses_a_vector_where_it_regresses_a_map() -> None:
    with pytest.raises(KDError, match=r"--student_layers 'fc' gives shape \(100,\) per sample, not \(C, H, W\)"):
        build_loss("vid", student_shapes={"fc": (100,)}, teacher_shapes={"layer3": (64, 8, 8)})
    with pytest.raises(KDError, match=r"--teacher_layers 'fc' gives shape \(10,\)"):
        build_loss("vid", student_shapes={"layer3": (64, 8, 8)}, teacher_shapes={"fc": (10,)})
    loss = build_loss("vid", student_shapes={"a": (4, 2, 2)}, teacher_shapes={"b": (4, 2, 2)}).double()
    with pytest.raises(ValueError, match=r"--student_layers 'a' gives \(2, 16\)"):
        call(loss, {"a": rand(2, 16, seed=0)}, {"b": rand(2, 4, 2, 2, seed=1)})


def test_cc_refuses_a_feature_of_another_size_than_it_was_built_for() -> None:
    loss = build_loss("cc", student_shapes={"a": (8,)}, teacher_shapes={"b": (4,)}).double()
    with pytest.raises(ValueError, match="'a' has 6 numbers per sample but its embedding was built for 8"):
        call(loss, {"a": rand(2, 6, seed=0)}, {"b": rand(2, 4, seed=1)})
