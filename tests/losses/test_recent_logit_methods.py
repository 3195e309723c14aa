"""Tests of DIST+, SKD and CTKD against their reference formulas.

Each reference below is written in float64 numpy, sample by sample, independently of kd's code; its gradient is
taken by central differences of that numpy function, so value and gradient are both checked.
"""

import math

import numpy as np
import pytest
import torch

from conftest import FAST
from kd.cli import main
from kd.errors import KDError
from kd.losses import LOSSES, build_loss, loss_terms
from kd.losses.base import DistillationLoss, loss_property, wanted_extras
from kd.losses.curriculum import CTKD
from kd.losses.logits import DISTPlus, SKD
from kd.losses.objective import build_objective
from kd.losses.spec import losses_in_force
from kd.models.build import build_model
from kd.train.distiller import Distiller

NEW = ["dist_plus", "skd", "ctkd"]
VALUE_RTOL, GRAD_RTOL, GRAD_ATOL = 1e-9, 1e-6, 1e-8


def random_tensor(seed, shape, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64) * scale


def random_labels(seed, n=5, classes=7):
    return torch.randint(classes, (n,), generator=torch.Generator().manual_seed(seed))


def softmax(row, temperature=1.0):
    e = np.exp((row - row.max()) / temperature)
    return e / e.sum()


def kl(p, q):
    """KL(p || q) of two discrete distributions."""
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))


def pearson(a, b, eps):
    """Pearson correlation of two vectors, with ``eps`` added to the product of the centred norms (DIST's code)."""
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (math.sqrt((a * a).sum()) * math.sqrt((b * b).sum()) + eps))


def numeric_gradient(function, x, h=1e-6):
    """Central differences of a float64 numpy function of an array."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += h
        down[index] -= h
        grad[index] = (function(up) - function(down)) / (2 * h)
    return grad


def total(output):
    return sum(output.values()) if isinstance(output, dict) else output


def check_value_and_gradient(loss_of, reference, *inputs, wrt=(0,)):
    """The torch loss and the numpy reference agree in value and in the gradient w.r.t. the inputs ``wrt``.

    Returns the largest absolute differences seen (value, gradient)."""
    leaves = [x.detach().clone().requires_grad_(i in wrt) for i, x in enumerate(inputs)]
    value = total(loss_of(*leaves))
    value.backward()
    arrays = [x.detach().numpy() for x in inputs]
    expected = reference(*arrays)
    torch.testing.assert_close(value.detach(), torch.tensor(expected, dtype=torch.float64), rtol=VALUE_RTOL, atol=1e-12)
    worst = 0.0
    for i in wrt:
        def partial(x, i=i):
            return reference(*arrays[:i], x, *arrays[i + 1:])
        numeric = torch.from_numpy(numeric_gradient(partial, arrays[i]))
        torch.testing.assert_close(leaves[i].grad, numeric, rtol=GRAD_RTOL, atol=GRAD_ATOL)
        worst = max(worst, (leaves[i].grad - numeric).abs().max().item())
    return abs(value.item() - expected), worst


# ---------------------------------------------------------------- DIST+ (Huang et al. 2025; torchdistill DISTPlusLoss)

def dist_plus_by_hand(s, t, f_s, f_t, tau=1.0, beta=2.0, gamma=2.0, iota=1.0, kappa=1.0, eps=1e-8):
    """τ²(β(1 − mean_i r(p_s,i, p_t,i)) + γ(1 − mean_c r(p_s,:c, p_t,:c))) + ι(1 − mean_{b,h,w} r over channels)
    + κ(1 − mean_{h,w} r over the batch of the channel sums), r Pearson's correlation."""
    p_s = np.stack([softmax(row, tau) for row in s])
    p_t = np.stack([softmax(row, tau) for row in t])
    inter = 1 - np.mean([pearson(p_s[i], p_t[i], eps) for i in range(len(s))])
    intra = 1 - np.mean([pearson(p_s[:, c], p_t[:, c], eps) for c in range(s.shape[1])])
    b, _, h, w = f_s.shape
    channel = 1 - np.mean([pearson(f_s[i, :, y, x], f_t[i, :, y, x], eps)
                           for i in range(b) for y in range(h) for x in range(w)])
    sum_s, sum_t = f_s.sum(axis=1), f_t.sum(axis=1)
    spatial = 1 - np.mean([pearson(sum_s[:, y, x], sum_t[:, y, x], eps) for y in range(h) for x in range(w)])
    return tau**2 * (beta * inter + gamma * intra) + iota * channel + kappa * spatial


