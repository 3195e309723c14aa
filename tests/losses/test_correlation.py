"""Tests of torchdistill's ICKD and PAD-L2 (kd/losses/correlation.py): each against its reference formula
(``ChSimLoss`` with ``ChannelSimilarityEmbed``; ``PADL2Loss`` with ``VarianceBranch4PAD``) written out here in float64
from elementary operations (the convolution as shifted sums, BatchNorm from batch moments), value and gradient
w.r.t. the student's features and the loss's own parameters; a finite-difference check; real CIFAR features; and the
layers each loss refuses."""

from __future__ import annotations

import pytest
import torch

from kd.errors import KDError
from kd.losses.base import LOSSES, DistillationLoss, build_loss, loss_property
from kd.losses.correlation import InterChannelCorrelation, PrimeAwareAdaptiveL2
from kd.models.build import build_model
from kd.train.hooks import FeatureHooks, feature_shapes


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def features(shapes: dict[str, tuple[int, ...]], batch: int, seed: int, **kwargs) -> dict[str, torch.Tensor]:
    return {name: rand(batch, *shape, seed=seed + i, **kwargs) for i, (name, shape) in enumerate(shapes.items())}


def call(loss, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], **extras) -> torch.Tensor:
    batch = len(next(iter(student.values())))
    logits = torch.zeros(batch, 3, dtype=torch.float64)
    return loss(logits, logits, torch.zeros(batch, dtype=torch.long), student_features=student,
                teacher_features=teacher, **extras)


