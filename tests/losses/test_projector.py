"""Tests of SRD (kd/losses/projector.py) against torchdistill's formula (``SRDLoss`` with ``SRDModelWrapper``'s
projector and BatchNorms) computed independently in float64 with numpy, value and gradient (derived by hand), at the
reference's defaults; plus the layers it refuses and that its projector trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd.errors import KDError
from kd.losses.base import LOSSES, DistillationLoss, build_loss, loss_property
from kd.losses.projector import ProjectorDistillation

STUDENT = {"avgpool": (6, 1, 1)}
TEACHER = {"avgpool": (4,)}
EPS = 1e-4


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def call(loss, student: torch.Tensor, teacher: torch.Tensor, s_logits: torch.Tensor,
         t_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    return loss(s_logits, t_logits, torch.zeros(len(student), dtype=torch.long), student_features={"avgpool": student},
                teacher_features={"avgpool": teacher})


def standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm1d in training mode without affine: (x − mean) / sqrt(biased var + eps), and 1/sqrt(var + eps)."""
    inv = 1.0 / np.sqrt(x.var(axis=0) + EPS)
    return (x - x.mean(axis=0)) * inv, inv


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def srd_reference(w: np.ndarray, b: np.ndarray, s: np.ndarray, t: np.ndarray, zs: np.ndarray, zt: np.ndarray,
                  p: float = 4.0, temperature: float = 1.0) -> tuple[float, float, np.ndarray, np.ndarray, np.ndarray]:
    """torchdistill's SRD terms ``2·log Σ|BN(s W^T + b) − BN(t)|^p`` and ``KL(softmax(zt/T) ‖ softmax(zs/T))`` (batch
    mean), with the gradients of their sum w.r.t. s, W and zs.

    With y = s W^T + b, x̂ = BN(y), d = x̂ − BN(t), S = Σ|d|^p: g = dF/dx̂ = 2 p |d|^(p−1) sign(d) / S; back through
    the batch-statistics BN, dF/dy = inv · (g − mean(g) − x̂ · mean(g · x̂)) (per column, means over the batch);
    the KL's gradient w.r.t. zs is (softmax(zs/T) − softmax(zt/T)) / (T·B).
    """
    y = s @ w.T + b
    x_hat, inv = standardise(y)
    d = x_hat - standardise(t)[0]
    total = (np.abs(d) ** p).sum()
    feature = 2 * np.log(total)
    g = 2 * p * np.abs(d) ** (p - 1) * np.sign(d) / total
    g_y = inv * (g - g.mean(axis=0) - x_hat * (g * x_hat).mean(axis=0))
    ps, pt = softmax(zs / temperature), softmax(zt / temperature)
    kl = float((pt * (np.log(pt) - np.log(ps))).sum() / len(zs))
    return float(feature), kl, g_y @ w, g_y.T @ s, (ps - pt) / (temperature * len(zs))


def test_registered_with_the_references_defaults() -> None:
    cls = ProjectorDistillation
    assert LOSSES.get("srd") is cls and issubclass(cls, DistillationLoss)
    assert (cls.weight, cls.ce_weight, cls.features, cls.connect) == (1.0, 1.0, True, False)
    assert loss_property(cls, "needs_teacher") and cls.__doc__ and "2024" in cls.__doc__
    loss = build_loss("srd", student_shapes=STUDENT, teacher_shapes=TEACHER, temperature=4.0)
    assert (loss.exponent, loss.temperature, loss.feature_weight, loss.kl_weight, loss.eps) == (4.0, 4.0, 2.0, 1.0, EPS)
    defaults = {"weight": 1.0, "ce_weight": 1.0, "exponent": 4.0, "temperature": 1.0, "feature_weight": 2.0}
    assert set(cls.space) == set(defaults)
    assert all(cls.space[k].low <= v <= cls.space[k].high for k, v in defaults.items())
    linear, norm = loss.projector
    assert isinstance(linear, torch.nn.Linear) and (linear.in_features, linear.out_features) == (6, 4)
    assert linear.bias is not None
    for bn in (norm, loss.teacher_norm):
        assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == EPS and bn.num_features == 4