FEATURE_SHAPE = (5, 3, 2, 2)


@pytest.mark.parametrize("settings", [{}, {"temperature": 2.0, "beta": 1.0, "gamma": 0.5, "iota": 3.0, "kappa": 0.25},
                                      {"temperature": 4.0, "beta": 0.5, "gamma": 2.0, "iota": 0.1, "kappa": 2.0}])
def test_dist_plus_matches_the_reference(settings):
    s, t = random_tensor(0, (5, 7), 1.0), random_tensor(1, (5, 7), 1.0)
    f_s, f_t = random_tensor(2, FEATURE_SHAPE), random_tensor(3, FEATURE_SHAPE)
    loss = DISTPlus(**settings)
    names = {"temperature": "tau"}
    given = {names.get(k, k): v for k, v in settings.items()}

    def loss_of(s, t, f_s, f_t):
        return loss(s, t, None, {"layer4": f_s}, {"layer4": f_t})

    check_value_and_gradient(loss_of, lambda *a: dist_plus_by_hand(*a, **given), s, t, f_s, f_t, wrt=(0, 2))
    terms = loss_of(s, t, f_s, f_t)
    assert set(terms) == {"inter", "intra", "channel", "spatial"}


def test_dist_plus_logit_terms_are_dists_and_layers_add_up():
    s, t = random_tensor(4, (5, 7), 1.0), random_tensor(5, (5, 7), 1.0)
    f = [random_tensor(seed, FEATURE_SHAPE) for seed in (6, 7, 8, 9)]
    loss = DISTPlus(beta=1.0, gamma=1.0)
    one = loss(s, t, None, {"a": f[0]}, {"a": f[1]})
    dist = build_loss("dist")(s, t, None)
    for key in ("inter", "intra"):
        torch.testing.assert_close(one[key], dist[key], rtol=0, atol=0)
    two = loss(s, t, None, {"a": f[0], "b": f[2]}, {"a": f[1], "b": f[3]})
    other = loss(s, t, None, {"b": f[2]}, {"b": f[3]})
    for key in ("channel", "spatial"):
        torch.testing.assert_close(two[key], one[key] + other[key], rtol=1e-12, atol=0)


def test_dist_plus_channel_term_is_one_minus_torchdistills():
    """torchdistill's channel_relation returns the mean correlation itself; kd's term is 1 minus it."""
    f_s, f_t = random_tensor(10, FEATURE_SHAPE), random_tensor(11, FEATURE_SHAPE)
    centred_s, centred_t = f_s - f_s.mean(1, keepdim=True), f_t - f_t.mean(1, keepdim=True)
    numerator = (centred_s * centred_t).sum(1)
    denominator = torch.sqrt((centred_s**2).sum(1) * (centred_t**2).sum(1))
    torchdistill = (numerator / (denominator + 1e-8)).mean()
    s = random_tensor(12, (5, 7))
    channel = DISTPlus(iota=1.0)(s, s, None, {"x": f_s}, {"x": f_t})["channel"]
    torch.testing.assert_close(channel, 1 - torchdistill, rtol=1e-12, atol=0)


def test_dist_plus_needs_feature_maps():
    with pytest.raises(KDError, match="dist_plus needs 4-D feature maps"):
        build_loss("dist_plus", student_shapes={"fc": (10,)}, teacher_shapes={"fc": (10,)})
    s = random_tensor(13, (5, 7))
    with pytest.raises(ValueError, match="no hooked features"):
        DISTPlus()(s, s, None, {}, {})


# ---------------------------------------------------------------- SKD (Jeong et al. 2026; torchdistill SKD*Loss)

