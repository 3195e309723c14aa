"""MLKD against its formula, written here in float64 numpy, sample by sample, apart from kd's code.

The formula is the one Jin-Ying/Multi-Level-Logit-Distillation's ``KD_ours.forward_train`` computes (see
:class:`kd.losses.multilevel.MLKD`): instance KL terms at temperatures (τ, 3, 5, 2, 6) on the weak view and (τ, 3, 5)
on the strong one, batch and class Gram gaps on the weak view, the weak-view terms scaled by the share of samples
(or classes) at or below the median teacher confidence, and the strong view's CE. Its gradient is derived by hand
below and checked against central differences of the numpy value, so value and gradient are both independent.
"""

import math

import numpy as np
import pytest
import torch

from kd.errors import KDError
from kd.losses.base import LOSSES, DistillationLoss, build_loss, loss_property
from kd.losses.multilevel import MLKD

TAU, CE_WEIGHT, KD_WEIGHT = 4.0, 0.1, 0.9  # mdistiller/engine/cfg.py: KD.TEMPERATURE, KD.LOSS.CE_WEIGHT, KD_WEIGHT
WEAK_TS = (TAU, 3.0, 5.0, 2.0, 6.0)  # the weak view's temperatures, in the reference's order
STRONG_TS = (TAU, 3.0, 5.0)  # the strong view's; the reference's "strong" sum adds 2 and 6 on the weak view
EXTRA_WEAK_TS = (2.0, 6.0)
VALUE_RTOL, GRAD_ATOL = 1e-12, 1e-12


def random_array(seed, shape, scale=3.0):
    return np.random.default_rng(seed).standard_normal(shape) * scale


def softmax_rows(z, t=1.0):
    out = np.empty_like(z)
    for i, row in enumerate(z):
        e = np.exp((row - row.max()) / t)
        out[i] = e / e.sum()
    return out


def median_share(values):
    """Share of ``values`` at or below the median (the mean of the two middle values of an even count)."""
    ordered = sorted(values)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return sum(v <= median for v in values) / n


def shares(tw):
    """(m, c): samples whose largest teacher probability, and classes whose summed teacher probability, are at or
    below their median."""
    p = softmax_rows(tw)
    return median_share([row.max() for row in p]), median_share(list(p.sum(axis=0)))


def kl_term(zs, zt, t):
    """T² · mean over samples of KL(softmax(zt/T) ‖ softmax(zs/T))."""
    ps, pt = softmax_rows(zs, t), softmax_rows(zt, t)
    per_sample = [sum(pt[i, k] * math.log(pt[i, k] / ps[i, k]) for k in range(zs.shape[1])) for i in range(len(zs))]
    return t**2 * sum(per_sample) / len(zs)


def batch_term(zs, zt, t):
    """Σ_ij (⟨p_t,i, p_t,j⟩ − ⟨p_s,i, p_s,j⟩)² / B."""
    ps, pt = softmax_rows(zs, t), softmax_rows(zt, t)
    b = len(zs)
    return sum((pt[i] @ pt[j] - ps[i] @ ps[j]) ** 2 for i in range(b) for j in range(b)) / b


def class_term(zs, zt, t):
    """Σ_kl (⟨p_t,:k, p_t,:l⟩ − ⟨p_s,:k, p_s,:l⟩)² / K, the inner products over the batch."""
    ps, pt = softmax_rows(zs, t), softmax_rows(zt, t)
    k = zs.shape[1]
    return sum((pt[:, a] @ pt[:, c] - ps[:, a] @ ps[:, c]) ** 2 for a in range(k) for c in range(k)) / k


def cross_entropy(z, y):
    return -sum(math.log(softmax_rows(z[i:i + 1])[0, y[i]]) for i in range(len(z))) / len(z)