@pytest.mark.parametrize("batch", [2, 5, 16])
def test_srd_equals_torchdistills_formula_value_and_gradient(batch: int) -> None:
    torch.manual_seed(batch)
    loss = ProjectorDistillation(STUDENT, TEACHER).double().train()
    student = rand(batch, 6, 1, 1, seed=1, scale=2.0).requires_grad_()
    teacher = rand(batch, 4, seed=2, scale=3.0)
    s_logits, t_logits = rand(batch, 10, seed=3, scale=2.0).requires_grad_(), rand(batch, 10, seed=4, scale=2.0)
    terms = call(loss, student, teacher, s_logits, t_logits)
    assert set(terms) == {"feature", "kl"}
    sum(terms.values()).backward()
    linear = loss.projector[0]
    feature, kl, g_s, g_w, g_z = srd_reference(linear.weight.detach().numpy(), linear.bias.detach().numpy(),
                                                student.detach().numpy().reshape(batch, 6), teacher.numpy(),
                                                s_logits.detach().numpy(), t_logits.numpy())
    assert terms["feature"].item() == pytest.approx(feature, rel=1e-12, abs=1e-12)
    assert terms["kl"].item() == pytest.approx(kl, rel=1e-12, abs=1e-15)
    for got, want in ((student.grad.reshape(batch, 6), g_s), (linear.weight.grad, g_w), (s_logits.grad, g_z)):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_the_projector_trains_and_the_teacher_gets_no_gradient() -> None:
    loss = ProjectorDistillation({"avgpool": (8, 1, 1)}, {"avgpool": (8, 1, 1)}).train()
    student = torch.randn(4, 8, 1, 1, requires_grad=True)
    teacher = torch.randn(4, 8, 1, 1, requires_grad=True)
    logits = torch.randn(4, 3, requires_grad=True)
    terms = call(loss, student, teacher, logits, torch.randn(4, 3))
    sum(terms.values()).backward()
    assert [name for name, _ in loss.named_parameters()] == ["projector.0.weight", "projector.0.bias"]
    for parameter in loss.parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    assert int(loss.teacher_norm.num_batches_tracked) == 1  # running statistics follow, as the reference's BN's


def test_in_evaluation_the_norms_use_running_statistics() -> None:
    loss = ProjectorDistillation(STUDENT, TEACHER).double().eval()
    student, teacher = rand(1, 6, seed=0), rand(1, 4, seed=1)
    terms = call(loss, student, teacher, rand(1, 3, seed=2), rand(1, 3, seed=3))
    linear = loss.projector[0]
    d = (student @ linear.weight.T + linear.bias - teacher) / np.sqrt(1 + EPS)
    assert terms["feature"].item() == pytest.approx(2 * torch.log((d.abs() ** 4).sum()).item(), rel=1e-12)


@pytest.mark.parametrize("student, teacher, match", [
    ({"layer3": (16, 8, 8)}, {"avgpool": (4, 1, 1)}, r"--student_layers 'layer3' gives shape \(16, 8, 8\)"),
    ({"avgpool": (4, 1, 1)}, {"fc": (4, 2)}, r"--teacher_layers 'fc' gives shape \(4, 2\)"),
    ({"a": (4,), "b": (4,)}, {"a": (4,), "b": (4,)}, r"one --student_layers and one --teacher_layers.*got 2 pairs"),
    ({}, {}, "give --student_layers and --teacher_layers"),
    ({"a": (4,), "b": (4,)}, {"a": (4,)}, r"2 student layer\(s\).*1 teacher"),
])
def test_srd_refuses_other_than_one_pair_of_pooled_features(student, teacher, match) -> None:
    with pytest.raises(KDError, match=match):
        build_loss("srd", student_shapes=student, teacher_shapes=teacher)


def test_srd_refuses_features_unlike_those_it_was_built_for() -> None:
    loss = ProjectorDistillation(STUDENT, TEACHER).double()
    logits = rand(3, 5, seed=0)
    with pytest.raises(ValueError, match="--student_layers 'avgpool' gives 7 numbers per sample.*width 6"):
        call(loss, rand(3, 7, seed=1), rand(3, 4, seed=2), logits, logits)
    with pytest.raises(ValueError, match="built for 1 --student_layers but got 2"):
        loss(logits, logits, torch.zeros(3, dtype=torch.long), student_features={"a": rand(3, 6, seed=1),
             "b": rand(3, 6, seed=1)}, teacher_features={"a": rand(3, 4, seed=2), "b": rand(3, 4, seed=2)})
