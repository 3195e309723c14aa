"""Tests of self_distill, BYOT (Zhang et al., ICCV 2019), against the reference's formula.

The reference value is computed in float64 from the formula with the branches written out as plain tensor algebra
(1×1 convs as matrix products, the strided conv as a product over non-overlapping patches, BatchNorm from the
batch's statistics), with the branches' weights copied in; its gradients come from autograd on that computation.
"""

from __future__ import annotations

import pytest
import torch

from conftest import FAST
from kd.cli import main
from kd.losses import LOSSES, build_loss, loss_terms
from kd.losses.base import DistillationLoss, loss_property, wanted_extras
from kd.losses.self_distill import SelfDistillation
from kd.models.build import build_model

BATCH, CLASSES = 6, 5
# Two shallow stages and the deepest feature: a map (strides 4 and 2), a pooled map and a vector (stride 1).
LAYERS = {
    "map": {"stage1": (3, 8, 8), "stage2": (4, 4, 4), "stage3": (8, 2, 2)},
    "pooled": {"stage1": (3, 8, 8), "stage2": (4, 4, 4), "pool": (8, 1, 1)},
    "vector": {"stage1": (3, 6, 6), "flat": (12,)},
}
STRIDES = {"map": [4, 2], "pooled": [1, 1], "vector": [1]}


def batch(seed: int, layers: dict[str, tuple[int, ...]]):
    """float64 logits, labels and hooked features (the deepest with negative entries, so the hint's mask binds)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(BATCH, CLASSES, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(CLASSES, (BATCH,), generator=generator)
    features = {name: torch.randn((BATCH, *shape), generator=generator, dtype=torch.float64)
                for name, shape in layers.items()}
    return logits, labels, features


def built(layers: dict[str, tuple[int, ...]], seed: int = 0, **settings) -> SelfDistillation:
    """The loss in float64 with random BatchNorm affines and conv biases (their defaults hide mistakes)."""
    torch.manual_seed(seed)
    loss = SelfDistillation(num_classes=CLASSES, student_shapes=layers, **settings).double()
    with torch.no_grad():
        for module in loss.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.Conv2d)):
                module.bias.normal_(0.0, 0.3)
    return loss


def copied(loss: SelfDistillation) -> list[list[torch.Tensor]]:
    """Each branch's parameters, in order, as independent leaves."""
    return [[p.detach().clone().requires_grad_(True) for p in branch.parameters()] for branch in loss.branches]


def batch_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Training-mode BatchNorm: the batch's mean and biased variance per channel."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    variance = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps) * gamma.reshape(1, -1, 1, 1) + beta.reshape(1, -1, 1, 1)


