"""Tests of ReviewKD (kd/losses/review.py) against mdistiller's ``ReviewKD.py`` (``ABF``, ``hcl_loss``, the distiller's
deepest-first review), recomputed independently in float64 from plain tensor operations (batch norm from batch
statistics, nearest resizing and average pooling by indexing, the HCL's weights written out): value and gradient
with respect to the student's features; plus real CIFAR ResNet features trained for a step, and the layers it
refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kd.losses.review  # noqa: F401 - registers reviewkd
from kd.errors import KDError
from kd.losses.base import LOSSES, DistillationLoss, build_loss, loss_property
from kd.losses.review import ReviewKD
from kd.models.build import build_model
from kd.train.hooks import FeatureHooks, feature_shapes


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def features(shapes: dict[str, tuple[int, ...]], batch: int, seed: int) -> dict[str, torch.Tensor]:
    return {name: rand(batch, *shape, seed=seed + i) for i, (name, shape) in enumerate(shapes.items())}


def call(loss, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], epoch: int = 0) -> torch.Tensor:
    batch = len(next(iter(student.values())))
    logits = torch.zeros(batch, 3, dtype=torch.float64)
    return loss(logits, logits, torch.zeros(batch, dtype=torch.long), student_features=student,
                teacher_features=teacher, epoch=epoch)


def test_registered_with_mdistillers_defaults() -> None:
    assert LOSSES.get("reviewkd") is ReviewKD and issubclass(ReviewKD, DistillationLoss)
    assert (ReviewKD.weight, ReviewKD.ce_weight, ReviewKD.features, ReviewKD.connect) == (1.0, 1.0, True, False)
    assert loss_property(ReviewKD, "needs_teacher") and set(ReviewKD.space) == {"weight", "ce_weight"}
    assert ReviewKD.space["weight"].low <= 1.0 and 8.0 <= ReviewKD.space["weight"].high
    assert ReviewKD.__doc__ and "2021" in ReviewKD.__doc__


def test_builds_mdistillers_abfs_for_resnet32x4_to_resnet8x4() -> None:
    """cfg.py's REVIEWKD: IN_CHANNELS = OUT_CHANNELS = [64, 128, 256, 256], mid min(512, 256) = 256, all but the
    pooled stage fuse; 20 warm-up epochs."""
    shapes = {"layer1": (64, 32, 32), "layer2": (128, 16, 16), "layer3": (256, 8, 8), "avgpool": (256, 1, 1)}
    loss = build_loss("reviewkd", student_shapes=shapes, teacher_shapes=shapes)
    assert (loss.in_channels, loss.out_channels, loss.mid_channels, loss.warmup) == (
        [64, 128, 256, 256], [64, 128, 256, 256], 256, 20)
    assert [abf.att_conv is not None for abf in loss.abfs] == [True, True, True, False]
    assert [tuple(abf.conv1[0].weight.shape) for abf in loss.abfs] == [(256, c, 1, 1) for c in (64, 128, 256, 256)]
    assert [tuple(abf.conv2[0].weight.shape) for abf in loss.abfs] == [(c, 256, 3, 3) for c in (64, 128, 256, 256)]
    assert tuple(loss.abfs[0].att_conv[0].weight.shape) == (2, 512, 1, 1) and loss.abfs[0].att_conv[0].bias is not None
    assert sum(p.numel() for p in loss.parameters()) == 1_808_774  # mdistiller's get_extra_parameters() for this cfg
    wide = build_loss("reviewkd", student_shapes={"a": (8, 4, 4), "b": (1024,)}, teacher_shapes={"a": (4, 4, 4),
                                                                                                  "b": (256, 1, 1)})
    assert wide.mid_channels == 512 and build_loss("reviewkd", student_shapes={"a": (8, 4, 4)}, teacher_shapes={
        "a": (8, 4, 4)}, max_mid_channels=4).mid_channels == 4


@pytest.mark.parametrize("epoch, factor", [(0, 1 / 20), (4, 5 / 20), (18, 19 / 20), (19, 1.0), (200, 1.0)])
def test_warm_up_follows_mdistillers_epochs_counted_from_one(epoch: int, factor: float) -> None:
    shapes = {"a": (3, 4, 4)}
    loss = build_loss("reviewkd", student_shapes=shapes, teacher_shapes=shapes).double()
    student, teacher = features(shapes, 3, seed=0), features(shapes, 3, seed=5)
    full = call(loss, student, teacher, epoch=100)
    assert loss.warmup_factor(epoch) == pytest.approx(factor)
    torch.testing.assert_close(call(loss, student, teacher, epoch=epoch), factor * full, rtol=1e-12, atol=0)
    assert build_loss("reviewkd", student_shapes=shapes, teacher_shapes=shapes, warmup=0).warmup_factor(0) == 1.0


# ---- the reference, recomputed -----------------------------------------------------------------------------------


def batch_norm(x: torch.Tensor, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    """Training-mode batch norm: the batch's mean and biased variance per channel."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resizing: output pixel i takes input pixel floor(i · in / out)."""
    rows = torch.arange(size[0]) * x.shape[2] // size[0]
    cols = torch.arange(size[1]) * x.shape[3] // size[1]
    return x[:, :, rows][:, :, :, cols]


def pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average pooling to size x size of a map whose sides it divides."""
    b, c, h, w = x.shape
    return x.reshape(b, c, size, h // size, size, w // size).mean(dim=(3, 5))


def abf_reference(abf, x: torch.Tensor, residual: torch.Tensor | None,
                  out_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """mdistiller's ABF.forward from its parameters: 1x1 conv + BN; with a residual, sigmoid attention over the
    concatenation weighs the two; nearest resize to the teacher's size; 3x3 conv + BN."""
    x = batch_norm(torch.einsum("oc,bchw->bohw", abf.conv1[0].weight[:, :, 0, 0], x), abf.conv1[1])
    if residual is not None:
        residual = nearest(residual, tuple(x.shape[2:]))
        w, bias = abf.att_conv[0].weight[:, :, 0, 0], abf.att_conv[0].bias
        z = torch.sigmoid(torch.einsum("oc,bchw->bohw", w, torch.cat([x, residual], 1)) + bias.view(1, 2, 1, 1))
        x = x * z[:, 0:1] + residual * z[:, 1:2]
    if x.shape[-1] != out_size[-1]:
        x = nearest(x, out_size)
    return batch_norm(F.conv2d(x, abf.conv2[0].weight, padding=1), abf.conv2[1]), x


def hcl_reference(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """mdistiller's hcl_loss of one pair: MSE, plus 1/2, 1/4, 1/8 of the MSEs pooled to 4, 2, 1 (those below H),
    over the sum of the weights."""
    h = fs.shape[2]
    used = [size for size in (4, 2, 1) if size < h]
    weights = [0.5 ** (k + 1) for k in range(len(used))]
    loss = ((fs - ft) ** 2).mean() + sum(wk * ((pool(fs, s) - pool(ft, s)) ** 2).mean() for wk, s in zip(weights, used))
    return loss / (1 + sum(weights))


def review_reference(loss, student: list[torch.Tensor], teacher: list[torch.Tensor], epoch: int) -> torch.Tensor:
    """The distiller's forward_train: reverse the stages, fuse deepest first, HCL against the teacher, warm-up
    min(epoch / 20, 1) with mdistiller's epoch counted from 1."""
    student = [f.reshape(*f.shape, 1, 1) if f.dim() == 2 else f for f in student]
    teacher = [f.reshape(*f.shape, 1, 1) if f.dim() == 2 else f for f in teacher]
    abfs, xs, sizes = list(loss.abfs)[::-1], student[::-1], [tuple(t.shape[2:]) for t in teacher[::-1]]
    out, residual = abf_reference(abfs[0], xs[0], None, sizes[0])
    results = [out]
    for abf, x, size in zip(abfs[1:], xs[1:], sizes[1:]):
        out, residual = abf_reference(abf, x, residual, size)
        results.insert(0, out)
    return min((epoch + 1) / 20, 1.0) * sum(hcl_reference(o, t) for o, t in zip(results, teacher))


CASES = {
    # as resnet32x4 -> resnet8x4 hooks them, narrowed: equal sizes, the pooled feature as a (C, 1, 1) map
    "same sizes": ({"layer1": (3, 16, 16), "layer2": (5, 8, 8), "layer3": (6, 4, 4), "avgpool": (6, 1, 1)},
                   {"layer1": (4, 16, 16), "layer2": (5, 8, 8), "layer3": (7, 4, 4), "avgpool": (7, 1, 1)}),
    # as resnet32x4 -> ShuffleV2: the student's maps half the teacher's size, its pooled feature a (D,) vector
    "student smaller": ({"layer1": (6, 8, 8), "layer2": (8, 4, 4), "layer3": (9, 2, 2), "avgpool": (12,)},
                        {"layer1": (4, 16, 16), "layer2": (5, 8, 8), "layer3": (7, 4, 4), "avgpool": (7,)}),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("epoch", [3, 40])
def test_equals_mdistillers_review_value_and_gradient(case: str, epoch: int) -> None:
    torch.manual_seed(0)
    s_shapes, t_shapes = CASES[case]
    loss = build_loss("reviewkd", student_shapes=s_shapes, teacher_shapes=t_shapes).double().train()
    with torch.no_grad():  # BN affine parameters away from 1 and 0, so that they count
        for abf in loss.abfs:
            for bn in (abf.conv1[1], abf.conv2[1]):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
    student, teacher = features(s_shapes, 4, seed=1), features(t_shapes, 4, seed=11)
    ours = {name: f.clone().requires_grad_() for name, f in student.items()}
    theirs = [f.clone().requires_grad_() for f in student.values()]
    value = call(loss, ours, teacher, epoch=epoch)
    expected = review_reference(loss, theirs, list(teacher.values()), epoch)
    assert value.dtype == torch.float64 and value.item() > 0
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    grads = torch.autograd.grad(value, list(ours.values()))
    expected_grads = torch.autograd.grad(expected, theirs)
    for grad, want in zip(grads, expected_grads):
        assert want.abs().sum() > 0
        torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-14)


def test_hcl_skips_the_pyramid_levels_not_below_the_height() -> None:
    fs, ft = rand(2, 3, 2, 2, seed=0), rand(2, 3, 2, 2, seed=1)
    expected = (((fs - ft) ** 2).mean() + 0.5 * ((fs.mean((2, 3)) - ft.mean((2, 3))) ** 2).mean()) / 1.5
    torch.testing.assert_close(kd.losses.review.hierarchical_context_loss(fs, ft), expected, rtol=1e-14, atol=0)
    one = rand(2, 3, 1, 1, seed=2)
    torch.testing.assert_close(kd.losses.review.hierarchical_context_loss(one, 0 * one), (one ** 2).mean())


# ---- real features of kd's CIFAR networks ----------------------------------------------------------------------

STUDENT_LAYERS = ["layer1", "layer2", "layer3", "avgpool"]  # resnet20's stage outputs and pooled feature
TEACHER_LAYERS = ["layer1.8.preact", "layer2.8.preact", "layer3.8.preact", "avgpool"]  # resnet56's, before the ReLU


def test_resnet56_to_resnet20_trains_end_to_end_for_a_step(one_thread) -> None:
    torch.manual_seed(0)
    student, teacher = build_model("cifar:resnet20", 100), build_model("cifar:resnet56", 100).eval()
    loss = build_loss("reviewkd", student_shapes=feature_shapes(student, STUDENT_LAYERS, 32, "--student_layers"),
                      teacher_shapes=feature_shapes(teacher, TEACHER_LAYERS, 32, "--teacher_layers"), num_classes=100)
    assert (loss.in_channels, loss.out_channels, loss.mid_channels) == ([16, 32, 64, 64], [16, 32, 64, 64], 64)
    s_hooks = FeatureHooks(student, STUDENT_LAYERS, "--student_layers")
    t_hooks = FeatureHooks(teacher, TEACHER_LAYERS, "--teacher_layers")
    parameters = [*student.parameters(), *loss.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=0.05, momentum=0.9)
    before = [p.detach().clone() for p in parameters]
    images = torch.randn(4, 3, 32, 32)
    logits = student(images)
    with torch.no_grad():
        teacher_logits = teacher(images)
    s_features, t_features = s_hooks.take(), t_hooks.take()
    assert min(t.min().item() for name, t in t_features.items() if "preact" in name) < 0  # taken before the ReLU
    for feature in s_features.values():
        feature.retain_grad()
    value = loss(logits, teacher_logits, torch.zeros(4, dtype=torch.long), student_features=s_features,
                 teacher_features=t_features, epoch=30)
    total = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long)) + value
    assert value.shape == () and torch.isfinite(value) and value.item() > 0
    total.backward()
    for feature in s_features.values():
        assert feature.grad is not None and torch.isfinite(feature.grad).all() and feature.grad.abs().sum() > 0
    for name, parameter in loss.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, \
            name
    assert all(p.grad is None for p in teacher.parameters())
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in parameters)
    assert not torch.equal(before[0], parameters[0]) and not torch.equal(before[-1], parameters[-1])
    s_hooks.remove()
    t_hooks.remove()