def batch_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Training-mode BatchNorm: moments over ``dims``, biased variance, eps 1e-5, per-channel affine (axis 1)."""
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - mean) / torch.sqrt(var + 1e-5) * gamma.view(shape) + beta.view(shape)


@pytest.mark.parametrize("name, cls, weight, ce_weight, connect", [
    ("ickd", InterChannelCorrelation, 500.0, 0.5, False),
    ("pad_l2", PrimeAwareAdaptiveL2, 1.0, 1.0, True),
])
def test_registered_with_torchdistills_sample_config_defaults(name, cls, weight, ce_weight, connect) -> None:
    assert LOSSES.get(name) is cls and issubclass(cls, DistillationLoss)
    assert (cls.weight, cls.ce_weight, cls.features, cls.connect) == (weight, ce_weight, True, connect)
    assert loss_property(cls, "needs_teacher") and set(cls.space) == {"weight", "ce_weight"}
    for key, value in (("weight", weight), ("ce_weight", ce_weight)):
        assert cls.space[key].low <= value <= cls.space[key].high
    assert cls.__doc__ and "torchdistill" in cls.__doc__ and ("ICCV 2021" in cls.__doc__ or "ECCV 2020" in cls.__doc__)


# ---- ickd ------------------------------------------------------------------------------------------------------

# channels and map sizes differ within a pair (the Gram matrix is C x C whatever the size), and equal ones.
ICKD_STUDENT = {"layer2": (6, 5, 5), "layer3": (8, 4, 4)}
ICKD_TEACHER = {"layer2": (10, 3, 3), "layer3": (8, 4, 4)}


def ickd_reference(loss: InterChannelCorrelation, student: dict[str, torch.Tensor],
                   teacher: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """ICKD from the formula on fresh copies of the features and the embeddings' parameters: y = BN(conv_k(x)),
    G = y yᵀ per sample, rows divided by max(‖row‖, 1e-12), L = Σ (G_s - G_t)² / (C B²). Returns L and the copies."""
    value, leaves = torch.zeros((), dtype=torch.float64), []
    for (s, t), embed in zip(zip(student.values(), teacher.values()), loss.embeds):
        x = s.detach().clone().requires_grad_()
        w = embed.conv2d.weight.detach().clone().requires_grad_()
        gamma, beta = (p.detach().clone().requires_grad_() for p in (embed.bn.weight, embed.bn.bias))
        k = w.shape[2]
        padded = torch.nn.functional.pad(x, [k // 2] * 4)
        h, wd = x.shape[2:]
        conv = sum(torch.einsum("oc,bchw->bohw", w[:, :, i, j], padded[:, :, i:i + h, j:j + wd])
                   for i in range(k) for j in range(k))
        y = batch_norm(conv, gamma, beta, (0, 2, 3))
        grams = []
        for f in (y, t.detach()):
            m = f.reshape(f.shape[0], f.shape[1], -1)
            g = torch.einsum("bip,bjp->bij", m, m)
            grams.append(g / g.pow(2).sum(2, keepdim=True).sqrt().clamp(min=1e-12))
        b, c = y.shape[:2]
        value = value + ((grams[0] - grams[1]) ** 2).sum() / (c * b * b)
        leaves.append([x, w, gamma, beta])
    return value, leaves


@pytest.mark.parametrize("batch, kernel_size", [(2, 3), (5, 3), (3, 1)])
def test_ickd_equals_the_formula_value_and_gradient(batch: int, kernel_size: int) -> None:
    torch.manual_seed(batch)
    loss = build_loss("ickd", student_shapes=ICKD_STUDENT, teacher_shapes=ICKD_TEACHER, kernel_size=kernel_size)
    loss = loss.double()
    with torch.no_grad():  # an embedding trained away from BatchNorm's identity start
        for embed in loss.embeds:
            embed.bn.weight.add_(torch.rand_like(embed.bn.weight))
            embed.bn.bias.add_(torch.randn_like(embed.bn.bias))
    assert [(e.conv2d.in_channels, e.conv2d.out_channels, e.conv2d.kernel_size, e.conv2d.bias) for e in loss.embeds] \
        == [(6, 10, (kernel_size,) * 2, None), (8, 8, (kernel_size,) * 2, None)]
    student = {k: v.requires_grad_() for k, v in features(ICKD_STUDENT, batch, seed=10, scale=2.0).items()}
    teacher = features(ICKD_TEACHER, batch, seed=20, scale=3.0).items()
    teacher = {k: v.clamp(min=0) for k, v in teacher}  # post-ReLU maps, as hooked stages give
    value = call(loss, student, teacher)
    value.backward()
    expected, leaves = ickd_reference(loss, student, teacher)
    expected.backward()
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    for s, embed, (x, w, gamma, beta) in zip(student.values(), loss.embeds, leaves):
        for got, want in ((s.grad, x.grad), (embed.conv2d.weight.grad, w.grad), (embed.bn.weight.grad, gamma.grad),
                          (embed.bn.bias.grad, beta.grad)):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * want.abs().max().item())


def test_ickd_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    loss = build_loss("ickd", student_shapes={"a": (2, 2, 2)}, teacher_shapes={"b": (3, 2, 2)}).double()
    teacher = {"b": rand(3, 3, 2, 2, seed=1)}
    assert torch.autograd.gradcheck(lambda s: call(loss, {"a": s}, teacher), rand(3, 2, 2, 2, seed=2).requires_grad_())


# ---- pad_l2 ----------------------------------------------------------------------------------------------------

PAD_SHAPES = {"avgpool": (12,), "layer3": (3, 2, 2)}  # a pooled vector, and a map flattened to 12


def pad_reference(loss: PrimeAwareAdaptiveL2, student: dict[str, torch.Tensor],
                  teacher: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """PAD-L2 from the formula on fresh copies: v = BN(s W^T + b), L = 1/B Σ_b 1/D Σ_d ((t - s)² / (1e-6 + e^v) + v)."""
    value, leaves = torch.zeros((), dtype=torch.float64), []
    for (s, t), head in zip(zip(student.values(), teacher.values()), loss.heads):
        x = s.detach().clone().requires_grad_()
        w, b, gamma, beta = (p.detach().clone().requires_grad_() for p in (head.linear.weight, head.linear.bias,
                                                                          head.bn.weight, head.bn.bias))
        xs, xt = x.reshape(len(x), -1), t.detach().reshape(len(t), -1)
        v = batch_norm(xs @ w.T + b, gamma, beta, (0,))
        per_sample = ((xt - xs) ** 2 / (1e-6 + torch.exp(v)) + v).sum(1) / xs.shape[1]
        value = value + per_sample.sum() / len(xs)
        leaves.append([x, w, b, gamma, beta])
    return value, leaves


@pytest.mark.parametrize("batch", [2, 7])
def test_pad_l2_equals_the_formula_value_and_gradient(batch: int) -> None:
    torch.manual_seed(batch)
    loss = build_loss("pad_l2", student_shapes=PAD_SHAPES, teacher_shapes=PAD_SHAPES).double()
    assert (loss.eps, loss.l2_epochs) == (1e-6, 0)
    assert [(h.linear.in_features, h.linear.out_features, h.bn.num_features) for h in loss.heads] == [(12, 12, 12)] * 2
    with torch.no_grad():
        for head in loss.heads:
            head.bn.weight.add_(torch.rand_like(head.bn.weight))
            head.bn.bias.add_(torch.randn_like(head.bn.bias))
    student = {k: v.requires_grad_() for k, v in features(PAD_SHAPES, batch, seed=30).items()}
    teacher = features(PAD_SHAPES, batch, seed=40, scale=2.0)
    value = call(loss, student, teacher, epoch=3)
    value.backward()
    expected, leaves = pad_reference(loss, student, teacher)
    expected.backward()
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    for s, head, copies in zip(student.values(), loss.heads, leaves):
        params = (head.linear.weight, head.linear.bias, head.bn.weight, head.bn.bias)
        for got, want in zip((s.grad, *(p.grad for p in params)), (c.grad for c in copies)):
            # the linear bias's gradient is 0 up to rounding: BatchNorm subtracts the batch mean
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * max(want.abs().max().item(), 1.0))


def test_pad_l2_gradient_matches_finite_differences_and_reaches_the_head_input() -> None:
    torch.manual_seed(0)
    loss = build_loss("pad_l2", student_shapes={"a": (5,)}, teacher_shapes={"b": (5,)}).double()
    teacher = {"b": rand(4, 5, seed=1)}
    assert torch.autograd.gradcheck(lambda s: call(loss, {"a": s}, teacher), rand(4, 5, seed=2).requires_grad_())
    # With the student equal to the teacher, only the head's log-variance term moves the student's feature.
    s = teacher["b"].clone().requires_grad_()
    call(loss, {"a": s}, teacher).backward()
    assert s.grad.abs().sum() > 0


def test_pad_l2_runs_torchdistills_first_stage_for_l2_epochs() -> None:
    loss = build_loss("pad_l2", student_shapes={"a": (6,)}, teacher_shapes={"b": (6,)}, l2_epochs=2).double()
    s, t = rand(3, 6, seed=0).requires_grad_(), rand(3, 6, seed=1)
    for epoch in (0, 1):
        torch.testing.assert_close(call(loss, {"a": s}, {"b": t}, epoch=epoch), ((s - t) ** 2).mean())
    assert call(loss, {"a": s}, {"b": t}, epoch=0).backward() is None and loss.heads[0].linear.weight.grad is None
    expected, _ = pad_reference(loss, {"a": s}, {"b": t})
    torch.testing.assert_close(call(loss, {"a": s}, {"b": t}, epoch=2), expected, rtol=1e-12, atol=0)


# ---- real features of kd's CIFAR networks ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ickd", "pad_l2"])
def test_on_cifar_resnets_a_step_has_finite_gradients(name: str, one_thread) -> None:
    torch.manual_seed(0)
    teacher, student = build_model("cifar:resnet56", 100).eval(), build_model("cifar:resnet20", 100)
    layers = ["layer3"]
    s_shapes = feature_shapes(student, layers, 32, "--student_layers")
    t_shapes = feature_shapes(teacher, layers, 32, "--teacher_layers")
    assert s_shapes == t_shapes == {"layer3": (64, 8, 8)}  # so pad_l2's connector is the identity
    loss = build_loss(name, student_shapes=s_shapes, teacher_shapes=t_shapes, num_classes=100)
    s_hooks = FeatureHooks(student, layers, "--student_layers")
    t_hooks = FeatureHooks(teacher, layers, "--teacher_layers")
    images = torch.randn(4, 3, 32, 32)
    logits = student(images)
    with torch.no_grad():
        teacher_logits = teacher(images)
    s_features, t_features = s_hooks.take(), t_hooks.take()
    value = loss(logits, teacher_logits, torch.zeros(4, dtype=torch.long), student_features=s_features,
                 teacher_features=t_features)
    assert value.shape == () and torch.isfinite(value) and value.item() != 0
    optimiser = torch.optim.SGD([*student.parameters(), *loss.parameters()], lr=0.01)
    value.backward()
    for part_name, part in (("student", student), ("loss", loss)):
        for parameter_name, parameter in part.named_parameters():
            if parameter.grad is not None:
                assert torch.isfinite(parameter.grad).all(), (part_name, parameter_name)
    assert student.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())
    before = [p.detach().clone() for p in loss.parameters()]
    optimiser.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, loss.parameters()))
    s_hooks.remove()
    t_hooks.remove()


# ---- layers a loss cannot use ----------------------------------------------------------------------------------



def test_ickd_refuses_a_vector_where_it_correlates_channels_of_a_map() -> None:
    with pytest.raises(KDError, match=r"--student_layers 'fc' gives shape \(100,\) per sample, not \(C, H, W\)"):
        build_loss("ickd", student_shapes={"fc": (100,)}, teacher_shapes={"layer3": (64, 8, 8)})
    with pytest.raises(KDError, match=r"--teacher_layers 'avgpool' gives shape \(64,\)"):
        build_loss("ickd", student_shapes={"layer3": (64, 8, 8)}, teacher_shapes={"avgpool": (64,)})
    with pytest.raises(KDError, match="kernel_size must be odd"):
        build_loss("ickd", student_shapes={"a": (4, 2, 2)}, teacher_shapes={"b": (4, 2, 2)}, kernel_size=2)
    loss = build_loss("ickd", student_shapes={"a": (4, 2, 2)}, teacher_shapes={"b": (6, 2, 2)}).double()
    with pytest.raises(ValueError, match=r"--student_layers 'a' gives \(2, 16\)"):
        call(loss, {"a": rand(2, 16, seed=0)}, {"b": rand(2, 6, 2, 2, seed=1)})
    with pytest.raises(ValueError, match=r"--teacher_layers 'b' gives \(2, 4, 2, 2\).*\(B, 6, H, W\)"):
        call(loss, {"a": rand(2, 4, 2, 2, seed=0)}, {"b": rand(2, 4, 2, 2, seed=1)})


def test_pad_l2_refuses_features_of_another_size_than_its_head() -> None:
    loss = build_loss("pad_l2", student_shapes={"a": (8,)}, teacher_shapes={"b": (8,)}).double()
    with pytest.raises(ValueError, match=r"--student_layers 'a' gives \(2, 6\), 6 numbers.*built for 8"):
        call(loss, {"a": rand(2, 6, seed=0)}, {"b": rand(2, 8, seed=1)})
    with pytest.raises(ValueError, match=r"--teacher_layers 'b' gives \(2, 10\), 10 numbers"):
        call(loss, {"a": rand(2, 8, seed=0)}, {"b": rand(2, 10, seed=1)})
    with pytest.raises(KDError, match="need eps > 0"):
        build_loss("pad_l2", student_shapes={"a": (8,)}, teacher_shapes={"b": (8,)}, eps=0.0)
