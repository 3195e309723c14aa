"""Tests of the logit-based methods DKD, DIST and logit standardisation against their papers' formulas.

Each reference below is written from the paper in float64 numpy, sample by sample, independently of kd's code.
"""

import math

import numpy as np
import pytest
import torch

from kd.losses import LOSSES, build_loss, loss_terms
from kd.losses.base import DistillationLoss, loss_property, wanted_extras
from kd.losses.logits import DIST, DKD, KLSoftmax, LogitStandardization, MSELogits, kl_softmax, pearson_correlation

TEMPERATURES = [1.0, 2.0, 4.0]
NEW = ["dkd", "dist", "logit_std"]


def random_logits(seed, shape=(5, 7), scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64) * scale


def random_labels(seed, shape=(5, 7)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(shape[1], (shape[0],), generator=generator)


def softmax(row, temperature=1.0):
    e = np.exp((row - row.max()) / temperature)
    return e / e.sum()


def kl(p, q):
    """KL(p || q) of two discrete distributions, Σ p log(p / q)."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def close(value, expected, rtol=1e-5, atol=1e-10):
    torch.testing.assert_close(value, torch.as_tensor(expected, dtype=value.dtype), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- DKD (Zhao et al. 2022)

def dkd_by_hand(student, teacher, labels, temperature, alpha=1.0, beta=8.0):
    """Eq. 1–5 of the paper: b = (p_target, 1 − p_target), p̃ = the softmax restricted to the other classes."""
    tckd = nckd = 0.0
    for s, t, y in zip(student.numpy(), teacher.numpy(), labels.tolist()):
        p_s, p_t = softmax(s, temperature), softmax(t, temperature)
        b_s = [p_s[y], sum(p_s[j] for j in range(len(s)) if j != y)]
        b_t = [p_t[y], sum(p_t[j] for j in range(len(t)) if j != y)]
        tilde_s = [p_s[j] / b_s[1] for j in range(len(s)) if j != y]
        tilde_t = [p_t[j] / b_t[1] for j in range(len(t)) if j != y]
        tckd += kl(b_t, b_s)
        nckd += kl(tilde_t, tilde_s)
    n = len(labels)
    return alpha * temperature**2 * tckd / n, beta * temperature**2 * nckd / n


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("seed", [0, 1])
def test_dkd_matches_paper(temperature, seed):
    s, t, y = random_logits(seed), random_logits(seed + 10), random_labels(seed + 20)
    loss = DKD(temperature=temperature, alpha=1.5, beta=8.0, warmup=0)
    terms = loss(s, t, y)
    assert set(terms) == {"tckd", "nckd"}
    tckd, nckd = dkd_by_hand(s, t, y, temperature, alpha=1.5, beta=8.0)
    close(terms["tckd"], tckd)
    close(terms["nckd"], nckd)


def test_dkd_matches_the_masking_formulation():
    """mdistiller's NCKD subtracts 1000 from the target's softened logit instead of dropping it: same value."""
    s, t, y = random_logits(2), random_logits(3), random_labels(4)
    temperature = 4.0
    mask = torch.nn.functional.one_hot(y, s.shape[1]).to(s.dtype)
    log_s = torch.log_softmax(s / temperature - 1000.0 * mask, dim=1)
    p_t = torch.softmax(t / temperature - 1000.0 * mask, dim=1)
    masked = torch.nn.functional.kl_div(log_s, p_t, reduction="sum") * temperature**2 / len(y)
    close(DKD(temperature=temperature, beta=1.0, warmup=0)(s, t, y)["nckd"], masked)


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_dkd_decomposes_classical_kd(seed):
    """The paper's Eq. 7: KD = TCKD + (1 − p_t,target) · NCKD, per sample."""
    s, t, y = random_logits(seed, (1, 7)), random_logits(seed + 10, (1, 7)), random_labels(seed + 20, (1, 7))
    temperature = 2.0
    non_target_mass = 1.0 - softmax(t[0].numpy(), temperature)[y.item()]
    terms = DKD(temperature=temperature, alpha=1.0, beta=non_target_mass, warmup=0)(s, t, y)
    close(terms["tckd"] + terms["nckd"], kl_softmax(s, t, temperature), rtol=1e-9)


@pytest.mark.parametrize("epoch, factor", [(0, 1 / 20), (9, 10 / 20), (18, 19 / 20), (19, 1.0), (150, 1.0)])
def test_dkd_warms_up_linearly_from_the_first_epoch(epoch, factor):
    """mdistiller weighs epoch e (counted from 1) by min(e / warmup, 1); kd's epochs count from 0."""
    s, t, y = random_logits(8), random_logits(9), random_labels(10)
    loss = DKD()
    assert loss.warmup == 20
    full = loss(s, t, y, epoch=1000)
    warm = loss(s, t, y, epoch=epoch)
    for key in ("tckd", "nckd"):
        close(warm[key], factor * full[key], rtol=1e-12)
    assert all(value > 0 for value in warm.values())


def test_dkd_without_warmup_is_full_from_the_start():
    s, t, y = random_logits(11), random_logits(12), random_labels(13)
    full, start = DKD()(s, t, y, epoch=1000), DKD(warmup=0)(s, t, y, epoch=0)
    for key in ("tckd", "nckd"):
        close(start[key], full[key], rtol=1e-12)


def test_dkd_default_epoch_is_the_first():
    s, t, y = random_logits(14), random_logits(15), random_labels(16)
    loss = DKD()
    for key in ("tckd", "nckd"):
        close(loss(s, t, y)[key], loss(s, t, y, epoch=0)[key], rtol=0)


def test_dkd_handles_two_classes_and_large_logits():
    """Two classes leave one non-target class (NCKD = 0); logits far apart stay finite."""
    s, t = random_logits(17, (4, 2)), random_logits(18, (4, 2))
    y = torch.tensor([0, 1, 1, 0])
    terms = DKD(warmup=0)(s, t, y)
    close(terms["nckd"], 0.0, atol=1e-12)
    close(terms["tckd"], dkd_by_hand(s, t, y, 4.0)[0])
    big = DKD(temperature=1.0, warmup=0)(random_logits(19, scale=500.0), random_logits(20, scale=500.0),
                                         random_labels(21))
    assert all(torch.isfinite(value) for value in big.values())


# ---------------------------------------------------------------- DIST (Huang et al. 2022)

def dist_by_hand(student, teacher, temperature):
    """Eq. 4–7: 1 − mean Pearson r over rows (inter-class) and over columns (intra-class) of softmax(z/τ)."""
    p_s = np.stack([softmax(row, temperature) for row in student.numpy()])
    p_t = np.stack([softmax(row, temperature) for row in teacher.numpy()])
    rows = [np.corrcoef(p_s[i], p_t[i])[0, 1] for i in range(p_s.shape[0])]
    columns = [np.corrcoef(p_s[:, c], p_t[:, c])[0, 1] for c in range(p_s.shape[1])]
    return temperature**2 * (1 - np.mean(rows)), temperature**2 * (1 - np.mean(columns))


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("seed", [0, 1])
def test_dist_matches_paper(temperature, seed):
    s, t = random_logits(seed, scale=1.0), random_logits(seed + 10, scale=1.0)
    loss = DIST(temperature=temperature, beta=2.0, gamma=0.5)
    inter, intra = dist_by_hand(s, t, temperature)
    exact = DIST(temperature=temperature, beta=2.0, gamma=0.5)
    exact.eps = 0.0
    terms = exact(s, t, None)
    assert set(terms) == {"inter", "intra"}
    close(terms["inter"], 2.0 * inter, rtol=1e-10)
    close(terms["intra"], 0.5 * intra, rtol=1e-10)
    terms = loss(s, t, None)  # the reference code's eps = 1e-8 in the denominator changes little
    close(terms["inter"], 2.0 * inter)
    close(terms["intra"], 0.5 * intra)


def test_pearson_correlation_matches_numpy_and_is_affine_invariant():
    a, b = random_logits(30), random_logits(31)
    expected = [np.corrcoef(a[i].numpy(), b[i].numpy())[0, 1] for i in range(a.shape[0])]
    close(pearson_correlation(a, b, eps=0.0), expected, rtol=1e-10)
    scale, shift = random_logits(32, (5, 1)).abs() + 0.1, random_logits(33, (5, 1))
    close(pearson_correlation(a * scale + shift, b, eps=0.0), expected, rtol=1e-10)
    close(pearson_correlation(a, -b, eps=0.0), [-r for r in expected], rtol=1e-10)


def test_dist_is_invariant_to_per_sample_logit_shifts():
    """Softmax ignores a per-row constant, so both relations (and DIST) do too."""
    s, t = random_logits(34), random_logits(35)
    shifted_s, shifted_t = s + random_logits(36, (5, 1)), t + random_logits(37, (5, 1))
    loss = DIST(temperature=2.0)
    for key, value in loss(shifted_s, shifted_t, None).items():
        close(value, loss(s, t, None)[key], rtol=1e-10)


# ---------------------------------------------------------------- logit standardisation (Sun et al. 2024)

def logit_std_by_hand(student, teacher, temperature):
    """Algorithm 2: KL between softmax(Z(v)/τ) and softmax(Z(z)/τ) times τ², Z the z-score (unbiased std)."""
    def z_score(row):
        return (row - row.mean()) / (row.std(ddof=1) + 1e-7)
    total = sum(kl(softmax(z_score(t), temperature), softmax(z_score(s), temperature))
                for s, t in zip(student.numpy(), teacher.numpy()))
    return temperature**2 * total / student.shape[0]


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("seed", [0, 1])
def test_logit_std_matches_paper(temperature, seed):
    s, t = random_logits(seed), random_logits(seed + 10)
    value = LogitStandardization(temperature=temperature)(s, t, random_labels(seed + 20))
    assert value.shape == ()
    close(value, logit_std_by_hand(s, t, temperature))


def test_logit_std_ignores_the_logits_range():
    """A per-sample shift and positive scale of either side's logits leaves the z-scores, hence the loss."""
    s, t, y = random_logits(40), random_logits(41), random_labels(42)
    loss = LogitStandardization()
    scale, shift = random_logits(43, (5, 1)).abs() + 0.5, random_logits(44, (5, 1))
    base = loss(s, t, y)
    close(loss(s, t * scale + shift, y), base)
    close(loss(s * 2.5 - 7.0, t, y), base)
    assert abs(loss(s, -t, y) - base) > 1e-3  # a negative scale reverses the ranking: not invariant


def test_logit_std_rewards_the_teachers_relations_not_its_magnitude():
    """The paper's toy case: a student with the teacher's logits up to scale and shift has zero loss."""
    t, y = random_logits(45), random_labels(46)
    close(LogitStandardization()(0.2 * t + 3.0, t, y), 0.0, atol=1e-9)
    assert kl_softmax(0.2 * t + 3.0, t, 2.0) > 1e-2  # while Hinton's KD is far from it


# ---------------------------------------------------------------- common to all three

LOSS_CLASSES = {"dkd": DKD, "dist": DIST, "logit_std": LogitStandardization}


@pytest.mark.parametrize("name", NEW)
def test_registered_and_built_with_temperature(name):
    assert LOSSES.get(name) is LOSS_CLASSES[name]
    loss = build_loss(name, temperature=2.0, num_classes=7, unused="x")
    assert isinstance(loss, LOSS_CLASSES[name]) and isinstance(loss, DistillationLoss)
    assert loss.temperature == 2.0
    assert build_loss(name).temperature == {"dkd": 4.0, "dist": 1.0, "logit_std": 2.0}[name]


def test_defaults_and_weights_are_the_papers():
    dkd, dist = build_loss("dkd"), build_loss("dist")
    assert (dkd.alpha, dkd.beta, dkd.warmup) == (1.0, 8.0, 20)
    assert (dist.beta, dist.gamma) == (1.0, 1.0)
    assert build_loss("dkd", alpha=2.0, beta=4.0, warmup=5).warmup == 5
    weights = {name: (loss_property(LOSSES.get(name), "weight"), loss_property(LOSSES.get(name), "ce_weight"))
               for name in ["kl_softmax", "mse_logits", *NEW]}
    assert weights == {"kl_softmax": (0.9, 0.1), "mse_logits": (0.9, 0.1), "dkd": (1.0, 1.0),
                       "dist": (2.0, 1.0), "logit_std": (9.0, 0.1)}


def test_only_dkd_asks_for_the_epoch():
    assert wanted_extras(DKD()) == ("epoch",)
    assert wanted_extras(DIST()) == () and wanted_extras(LogitStandardization()) == ()


def test_hinton_and_mse_keep_their_behaviour():
    s, t, y = random_logits(50), random_logits(51), random_labels(52)
    assert isinstance(KLSoftmax(), DistillationLoss) and isinstance(MSELogits(), DistillationLoss)
    close(build_loss("kl_softmax", temperature=3.0)(s, t, y), kl_softmax(s, t, 3.0), rtol=0)
    close(build_loss("mse_logits", temperature=3.0)(s, t, y), ((s - t) ** 2).mean(), rtol=1e-12)


@pytest.mark.parametrize("name", NEW)
def test_perfect_student_has_zero_loss(name):
    t = random_logits(60, scale=1.0)
    terms = loss_terms(name, build_loss(name, warmup=0)(t.clone(), t, random_labels(61)))
    for value in terms.values():
        close(value, 0.0, atol=1e-5)


@pytest.mark.parametrize("name", NEW)
def test_gradients_reach_the_student_only(name):
    s = random_logits(70).requires_grad_(True)
    t, y = random_logits(71), random_labels(72)
    loss = build_loss(name)
    sum(loss_terms(name, loss(s, t, y)).values()).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None
    # the analytic gradient agrees with finite differences
    assert torch.autograd.gradcheck(lambda x: sum(loss_terms(name, loss(x, t, y)).values()),
                                    (s.detach().clone().requires_grad_(True),))


@pytest.mark.parametrize("name", NEW)
def test_float32_gives_finite_scalars(name):
    s = random_logits(80).float().requires_grad_(True)
    terms = loss_terms(name, build_loss(name)(s, random_logits(81).float(), random_labels(82)))
    for value in terms.values():
        assert value.shape == () and value.dtype == torch.float32 and torch.isfinite(value)
    sum(terms.values()).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