def skd_by_hand(s, t, temperature=4.0, tikhonov=0.1):
    """Instance: mean_i KL(softmax(t_i/T) ‖ softmax(s_i/T)). Direction: D = G_s − G_t of row-normalised logits,
    Σ' = cov(D's columns) + λI, mean_i √(D_i Σ'⁻¹ D_iᵀ)."""
    n = len(s)
    instance = sum(kl(softmax(t[i], temperature), softmax(s[i], temperature)) for i in range(n)) / n
    unit_s = np.stack([row / np.linalg.norm(row) for row in s])
    unit_t = np.stack([row / np.linalg.norm(row) for row in t])
    d = np.array([[unit_s[i] @ unit_s[j] - unit_t[i] @ unit_t[j] for j in range(n)] for i in range(n)])
    covariance = np.cov(d, rowvar=False) + tikhonov * np.eye(n)
    inverse = np.linalg.inv(covariance)
    direction = np.mean([math.sqrt(d[i] @ inverse @ d[i]) for i in range(n)])
    return instance + direction


@pytest.mark.parametrize("settings", [{}, {"temperature": 1.0, "tikhonov": 0.01},
                                      {"temperature": 8.0, "tikhonov": 1.0}])
@pytest.mark.parametrize("shape", [(5, 7), (8, 3)])
def test_skd_matches_the_reference(settings, shape):
    s, t = random_tensor(20, shape), random_tensor(21, shape)
    loss = SKD(**settings)
    check_value_and_gradient(lambda s, t: loss(s, t, None), lambda s, t: skd_by_hand(s, t, **settings), s, t)
    assert set(loss(s, t, None)) == {"instance", "direction"}


def test_skd_instance_term_has_no_temperature_squared():
    s, t = random_tensor(22, (5, 7)), random_tensor(23, (5, 7))
    instance = SKD(temperature=4.0)(s, t, None)["instance"]
    torch.testing.assert_close(instance * 16, build_loss("kl_softmax", temperature=4.0)(s, t, None), rtol=1e-12,
                               atol=0)


def test_skd_direction_ignores_logit_norms_and_a_single_sample():
    """The Gram matrix of normalised rows ignores each row's length; one sample has no relations."""
    s, t = random_tensor(24, (5, 7)), random_tensor(25, (5, 7))
    scale = random_tensor(26, (5, 1)).abs() + 0.5
    loss = SKD()
    torch.testing.assert_close(loss(s * scale, t, None)["direction"], loss(s, t, None)["direction"], rtol=1e-9, atol=0)
    lone = s[:1].clone().requires_grad_(True)
    terms = loss(lone, t[:1], None)
    assert terms["direction"].item() == 0.0 and torch.isfinite(terms["instance"])
    total(terms).backward()
    assert torch.isfinite(lone.grad).all()


def test_skd_direction_of_a_student_matching_the_teachers_directions_is_zero_with_a_finite_gradient():
    """Logits twice the teacher's have the same directions: the direction term is 0, and √ at 0 gives no NaN."""
    t = random_tensor(27, (5, 7))
    s = (2 * t).requires_grad_(True)
    direction = SKD()(s, t, None)["direction"]
    direction.backward()
    assert direction.item() == 0.0 and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------- CTKD (Li et al. 2023; zhengli97/CTKD)

def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def ctkd_by_hand(s, t, theta, t_start=1.0, t_end=20.0):
    """T = t_start + t_end·σ(θ); T² · mean_i KL(softmax(t_i/T) ‖ softmax(s_i/T))."""
    temperature = t_start + t_end * sigmoid(float(np.asarray(theta).reshape(())))
    return temperature**2 * sum(kl(softmax(b, temperature), softmax(a, temperature)) for a, b in zip(s, t)) / len(s)


def reference_decay(epoch, decay_max=0.0, decay_min=-1.0, loops=10.0):
    """The reference's CosineDecay.get_value at its 1-based ``epoch``: the signed factor of θ's gradient."""
    i = min(max(epoch, 0), loops)
    return (math.cos(i * math.pi / loops) + 1.0) * 0.5 * (decay_max - decay_min) + decay_min