def mlkd_by_hand(sw, ss, tw, ts, y, strong_ce=CE_WEIGHT / KD_WEIGHT):
    """The four terms of MLKD from the formula, at the reference's temperatures."""
    m, c = shares(tw)
    instance = (m * sum(kl_term(sw, tw, t) for t in WEAK_TS) + sum(kl_term(ss, ts, t) for t in STRONG_TS)
                + sum(kl_term(sw, tw, t) for t in EXTRA_WEAK_TS))
    return {"instance": instance, "batch": m * sum(batch_term(sw, tw, t) for t in WEAK_TS),
            "class": c * sum(class_term(sw, tw, t) for t in WEAK_TS), "ce_strong": strong_ce * cross_entropy(ss, y)}


def softmax_backward(z, t, grad_p):
    """The gradient w.r.t. z of a function of p = softmax(z/T), from its gradient w.r.t. p."""
    p = softmax_rows(z, t)
    return p * (grad_p - (p * grad_p).sum(axis=1, keepdims=True)) / t


def mlkd_gradient_by_hand(sw, ss, tw, ts, y, strong_ce=CE_WEIGHT / KD_WEIGHT):
    """d(Σ terms)/d(sw) and d(Σ terms)/d(ss), derived by hand.

    d[T²·KL_T]/dz = T·(p_s − p_t)/B; for ‖S − A‖²/B with S = PPᵀ the gradient w.r.t. P is 4(S − A)P/B, for
    ‖S − A‖²/K with S = PᵀP it is 4P(S − A)/K; d CE/dz = (softmax(z) − onehot)/B.
    """
    m, c = shares(tw)
    b, k = sw.shape
    g_w, g_s = np.zeros_like(sw), np.zeros_like(ss)
    for t in WEAK_TS:
        ps, pt = softmax_rows(sw, t), softmax_rows(tw, t)
        g_w += m * t * (ps - pt) / b
        g_w += m * softmax_backward(sw, t, 4 * (ps @ ps.T - pt @ pt.T) @ ps / b)
        g_w += c * softmax_backward(sw, t, 4 * ps @ (ps.T @ ps - pt.T @ pt) / k)
    for t in EXTRA_WEAK_TS:
        g_w += t * (softmax_rows(sw, t) - softmax_rows(tw, t)) / b
    for t in STRONG_TS:
        g_s += t * (softmax_rows(ss, t) - softmax_rows(ts, t)) / b
    g_s += strong_ce * (softmax_rows(ss) - np.eye(k)[y]) / b
    return g_w, g_s