# ---- layers it cannot use --------------------------------------------------------------------------------------


def test_refuses_unpaired_missing_or_unshaped_layers() -> None:
    maps = {"layer1": (16, 8, 8), "layer2": (32, 4, 4)}
    with pytest.raises(KDError, match=r"--student_layers with --teacher_layers.*2 student.*1 teacher"):
        build_loss("reviewkd", student_shapes=maps, teacher_shapes={"layer1": (16, 8, 8)})
    with pytest.raises(KDError, match="give --student_layers and --teacher_layers"):
        build_loss("reviewkd", student_shapes={}, teacher_shapes={})
    with pytest.raises(KDError, match=r"--teacher_layers 'tokens' gives shape \(5, 16\) per sample"):
        build_loss("reviewkd", student_shapes={"layer1": (16, 8, 8)}, teacher_shapes={"tokens": (5, 16)})
    with pytest.raises(KDError, match=r"--student_layers 'x' gives shape \(1, 2, 3, 4\)"):
        build_loss("reviewkd", student_shapes={"x": (1, 2, 3, 4)}, teacher_shapes={"layer1": (16, 8, 8)})


def test_refuses_features_unlike_those_it_was_built_for() -> None:
    s_shapes, t_shapes = {"a": (4, 4, 4), "b": (6, 2, 2)}, {"c": (5, 4, 4), "d": (7, 2, 2)}
    loss = build_loss("reviewkd", student_shapes=s_shapes, teacher_shapes=t_shapes).double()
    student, teacher = features(s_shapes, 2, seed=0), features(t_shapes, 2, seed=5)
    with pytest.raises(KDError, match=r"built for 2 --student_layers but got 1 features \(a\)"):
        call(loss, {"a": student["a"]}, teacher)
    with pytest.raises(KDError, match=r"built for 2 --teacher_layers but got 3"):
        call(loss, student, {**teacher, "e": teacher["d"]})
    with pytest.raises(KDError, match=r"--teacher_layers 'd' gives \(2, 8, 2, 2\), but its ABF was built for "
                                      r"\(B, 7, H, W\)"):
        call(loss, student, {**teacher, "d": rand(2, 8, 2, 2, seed=9)})
    with pytest.raises(KDError, match=r"--student_layers 'a' gives \(2, 4, 4\)"):
        call(loss, {**student, "a": rand(2, 4, 4, seed=9)}, teacher)