@pytest.mark.parametrize("settings, theta", [({}, 1.0), ({}, -0.7), ({"t_start": 2.0, "t_end": 5.0}, 0.3)])
def test_ctkd_matches_the_reference(settings, theta):
    s, t = random_tensor(30, (5, 7)), random_tensor(31, (5, 7))
    loss = CTKD(**settings).double()
    with torch.no_grad():
        loss.global_t.fill_(theta)
    check_value_and_gradient(lambda s, t: loss(s, t, None, epoch=3),
                             lambda s, t: ctkd_by_hand(s, t, theta, **settings), s, t)


@pytest.mark.parametrize("epoch", [0, 4, 9, 30])
def test_ctkd_reverses_and_scales_the_temperatures_gradient(epoch):
    s, t = random_tensor(32, (5, 7)), random_tensor(33, (5, 7))
    loss = CTKD().double()
    with torch.no_grad():
        loss.global_t.fill_(0.4)
    loss(s, t, None, epoch=epoch).backward()
    # The un-reversed formula, differentiated by autograd ...
    theta = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    temperature = 1.0 + 20.0 * torch.sigmoid(theta)
    p_t = torch.softmax(t / temperature, 1)
    plain = temperature**2 * (p_t * (torch.log(p_t) - torch.log_softmax(s / temperature, 1))).sum(1).mean()
    plain.backward()
    # ... and by central differences of the numpy formula.
    # (h = 1e-4: at T ≈ 15 both softmaxes are near uniform and the KL's rounding, times T², swamps smaller steps)
    numeric = numeric_gradient(lambda x: ctkd_by_hand(s.numpy(), t.numpy(), x), np.array(0.4), h=1e-4)
    lam = -reference_decay(epoch + 1)
    torch.testing.assert_close(loss.global_t.grad, (-lam * theta.grad).reshape(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(theta.grad, torch.tensor(float(numeric), dtype=torch.float64), rtol=1e-6, atol=1e-9)
    assert lam > 0 and loss.global_t.grad.item() * theta.grad.item() < 0  # ascends the loss the student descends


@pytest.mark.parametrize("epoch", [0, 1, 4, 8, 9, 10, 239])
def test_ctkd_lambda_follows_the_reference_cosine_schedule(epoch):
    """kd's 0-based epoch e is the reference's epoch e + 1; its decay value (in [−1, 0]) is −λ."""
    assert CTKD().reversal(epoch) == pytest.approx(-reference_decay(epoch + 1), abs=1e-15)
    other = CTKD(lambda_min=0.5, lambda_max=2.0, decay_loops=5)
    assert other.reversal(epoch) == pytest.approx(-reference_decay(epoch + 1, -0.5, -2.0, 5), abs=1e-15)


def test_ctkd_lambda_values_at_known_epochs():
    loss = CTKD()
    assert loss.reversal(0) == pytest.approx((1 - math.cos(math.pi / 10)) / 2)  # ≈ 0.0245
    assert loss.reversal(4) == pytest.approx(0.5) and loss.reversal(9) == 1.0 and loss.reversal(100) == 1.0
    assert CTKD(decay_loops=0).reversal(0) == 1.0  # no curriculum: λ_max from the start


def test_ctkd_temperature_starts_at_the_references_and_stays_in_its_range():
    loss = CTKD()
    assert loss.temperature == pytest.approx(1 + 20 * sigmoid(1.0), rel=1e-6)  # global_T starts at 1
    for theta in (-1e4, -30.0, 0.0, 30.0, 1e4):
        with torch.no_grad():
            loss.global_t.fill_(theta)
        assert 1.0 <= loss.temperature <= 21.0
    # Many reversed steps, all pushing the temperature one way, cannot leave (t_start, t_start + t_end).
    loss = CTKD().double()
    optimiser = torch.optim.SGD(loss.parameters(), lr=50.0)
    s, t = random_tensor(34, (5, 7)), random_tensor(35, (5, 7))
    for _ in range(20):
        optimiser.zero_grad()
        loss(s, t, None, epoch=20).backward()
        optimiser.step()
        assert 1.0 <= loss.temperature <= 21.0


def test_ctkd_student_gradient_is_not_reversed():
    s, t = random_tensor(36, (5, 7)), random_tensor(37, (5, 7))
    loss = CTKD().double()
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    loss(s1, t, None, epoch=0).backward()
    build_loss("kl_softmax", temperature=loss.temperature)(s2, t, None).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-12, atol=1e-15)


def test_ctkd_temperature_is_trained_by_the_students_optimiser():
    objective = build_objective(losses_in_force(["ctkd"], [], None, None, []), num_classes=7)
    distiller = Distiller(build_model("cnn_tiny", 7), teacher=build_model("cnn_tiny", 7), objective=objective)
    theta = objective.losses["ctkd"].global_t
    assert any(p is theta for p in distiller.trained_parameters())
    assert "objective.losses.ctkd.global_t" in distiller.state_dict()  # saved with checkpoints, restored on resume


# ---------------------------------------------------------------- common to the three

CLASSES = {"dist_plus": DISTPlus, "skd": SKD, "ctkd": CTKD}


@pytest.mark.parametrize("name", NEW)
def test_registered_with_the_references_defaults_and_weights(name):
    assert LOSSES.get(name) is CLASSES[name]
    loss = build_loss(name, temperature=3.0, num_classes=7, unused="x")
    assert isinstance(loss, DistillationLoss)
    weights = (loss_property(loss, "weight"), loss_property(loss, "ce_weight"))
    assert weights == {"dist_plus": (2.0, 1.0), "skd": (1.0, 0.0), "ctkd": (0.9, 0.1)}[name]
    if name == "ctkd":  # the temperature is learned: --temperature does not reach it
        assert (loss.t_start, loss.t_end, loss.lambda_min, loss.lambda_max, loss.decay_loops) == (1, 20, 0, 1, 10)
    else:
        assert loss.temperature == 3.0 and build_loss(name).temperature == {"dist_plus": 1.0, "skd": 4.0}[name]
    defaults = build_loss(name)
    if name == "dist_plus":
        assert (defaults.beta, defaults.gamma, defaults.iota, defaults.kappa, defaults.eps) == (2, 2, 1, 1, 1e-8)
        assert loss_property(defaults, "features") and loss_property(defaults, "connect")
    if name == "skd":
        assert defaults.tikhonov == 0.1


def test_extras_each_asks_for():
    assert wanted_extras(CTKD()) == ("epoch",)
    assert wanted_extras(SKD()) == ()
    assert wanted_extras(DISTPlus()) == ("student_features", "teacher_features")


@pytest.mark.parametrize("name", NEW)
def test_perfect_student_has_zero_loss_and_float32_is_finite(name):
    t = random_tensor(40, (6, 7), 1.0)
    f = {"x": random_tensor(41, FEATURE_SHAPE)}
    extra = {"student_features": f, "teacher_features": f} if name == "dist_plus" else {}
    for value in loss_terms(name, build_loss(name)(t.clone(), t, random_labels(42, 6), **extra)).values():
        torch.testing.assert_close(value, torch.zeros((), dtype=value.dtype), rtol=0, atol=1e-6)
    s = random_tensor(43, (6, 7)).float().requires_grad_(True)
    f32 = {"x": f["x"].float()}
    extra = {"student_features": f32, "teacher_features": f32} if name == "dist_plus" else {}
    terms = loss_terms(name, build_loss(name)(s, random_tensor(44, (6, 7)).float(), random_labels(45, 6), **extra))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_a_ctkd_distill_stage_trains_its_temperature(tiny_data, tmp_path):
    """experiment.py trains a teacher, then distils with --kd_loss ctkd: θ moves by its reversed gradient alone
    (no weight decay), and the checkpoint keeps it beside the student."""
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--train_teacher", "--distill",
                 "--kd_loss", "ctkd", "--weight_decay", "0"]) == 0
    best = tmp_path / "kd" / "distill" / "version_0" / "checkpoints" / "best.ckpt"
    state = torch.load(best, weights_only=True)["state_dict"]
    theta = state["objective.losses.ctkd.global_t"]
    assert theta.shape == (1,) and theta.item() != 1.0
    assert 1.0 < 1.0 + 20.0 * torch.sigmoid(theta).item() < 21.0