def numeric_gradient(function, x, h=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += h
        down[index] -= h
        grad[index] = (function(up) - function(down)) / (2 * h)
    return grad


def tied_teacher(rows=(1.0, 2.0, 3.0, 3.0, 3.0, 4.0, 5.0, 6.0), columns=(0.0, 0.7, 0.7, 0.7, 1.2)):
    """Teacher logits whose confidences and class sums tie at their medians: class 0 leads each row by its
    row's value plus 5, the other classes take fixed column values, so equal rows (or columns) are equal bit for bit.
    Confidences 1, 2, 3, 3, 3, 4, 5, 6 (in order): median 3, five of eight at or below it; class sums s₁ < s₂ = s₃ =
    s₄ < s₅ < s₀: median s₂, four of six at or below it."""
    return np.array([[r + 5.0, *columns] for r in rows])


def case(name):
    """(student weak, student strong, teacher weak, teacher strong, labels) of a named test case."""
    if name == "tied":
        tw = tied_teacher()
        b, k = tw.shape
        return random_array(1, (b, k)), random_array(2, (b, k)), tw, random_array(3, (b, k)), np.arange(b) % k
    b, k, seed = {"odd": (9, 10, 10), "wide": (12, 40, 20)}[name]
    tw = random_array(seed + 3, (b, k))
    if name == "wide":  # repeated teacher rows and columns: ties in confidence and in class sums
        tw[4], tw[7], tw[:, 5], tw[:, 9] = tw[1], tw[1], tw[:, 2], tw[:, 2]
    labels = np.random.default_rng(seed + 5).integers(k, size=b)
    return (random_array(seed, (b, k)), random_array(seed + 1, (b, k)), tw, random_array(seed + 2, (b, k)), labels)


def kd_terms(sw, ss, tw, ts, y, **settings):
    """MLKD's terms in float64, and the leaves of the student's two views."""
    leaves = [torch.tensor(sw, requires_grad=True), torch.tensor(ss, requires_grad=True)]
    terms = MLKD(**settings)(leaves[0], torch.tensor(tw), torch.tensor(y),
                             strong_view=(leaves[1], torch.tensor(ts)))
    return terms, leaves


@pytest.mark.parametrize("name", ["tied", "odd", "wide"])
def test_value_and_gradient_match_the_formula_at_the_reference_defaults(name):
    sw, ss, tw, ts, y = case(name)
    terms, (leaf_w, leaf_s) = kd_terms(sw, ss, tw, ts, y)
    expected = mlkd_by_hand(sw, ss, tw, ts, y)
    assert set(terms) == set(expected)
    for key, value in expected.items():
        assert terms[key].dtype == torch.float64
        torch.testing.assert_close(terms[key].detach(), torch.tensor(value, dtype=torch.float64),
                                   rtol=VALUE_RTOL, atol=1e-14, msg=f"{name}: {key}")
    sum(terms.values()).backward()
    g_w, g_s = mlkd_gradient_by_hand(sw, ss, tw, ts, y)
    torch.testing.assert_close(leaf_w.grad, torch.from_numpy(g_w), rtol=0, atol=GRAD_ATOL)
    torch.testing.assert_close(leaf_s.grad, torch.from_numpy(g_s), rtol=0, atol=GRAD_ATOL)


def test_the_hand_gradient_is_the_formulas():
    """The hand-derived gradient agrees with central differences of the numpy value (masks are constants)."""
    sw, ss, tw, ts, y = case("tied")
    g_w, g_s = mlkd_gradient_by_hand(sw, ss, tw, ts, y)
    numeric_w = numeric_gradient(lambda x: sum(mlkd_by_hand(x, ss, tw, ts, y).values()), sw)
    numeric_s = numeric_gradient(lambda x: sum(mlkd_by_hand(sw, x, tw, ts, y).values()), ss)
    np.testing.assert_allclose(g_w, numeric_w, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(g_s, numeric_s, rtol=1e-6, atol=1e-8)


def test_the_masks_scale_by_their_shares_with_ties_counted():
    """The tied teacher gives m = 5/8 and c = 4/6; an odd batch of distinct confidences gives (B + 1)/2B."""
    assert shares(tied_teacher()) == (5 / 8, 4 / 6)
    sw, ss, tw, ts, y = case("tied")
    terms, _ = kd_terms(sw, ss, tw, ts, y)
    batch = sum(batch_term(sw, tw, t) for t in WEAK_TS)
    classes = sum(class_term(sw, tw, t) for t in WEAK_TS)
    torch.testing.assert_close(terms["batch"].item(), 5 / 8 * batch, rtol=VALUE_RTOL, atol=0)
    torch.testing.assert_close(terms["class"].item(), 4 / 6 * classes, rtol=VALUE_RTOL, atol=0)
    assert shares(case("odd")[2])[0] == 5 / 9


def test_kd_total_at_the_reference_weights_is_the_references_total():
    """ce_weight·CE(weak) + weight·Σ terms = 0.1·(CE(weak) + CE(strong)) + 0.9·(instance + batch + class)."""
    sw, ss, tw, ts, y = case("odd")
    terms, _ = kd_terms(sw, ss, tw, ts, y)
    weight, ce_weight = loss_property(MLKD, "weight"), loss_property(MLKD, "ce_weight")
    assert (weight, ce_weight) == (KD_WEIGHT, CE_WEIGHT)
    kd_total = ce_weight * cross_entropy(sw, y) + weight * sum(v.item() for v in terms.values())
    hand = mlkd_by_hand(sw, ss, tw, ts, y)
    reference = (CE_WEIGHT * (cross_entropy(sw, y) + cross_entropy(ss, y))
                 + KD_WEIGHT * (hand["instance"] + hand["batch"] + hand["class"]))
    assert kd_total == pytest.approx(reference, rel=1e-12)


def test_other_temperature_and_strong_ce():
    """τ replaces only the first temperature (3, 5, 2 and 6 stay, as in the reference); strong_ce scales the CE."""
    sw, ss, tw, ts, y = case("odd")
    terms, _ = kd_terms(sw, ss, tw, ts, y, temperature=1.0, strong_ce=1.0)
    m, c = shares(tw)
    weak_ts, strong_ts = (1.0, 3.0, 5.0, 2.0, 6.0), (1.0, 3.0, 5.0)
    instance = (m * sum(kl_term(sw, tw, t) for t in weak_ts) + sum(kl_term(ss, ts, t) for t in strong_ts)
                + sum(kl_term(sw, tw, t) for t in EXTRA_WEAK_TS))
    expected = {"instance": instance, "batch": m * sum(batch_term(sw, tw, t) for t in weak_ts),
                "class": c * sum(class_term(sw, tw, t) for t in weak_ts), "ce_strong": cross_entropy(ss, y)}
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value, rel=VALUE_RTOL), key


def test_float32_matches_float64():
    sw, ss, tw, ts, y = case("wide")
    loss = MLKD()
    single = loss(*(torch.tensor(a, dtype=torch.float32) for a in (sw, tw)), torch.tensor(y),
                  strong_view=(torch.tensor(ss, dtype=torch.float32), torch.tensor(ts, dtype=torch.float32)))
    double, _ = kd_terms(sw, ss, tw, ts, y)
    for key, value in double.items():
        assert single[key].dtype == torch.float32
        torch.testing.assert_close(single[key].double(), value.detach(), rtol=1e-5, atol=1e-6)


def test_the_teacher_gets_no_gradient():
    sw, ss, tw, ts, y = case("odd")
    teacher = [torch.tensor(tw, requires_grad=True), torch.tensor(ts, requires_grad=True)]
    terms = MLKD()(torch.tensor(sw, requires_grad=True), teacher[0], torch.tensor(y),
                   strong_view=(torch.tensor(ss, requires_grad=True), teacher[1]))
    sum(terms.values()).backward()
    assert all(t.grad is None for t in teacher)


def test_registered_with_the_references_defaults_and_a_space_holding_them():
    assert LOSSES.get("mlkd") is MLKD and issubclass(MLKD, DistillationLoss)
    loss = build_loss("mlkd", temperature=3.0, num_classes=10, unused="x")
    assert isinstance(loss, MLKD) and loss.temperature == 3.0 and loss.temperatures == (3.0, 3.0, 5.0, 2.0, 6.0)
    default = MLKD()
    assert default.temperature == TAU and default.strong_ce == pytest.approx(CE_WEIGHT / KD_WEIGHT)
    values = {"weight": MLKD.weight, "ce_weight": MLKD.ce_weight, "temperature": TAU, "strong_ce": default.strong_ce}
    assert set(MLKD.space) == set(values)
    for key, bounds in MLKD.space.items():
        assert bounds.low < bounds.high and bounds.low <= values[key] <= bounds.high, key


def test_refuses_a_missing_or_mismatched_strong_view():
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.arange(4)
    with pytest.raises(KDError, match="strongly augmented view"):
        MLKD()(s, t, y)
    with pytest.raises(KDError, match="must have the weak view's shape"):
        MLKD()(s, t, y, strong_view=(torch.randn(3, 5), torch.randn(3, 5)))


def test_a_batch_of_one_is_finite():
    s, t = torch.randn(1, 5, requires_grad=True), torch.randn(1, 5)
    terms = MLKD()(s, t, torch.tensor([2]), strong_view=(torch.randn(1, 5), torch.randn(1, 5)))
    total = sum(terms.values())
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(s.grad).all()
