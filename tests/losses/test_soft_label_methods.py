"""Tests of NKD, USKD, WSLD and TF-KD against their papers' and reference code's formulas.

Each reference below is written from the paper / reference code in float64 numpy, sample by sample, with the
gradient with respect to the student's logits derived by hand, independently of kd's code.
"""

import inspect
import math

import numpy as np
import pytest
import torch

from kd.losses import LOSSES, build_loss, loss_terms
from kd.losses.base import DistillationLoss, loss_property, wanted_extras
from kd.losses.soft_labels import NKD, USKD, WSLD, VirtualTeacherKD

SHAPE = (6, 9)


def random_logits(seed, shape=SHAPE, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64) * scale


def random_labels(seed, shape=SHAPE):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(shape[1], (shape[0],), generator=generator)


def softmax(row, temperature=1.0):
    e = np.exp((row - row.max()) / temperature)
    return e / e.sum()


def one_hot(label, classes):
    row = np.zeros(classes)
    row[label] = 1.0
    return row


def close(value, expected, rtol=1e-9, atol=1e-12):
    torch.testing.assert_close(value, torch.as_tensor(expected, dtype=value.dtype), rtol=rtol, atol=atol)


def value_and_grad(loss, s, *args, **kwargs):
    """kd's terms (as a dict) and the gradient of their sum with respect to the student's logits ``s``."""
    s = s.detach().clone().requires_grad_(True)
    terms = loss_terms("loss", loss(s, *args, **kwargs))
    sum(terms.values()).backward()
    return terms, s.grad


# ---------------------------------------------------------------- NKD (Yang et al. 2023, Eq. 8)

def nkd_by_hand(student, teacher, labels, temperature, gamma, keep_target=False):
    """−T_y log S_y − γλ² Σ_{i≠y} T̂_i log Ŝ_i, T̂/Ŝ the softmax at λ of the non-target logits.

    ``keep_target``: the "non-target" softmax over all C classes, as the unfixed reference code had it.
    """
    n, c = student.shape
    target = others = 0.0
    grad = np.zeros((n, c))
    for i, (s, t, y) in enumerate(zip(student.numpy(), teacher.numpy(), labels.tolist())):
        p_s, p_t = softmax(s), softmax(t)
        target -= p_t[y] * math.log(p_s[y])
        grad[i] -= p_t[y] * (one_hot(y, c) - p_s)
        rest = list(range(c)) if keep_target else [j for j in range(c) if j != y]
        hat_s, hat_t = softmax(s[rest], temperature), softmax(t[rest], temperature)
        others -= gamma * temperature**2 * sum(q * math.log(p) for p, q in zip(hat_s, hat_t))
        grad[i, rest] += gamma * temperature * (hat_s - hat_t)
    return target / n, others / n, grad / n