def branch_by_hand(x: torch.Tensor, params: list[torch.Tensor], stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1×1 conv, BN, ReLU, k×k conv of stride k, BN, ReLU, 1×1 conv, BN, ReLU; mean over space; linear."""
    w1, b1, g1, c1, w2, b2, g2, c2, w3, b3, g3, c3, fc_w, fc_b = params
    h = torch.einsum("bchw,oc->bohw", x, w1[:, :, 0, 0]) + b1.reshape(1, -1, 1, 1)
    h = batch_norm(h, g1, c1).clamp(min=0)
    rows, cols = h.shape[2] // stride, h.shape[3] // stride
    patches = h[:, :, :rows * stride, :cols * stride].reshape(h.shape[0], h.shape[1], rows, stride, cols, stride)
    h = torch.einsum("bcikjl,ockl->boij", patches, w2) + b2.reshape(1, -1, 1, 1)
    h = batch_norm(h, g2, c2).clamp(min=0)
    h = torch.einsum("bchw,oc->bohw", h, w3[:, :, 0, 0]) + b3.reshape(1, -1, 1, 1)
    feature = batch_norm(h, g3, c3).clamp(min=0).mean(dim=(2, 3))
    return feature, feature @ fc_w.T + fc_b


def log_softmax(z: torch.Tensor) -> torch.Tensor:
    shifted = z - z.max(dim=1, keepdim=True).values
    return shifted - torch.log(torch.exp(shifted).sum(dim=1, keepdim=True))


def byot_by_hand(logits, labels, features, params, strides, temperature, alpha, beta):
    """α·T²·Σᵢ mean KL(p_T ‖ q_T,i), β·Σᵢ mean Σ_c (fᵢ − g)²·[fᵢ>0 ∨ g>0], (1 − α)·Σᵢ CE(zᵢ, y); the deepest
    side (p from the logits, g the deepest feature averaged over space) taken as constants. Also returns the
    reference's soft term, a cross-entropy −Σ p log q."""
    *stages, deepest = features.values()
    p = torch.exp(log_softmax(logits.detach() / temperature))
    g = deepest.detach()
    g = g.mean(dim=(2, 3)) if g.dim() == 4 else g.reshape(g.shape[0], -1)
    soft = hint = aux = cross = 0.0
    for stage, branch_params, stride in zip(stages, params, strides):
        f, z = branch_by_hand(stage, branch_params, stride)
        log_q = log_softmax(z / temperature)
        soft = soft + (p * (torch.log(p) - log_q)).sum(dim=1).mean()
        cross = cross - (p * log_q).sum(dim=1).mean()
        mask = ((f > 0) | (g > 0)).double()
        hint = hint + ((f - g) ** 2 * mask).sum(dim=1).mean()
        aux = aux - log_softmax(z)[torch.arange(len(labels)), labels].mean()
    return ({"soft": alpha * temperature**2 * soft, "hint": beta * hint, "aux_ce": (1 - alpha) * aux},
            alpha * temperature**2 * cross)


def leaves(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: f.detach().clone().requires_grad_(True) for name, f in features.items()}


@pytest.mark.parametrize("temperature, alpha, beta", [(3.0, 0.1, 1.28e-4), (4.0, 0.3, 0.05), (1.0, 0.7, 1.0)])
@pytest.mark.parametrize("layout", list(LAYERS))
def test_value_and_gradients_match_the_formula_in_float64(layout, temperature, alpha, beta):
    layers = LAYERS[layout]
    logits, labels, features = batch(1, layers)
    loss = built(layers, temperature=temperature, alpha=alpha, beta=beta)
    assert [branch.bottleneck[3].stride[0] for branch in loss.branches] == STRIDES[layout]
    params = copied(loss)

    mine = leaves(features)
    terms = loss_terms("self_distill", loss(logits, None, labels, student_features=mine))
    theirs = leaves(features)
    expected, cross = byot_by_hand(logits, labels, theirs, params, STRIDES[layout], temperature, alpha, beta)
    assert set(terms) == {"soft", "hint", "aux_ce"}
    for name in terms:
        torch.testing.assert_close(terms[name], expected[name], rtol=1e-10, atol=1e-12)
    sum(terms.values()).backward()
    sum(expected.values()).backward()
    for name in layers:
        if mine[name].grad is None:  # the deepest feature: the teacher side, detached
            assert theirs[name].grad is None
        else:
            torch.testing.assert_close(mine[name].grad, theirs[name].grad, rtol=1e-9, atol=1e-12)
    for branch, branch_params in zip(loss.branches, params):
        for p, q in zip(branch.parameters(), branch_params):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
    # The reference's soft term is a cross-entropy: the KL plus α·T²·Σᵢ H(p), a constant of the branches.
    p = torch.softmax(logits / temperature, dim=1)
    entropy = -(p * torch.log(p)).sum(dim=1).mean()
    torch.testing.assert_close(cross - terms["soft"], alpha * temperature**2 * len(loss.branches) * entropy)


def test_branches_train_and_the_deepest_outputs_are_the_teacher():
    """The branches and the shallow stages get gradients; the network's logits and deepest feature none (the
    reference detaches both), so its own classifier learns from kd's label CE alone."""
    layers = LAYERS["map"]
    logits, labels, features = batch(2, layers)
    logits.requires_grad_(True)
    features = leaves(features)
    loss = built(layers)
    assert len(loss.branches) == 2 and loss.branches[0].classifier.in_features == 8
    assert loss.branches[0].bottleneck[0].out_channels == 2  # the width's quarter, as branchBottleNeck
    sum(loss(logits, None, labels, student_features=features).values()).backward()
    for name, parameter in loss.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert features["stage1"].grad.abs().sum() > 0 and features["stage2"].grad.abs().sum() > 0
    assert logits.grad is None and features["stage3"].grad is None


def test_a_branch_matching_the_deepest_classifier_has_no_soft_loss():
    """KL, not the reference's cross-entropy: zero where a branch's softened output is the deepest one's."""
    layers = LAYERS["vector"]
    logits, labels, features = batch(3, layers)
    loss = built(layers)
    with torch.no_grad():
        _, branch_logits = loss.branches[0](features["stage1"])
    torch.testing.assert_close(loss(branch_logits, None, labels, student_features=features)["soft"],
                               torch.zeros((), dtype=torch.float64), atol=1e-12, rtol=0)


def test_registered_with_the_references_defaults():
    assert LOSSES.get("self_distill") is SelfDistillation
    loss = build_loss("self_distill", temperature=4.0, num_classes=CLASSES, student_shapes=LAYERS["map"], unused=1)
    assert isinstance(loss, DistillationLoss) and loss.temperature == 4.0
    default = SelfDistillation(num_classes=CLASSES, student_shapes=LAYERS["map"])
    assert (default.temperature, default.alpha, default.beta) == (3.0, 0.1, 1.28e-4)
    assert (loss_property(loss, "weight"), loss_property(loss, "ce_weight")) == (1.0, 0.9)
    assert loss_property(loss, "features") and not loss_property(loss, "needs_teacher")
    assert wanted_extras(loss) == ("student_features",)
    values = {"weight": 1.0, "ce_weight": 0.9, "temperature": 3.0, "alpha": 0.1, "beta": 1.28e-4}
    assert set(SelfDistillation.space) == set(values)
    for key, bounds in SelfDistillation.space.items():
        assert bounds.low < bounds.high and bounds.low <= values[key] <= bounds.high, key


def test_float32_ignores_the_teacher_and_gives_finite_scalars():
    layers = LAYERS["pooled"]
    logits, labels, features = batch(4, layers)
    loss = SelfDistillation(num_classes=CLASSES, student_shapes=layers)
    features = {name: f.float() for name, f in features.items()}
    terms = loss(logits.float(), None, labels, student_features=features)
    other = loss(logits.float(), torch.randn(BATCH, CLASSES), labels, student_features=features)
    for name, value in terms.items():
        assert value.dtype == torch.float32 and torch.isfinite(value) and value.shape == ()
        torch.testing.assert_close(other[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("layers, message", [
    ({}, "at least two --student_layers, got 0"),
    ({"layer4": (8, 2, 2)}, "at least two --student_layers, got 1"),
    ({"fc_in": (12,), "pool": (8, 1, 1)}, "'fc_in' has shape (12,), not a (C, H, W) map"),
])
def test_refuses_layers_it_cannot_use(layers, message):
    with pytest.raises(ValueError, match=r"--student_layers") as raised:
        SelfDistillation(num_classes=CLASSES, student_shapes=layers)
    assert message in str(raised.value)


def test_one_student_layer_is_refused_in_one_line(tiny_data, tmp_path, capsys):
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--distill", "--kd_loss",
                 "self_distill", "--student_layers", "features.7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "self_distill needs at least two --student_layers, got 1" in err
    assert not any(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
def test_distils_without_a_teacher_and_delivers_the_student_alone(tiny_data, tmp_path):
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--distill", "--kd_loss",
                 "self_distill", "--student_layers", "features.3", "features.7"]) == 0
    best = next((tmp_path / "kd" / "distill").rglob("best.ckpt"))
    state = torch.load(best, weights_only=True)["state_dict"]
    network = {key.removeprefix("model.") for key in state if key.startswith("model.")}
    assert network == set(build_model("cnn_tiny", 12).state_dict())  # no branch weights in the network
    assert any(key.startswith("objective.losses.self_distill.branches.") for key in state)  # kept beside it
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "eval"),
                 "--evaluate", str(best)]) == 0