@pytest.mark.parametrize("temperature, gamma", [(1.0, 1.5), (3.0, 3.5), (2.0, 0.5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_nkd_matches_paper(temperature, gamma, seed):
    s, t, y = random_logits(seed), random_logits(seed + 10), random_labels(seed + 20)
    terms, grad = value_and_grad(NKD(temperature=temperature, gamma=gamma), s, t, y)
    assert set(terms) == {"target", "non_target"}
    target, others, expected_grad = nkd_by_hand(s, t, y, temperature, gamma)
    close(terms["target"], target)
    close(terms["non_target"], others)
    close(grad, expected_grad)


def test_nkd_leaves_the_target_out_of_the_non_target_distribution():
    s, t, y = random_logits(2), random_logits(3), random_labels(4)
    loss = NKD(temperature=2.0, gamma=1.5)
    base = loss(s, t, y)["non_target"]
    rows = torch.arange(len(y))
    moved_s, moved_t = s.clone(), t.clone()
    moved_s[rows, y] += 5.0
    moved_t[rows, y] -= 7.0
    close(loss(moved_s, moved_t, y)["non_target"], base, rtol=1e-12)  # the target logits do not enter it
    assert loss(moved_s, moved_t, y)["target"] != loss(s, t, y)["target"]
    with_target = nkd_by_hand(s, t, y, 2.0, 1.5, keep_target=True)[1]  # the mask of the unfixed reference
    assert abs(base.item() - with_target) > 1e-2


def test_nkd_non_target_term_is_the_renormalised_cross_entropy_of_mdistiller_style_masking():
    """Subtracting a huge constant from the target logit removes it from the softmax: the same value."""
    s, t, y = random_logits(5), random_logits(6), random_labels(7)
    mask = torch.nn.functional.one_hot(y, SHAPE[1]).to(s.dtype)
    temperature = 3.0
    p_t = torch.softmax(t / temperature - 1e4 * mask, dim=1)
    log_s = torch.log_softmax(s / temperature - 1e4 * mask, dim=1)
    masked = -(p_t * log_s * (1 - mask)).sum(dim=1).mean() * temperature**2
    close(NKD(temperature=temperature, gamma=1.0)(s, t, y)["non_target"], masked, rtol=1e-10)


# ---------------------------------------------------------------- USKD (Yang et al. 2023, Sec. 4.2)

def features_for(seed, layers):
    """Hooked features of a batch, float64, and their per-sample shapes."""
    generator = torch.Generator().manual_seed(seed)
    features = {name: torch.randn((SHAPE[0], *shape), generator=generator, dtype=torch.float64)
                for name, shape in layers.items()}
    return features, {name: tuple(shape) for name, shape in layers.items()}


def weak_logits_by_hand(features, head):
    """The linear head on each sample's hooked features, maps averaged over space, concatenated."""
    weight, bias = head.weight.detach().numpy(), head.bias.detach().numpy()
    rows = []
    for i in range(SHAPE[0]):
        parts = [f[i].numpy().reshape(f.shape[1], -1).mean(axis=1) if f.dim() == 4 else f[i].numpy().ravel()
                 for f in features.values()]
        rows.append(weight @ np.concatenate(parts) + bias)
    return np.stack(rows)


def uskd_by_hand(student, labels, weak, alpha, beta, mu):
    """α·target + β·non-target + μ·weak, as uskd.py computes them (see USKD's docstring)."""
    n, c = student.shape
    squares = [softmax(s)[y] ** 2 for s, y in zip(student.numpy(), labels.tolist())]
    target = others = weak_ce = 0.0
    grad = np.zeros((n, c))
    for i, (s, w_logits, y) in enumerate(zip(student.numpy(), weak, labels.tolist())):
        p = softmax(s)
        v = squares[i] + 1 - np.mean(squares)
        target -= v * math.log(p[y])
        grad[i] -= alpha * v * (one_hot(y, c) - p)
        w = softmax(w_logits)
        weak_ce -= sum((0.9 * one_hot(y, c)[j] + 0.1 / c) * math.log(w[j]) for j in range(c))
        score = [w[j] / (1 - w[y] + 1e-6) + math.log(p[j]) / (1 - math.log(p[y]) + 1e-6) for j in range(c)]
        zipf = np.zeros(c)
        for position, j in enumerate(sorted(range(c), key=lambda k: -score[k])):
            zipf[j] = 1.0 / (position + 1)
        rest = [j for j in range(c) if j != y]
        z = zipf[rest] / zipf[rest].sum()
        p_rest = softmax(s[rest])
        others -= sum(zj * math.log(pj) for zj, pj in zip(z, p_rest))
        grad[i, rest] += beta * (p_rest - z)
    return alpha * target / n, beta * others / n, mu * weak_ce / n, grad / n


LAYERS = [{"layer3": (6, 3, 3)}, {"layer2": (4, 5, 5), "pooled": (3,)}]


@pytest.mark.parametrize("alpha, beta, mu", [(1.0, 0.1, 0.005), (0.1, 0.1, 0.1), (0.5, 1.0, 0.05)])
@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_uskd_matches_reference(alpha, beta, mu, layers, seed):
    s, y = random_logits(seed), random_labels(seed + 20)
    features, shapes = features_for(seed + 30, layers)
    torch.manual_seed(seed)
    loss = USKD(num_classes=SHAPE[1], student_shapes=shapes, alpha=alpha, beta=beta, mu=mu).double()
    terms, grad = value_and_grad(loss, s, None, y, student_features=features)
    assert set(terms) == {"target", "non_target", "weak"}
    target, others, weak, expected_grad = uskd_by_hand(s, y, weak_logits_by_hand(features, loss.head),
                                                       alpha, beta, mu)
    close(terms["target"], target)
    close(terms["non_target"], others)
    close(terms["weak"], weak)
    close(grad, expected_grad)


def test_uskd_trains_its_head_and_the_hooked_features():
    s, y = random_logits(40), random_labels(41)
    features, shapes = features_for(42, LAYERS[1])
    features = {name: f.requires_grad_(True) for name, f in features.items()}
    loss = USKD(num_classes=SHAPE[1], student_shapes=shapes).double()
    assert {name for name, _ in loss.named_parameters()} == {"head.weight", "head.bias"}
    assert loss.head.in_features == 4 + 3
    sum(loss(s, None, y, student_features=features).values()).backward()
    for tensor in [*features.values(), loss.head.weight, loss.head.bias]:
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_uskd_needs_a_hooked_feature():
    with pytest.raises(ValueError, match="--student_layers"):
        USKD(num_classes=SHAPE[1], student_shapes={})


# ---------------------------------------------------------------- WSLD (Zhou et al. 2021)

def wsld_by_hand(student, teacher, labels, temperature):
    """T² · mean of (1 − exp(−CE_s / (CE_t + 1e-7))) · H(softmax(t/T), softmax(s/T)), the weight held fixed."""
    n, c = student.shape
    value = 0.0
    grad = np.zeros((n, c))
    for i, (s, t, y) in enumerate(zip(student.numpy(), teacher.numpy(), labels.tolist())):
        p_s, p_t = softmax(s, temperature), softmax(t, temperature)
        ce_s, ce_t = -math.log(softmax(s)[y]), -math.log(softmax(t)[y])
        weight = 1 - math.exp(-max(ce_s / (ce_t + 1e-7), 0.0))
        value += temperature**2 * weight * -sum(q * math.log(p) for p, q in zip(p_s, p_t))
        grad[i] = temperature * weight * (p_s - p_t)
    return value / n, grad / n


@pytest.mark.parametrize("temperature", [2.0, 4.0, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_wsld_matches_reference(temperature, seed):
    s, t, y = random_logits(seed), random_logits(seed + 10), random_labels(seed + 20)
    terms, grad = value_and_grad(WSLD(temperature=temperature, num_classes=SHAPE[1]), s, t, y)
    value, expected_grad = wsld_by_hand(s, t, y, temperature)
    close(terms["loss"], value)
    close(grad, expected_grad)


def test_wsld_weighs_down_samples_the_student_already_fits_better():
    """A student far more confident on the label than the teacher: weight near 0; far less: near 1."""
    y = torch.tensor([0, 0])
    t = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    s = torch.tensor([[20.0, 0.0, 0.0], [-20.0, 0.0, 0.0]], dtype=torch.float64)
    loss = WSLD(temperature=1.0)
    fit, misfit = loss(s[:1], t[:1], y[:1]), loss(s[1:], t[1:], y[1:])
    soft = [-(torch.softmax(t[i], 0) * torch.log_softmax(s[i], 0)).sum() for i in range(2)]
    assert fit < 1e-6 * soft[0]
    close(misfit, soft[1], rtol=1e-6)


def test_wsld_checks_the_class_count():
    s, t, y = random_logits(3), random_logits(4), random_labels(5)
    close(WSLD(num_classes=None)(s, t, y), WSLD(num_classes=SHAPE[1])(s, t, y), rtol=0)
    with pytest.raises(ValueError, match="9 classes, the run 1000"):
        WSLD(num_classes=1000)(s, t, y)


# ---------------------------------------------------------------- TF-KD virtual teacher (Yuan et al. 2020)

def tf_kd_by_hand(student, labels, temperature, correct_prob):
    """KL(softmax(u/T) ‖ softmax(s)) per sample, u = correct_prob on the label, (1 − correct_prob)/(C − 1) elsewhere."""
    n, c = student.shape
    value = 0.0
    grad = np.zeros((n, c))
    for i, (s, y) in enumerate(zip(student.numpy(), labels.tolist())):
        u = np.full(c, (1 - correct_prob) / (c - 1))
        u[y] = correct_prob
        q, p = softmax(u, temperature), softmax(s)
        value += sum(qj * math.log(qj / pj) for qj, pj in zip(q, p))
        grad[i] = p - q
    return value / n, grad / n


@pytest.mark.parametrize("temperature, correct_prob", [(20.0, 0.99), (10.0, 0.9), (40.0, 0.95), (1.0, 0.6)])
@pytest.mark.parametrize("seed", [0, 1])
def test_tf_kd_matches_reference(temperature, correct_prob, seed):
    s, y = random_logits(seed), random_labels(seed + 20)
    loss = VirtualTeacherKD(temperature=temperature, correct_prob=correct_prob)
    terms, grad = value_and_grad(loss, s, None, y)
    value, expected_grad = tf_kd_by_hand(s, y, temperature, correct_prob)
    close(terms["loss"], value)
    close(grad, expected_grad)


def test_tf_kd_is_zero_at_the_virtual_teachers_distribution():
    y = random_labels(6)
    u = torch.full(SHAPE, 0.1 / (SHAPE[1] - 1), dtype=torch.float64).scatter_(1, y.reshape(-1, 1), 0.9)
    close(VirtualTeacherKD(temperature=10.0, correct_prob=0.9)(u / 10.0 + 3.0, None, y), 0.0, atol=1e-12)


# ---------------------------------------------------------------- common to all four

CLASSES = {"nkd": NKD, "uskd": USKD, "wsld": WSLD, "tf_kd": VirtualTeacherKD}
DEFAULTS = {"nkd": {"temperature": 1.0, "gamma": 1.5}, "uskd": {"alpha": 1.0, "beta": 0.1, "mu": 0.005},
            "wsld": {"temperature": 2.0, "num_classes": None}, "tf_kd": {"temperature": 20.0, "correct_prob": 0.99}}
WEIGHTS = {"nkd": (1.0, 1.0), "uskd": (1.0, 1.0), "wsld": (2.5, 1.0), "tf_kd": (0.1, 0.9)}
SHAPES = {"layer3": (6, 3, 3)}


@pytest.mark.parametrize("name", list(CLASSES))
def test_registered_built_with_the_runs_settings_and_papers_defaults(name):
    assert LOSSES.get(name) is CLASSES[name]
    loss = build_loss(name, temperature=3.0, num_classes=SHAPE[1], student_shapes=SHAPES, unused="x")
    assert isinstance(loss, CLASSES[name]) and isinstance(loss, DistillationLoss)
    if "temperature" in DEFAULTS[name]:
        assert loss.temperature == 3.0
    if name == "wsld":
        assert loss.num_classes == SHAPE[1]
    if name == "uskd":
        assert loss.head.out_features == SHAPE[1] and loss.head.in_features == 6
    parameters = inspect.signature(CLASSES[name]).parameters
    assert {key: parameters[key].default for key in DEFAULTS[name]} == DEFAULTS[name]
    assert (loss_property(loss, "weight"), loss_property(loss, "ce_weight")) == WEIGHTS[name]


@pytest.mark.parametrize("name", list(CLASSES))
def test_space_holds_the_defaults(name):
    cls = CLASSES[name]
    values = {"weight": cls.weight, "ce_weight": cls.ce_weight} | DEFAULTS[name]
    assert {"weight", "ce_weight"} <= set(cls.space)
    for key, bounds in cls.space.items():
        assert bounds.low < bounds.high and bounds.low <= values[key] <= bounds.high, f"{name}.{key}"


def test_teacher_free_methods_say_so_and_ignore_the_teacher():
    assert [loss_property(CLASSES[name], "needs_teacher") for name in CLASSES] == [True, False, True, False]
    s, y = random_logits(50), random_labels(51)
    features, shapes = features_for(52, SHAPES)
    loss = USKD(num_classes=SHAPE[1], student_shapes=shapes).double()
    for key, value in loss(s, None, y, student_features=features).items():
        close(loss(s, random_logits(53), y, student_features=features)[key], value, rtol=0)
    close(VirtualTeacherKD()(s, random_logits(54), y), VirtualTeacherKD()(s, None, y), rtol=0)


def test_only_uskd_asks_for_features():
    assert wanted_extras(USKD(num_classes=SHAPE[1], student_shapes=SHAPES)) == ("student_features",)
    assert all(wanted_extras(CLASSES[name]()) == () for name in ["nkd", "wsld", "tf_kd"])
    assert [loss_property(CLASSES[name], "features") for name in CLASSES] == [False, True, False, False]


@pytest.mark.parametrize("name", list(CLASSES))
def test_float32_gives_finite_scalars(name):
    s = random_logits(60).float().requires_grad_(True)
    t, y = random_logits(61).float(), random_labels(62)
    features = {"layer3": torch.randn(SHAPE[0], 6, 3, 3)}
    loss = build_loss(name, num_classes=SHAPE[1], student_shapes=SHAPES)
    extras = {"student_features": features} if name == "uskd" else {}
    terms = loss_terms(name, loss(s, t, y, **extras))
    for value in terms.values():
        assert value.shape == () and value.dtype == torch.float32 and torch.isfinite(value)
    sum(terms.values()).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
