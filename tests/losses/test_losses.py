"""Tests of kd.losses: built-in losses against their paper formulas, build_loss and loss_terms."""

import textwrap

import pytest
import torch

from kd.errors import KDError
from kd.losses import LOSSES, build_loss, loss_terms
from kd.losses.base import accepted_settings, loss_property, wanted_extras
from kd.losses.logits import KLSoftmax, kl_softmax

TEMPERATURES = [0.5, 1.0, 2.0, 4.0, 20.0]
SHAPES = [(1, 2), (5, 7), (16, 100)]

USER_LOSSES = '''
import torch
from torch import nn


class Scaled(nn.Module):
    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale

    def forward(self, student_logits, teacher_logits, labels):
        return self.scale * ((student_logits - teacher_logits) ** 2).mean()


class Everything:
    def __init__(self, **settings):
        self.settings = settings

    def __call__(self, student_logits, teacher_logits, labels):
        return {"gap": (student_logits - teacher_logits).abs().mean(), "size": student_logits.pow(2).mean()}


class Broken(nn.Module):
    def __init__(self):
        raise RuntimeError("no GPU here")


class Inert:
    pass


NUMBER = 3
'''


def random_logits(seed, shape=(5, 7), dtype=torch.float64, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype) * scale


def random_labels(seed, shape=(5, 7)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(shape[1], (shape[0],), generator=generator)


def softmax_by_hand(z, temperature=1.0):
    scaled = z / temperature
    e = torch.exp(scaled - scaled.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def hinton(student, teacher, temperature):
    """Hinton et al. 2015: T² · mean over the batch of Σ_c p_t,c (log p_t,c − log p_s,c), p = softmax(z/T)."""
    p_t, p_s = softmax_by_hand(teacher, temperature), softmax_by_hand(student, temperature)
    return temperature**2 * (p_t * (torch.log(p_t) - torch.log(p_s))).sum(dim=1).mean()


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_losses.py"
    path.write_text(textwrap.dedent(USER_LOSSES))
    return path


# ---------------------------------------------------------------- numerics

KL_FORMS = {
    "function": lambda s, t, y, temperature: kl_softmax(s, t, temperature),
    "registered": lambda s, t, y, temperature: build_loss("kl_softmax", temperature=temperature)(s, t, y),
}


@pytest.mark.parametrize("form", KL_FORMS.values(), ids=KL_FORMS.keys())
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kl_softmax_matches_hinton(form, temperature, shape):
    s, t = random_logits(1, shape), random_logits(2, shape)
    value = form(s, t, random_labels(3, shape), temperature)
    assert value.shape == ()
    torch.testing.assert_close(value, hinton(s, t, temperature), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_kl_softmax_is_zero_for_the_same_distribution(temperature):
    s = random_logits(4)
    shifted = s + random_logits(5, (5, 1))  # a per-row constant leaves the softmax unchanged
    for teacher in (s.clone(), shifted):
        torch.testing.assert_close(kl_softmax(s, teacher, temperature), torch.tensor(0.0, dtype=torch.float64),
                                   rtol=0, atol=1e-12)
    assert kl_softmax(s, random_logits(6), temperature) > 1e-6


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_kl_softmax_gradient_is_t_times_probability_gap(temperature):
    """∂/∂s of T²·KL is T·(p_s − p_t)/batch (Hinton et al. 2015, section 2.1, times T²)."""
    s = random_logits(7).requires_grad_(True)
    t = random_logits(8).requires_grad_(True)
    build_loss("kl_softmax", temperature=temperature)(s, t, random_labels(9)).backward()
    expected = temperature * (softmax_by_hand(s.detach(), temperature) - softmax_by_hand(t.detach(), temperature))
    torch.testing.assert_close(s.grad, expected / s.shape[0], rtol=1e-9, atol=1e-12)
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", SHAPES)
def test_mse_logits_is_mean_squared_gap(shape):
    s, t = random_logits(10, shape), random_logits(11, shape)
    squared = (s - t) * (s - t)
    expected = squared.sum() / (shape[0] * shape[1])
    torch.testing.assert_close(build_loss("mse_logits")(s, t, random_labels(12, shape)), expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("teacher", ["none", "random"])
def test_ce_is_mean_negative_log_probability_of_label(shape, teacher):
    s, y = random_logits(13, shape), random_labels(14, shape)
    t = None if teacher == "none" else random_logits(15, shape)
    p = softmax_by_hand(s)
    expected = -torch.log(p[torch.arange(shape[0]), y]).mean()
    torch.testing.assert_close(build_loss("ce")(s, t, y), expected)


def random_features(seed, shapes, requires_grad=False):
    """``{layer: tensor}`` of the given (B, ...) shapes, as FeatureHooks would give them."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator).requires_grad_(requires_grad)
            for name, shape in shapes.items()}


# Two hooked layer pairs of a batch of 5: channels and sizes differ between student and teacher, as in a
# real pair of networks; a loss with ``connect`` gets the student's features mapped to the teacher's shapes.
TEACHER_SHAPES = {"t1": (5, 16, 4, 4), "t2": (5, 32, 2, 2)}
STUDENT_SHAPES = {"s1": (5, 8, 8, 8), "s2": (5, 16, 4, 4)}
# Losses that need other pairs: FSP as many channels on both sides at each layer, FT one pair, SRD one pooled pair.
OWN_PAIRS = {"fsp": ({"s1": (5, 16, 8, 8), "s2": (5, 32, 4, 4)}, TEACHER_SHAPES),
             "ft": ({"s1": (5, 8, 8, 8)}, {"t1": (5, 16, 4, 4)}),
             "srd": ({"s1": (5, 8, 1, 1)}, {"t1": (5, 16, 1, 1)})}


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_registered_loss_gives_finite_scalars_and_gradients(name):
    """Built as the runner builds it (with the settings and extras it names), on logits and, if it asks, features."""
    s = random_logits(16, dtype=torch.float32).requires_grad_(True)
    t, y = random_logits(17, dtype=torch.float32), random_labels(18)
    factory = LOSSES.get(name)
    if "teacher_network" in (accepted_settings(factory) or set()):
        pytest.skip("it reads the teacher network when built: tested with one in its own file (test_overhaul.py)")
    connect, features = loss_property(factory, "connect"), loss_property(factory, "features")
    student_shapes, teacher_shapes = OWN_PAIRS.get(name, (STUDENT_SHAPES, TEACHER_SHAPES))
    student_shapes = dict(zip(student_shapes, teacher_shapes.values())) if connect else student_shapes
    student_features = random_features(19, student_shapes, requires_grad=True)
    settings = {"num_classes": 7, "num_samples": 5,
                "student_shapes": {k: v[1:] for k, v in student_shapes.items()},
                "teacher_shapes": {k: v[1:] for k, v in teacher_shapes.items()}}
    loss = build_loss(name, **settings)
    extras = {"student_features": student_features, "teacher_features": random_features(20, teacher_shapes),
              "indices": torch.arange(5), "epoch": 0,
              "strong_view": (random_logits(21, dtype=torch.float32).requires_grad_(True),
                              random_logits(22, dtype=torch.float32))}
    terms = loss_terms(name, loss(s, t, y, **{k: extras[k] for k in wanted_extras(loss)}))
    assert terms
    for value in terms.values():
        assert value.shape == () and torch.isfinite(value)
    sum(terms.values()).backward()
    # What the loss compares of the student: the logits, or every hooked feature (crd embeds the last pair only;
    # self_distill's last feature is the detached teacher of the others).
    hooked = list(student_features.values())
    trained = ([s] if not features else hooked[-1:] if name == "crd" else hooked[:-1] if name == "self_distill"
               else hooked)
    for tensor in trained:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


# ---------------------------------------------------------------- build_loss

def test_build_loss_passes_accepted_settings():
    loss = build_loss("kl_softmax", temperature=3.0, alpha=0.5, unused="x")
    assert isinstance(loss, KLSoftmax) and loss.temperature == 3.0


@pytest.mark.parametrize("name", ["mse_logits", "ce"])
def test_build_loss_drops_settings_builtin_does_not_accept(name):
    """The runner builds every loss as build_loss(name, temperature=T)."""
    s, t, y = random_logits(19), random_logits(20), random_labels(21)
    torch.testing.assert_close(build_loss(name, temperature=3.0)(s, t, y), build_loss(name)(s, t, y))


def test_build_loss_user_file_gets_only_its_settings(user_file):
    loss = build_loss(f"{user_file}:Scaled", scale=2.0, temperature=4.0)
    s, t = random_logits(22), random_logits(23)
    torch.testing.assert_close(loss(s, t, random_labels(24)), 2.0 * ((s - t) ** 2).mean())


def test_build_loss_passes_everything_to_var_keyword(user_file):
    loss = build_loss(f"{user_file}:Everything", temperature=4.0, alpha=0.5)
    assert loss.settings == {"temperature": 4.0, "alpha": 0.5}
    assert set(loss_terms("everything", loss(random_logits(25), random_logits(26), None))) == {"gap", "size"}


def test_build_loss_from_importable_module():
    loss = build_loss("kd.losses.logits:KLSoftmax", temperature=2.5)
    assert isinstance(loss, KLSoftmax) and loss.temperature == 2.5


@pytest.mark.parametrize("spec, parts", [
    ("kl_sofmax", ["kl_softmax"]),
    ("mse_logit", ["mse_logits"]),
    ("completely_different", LOSSES.names()),
    ("{file}:Broken", ["Broken", "RuntimeError", "no GPU here"]),
    ("{file}:Inert", ["Inert", "not callable"]),
    ("{file}:NUMBER", ["NUMBER", "not a class or function"]),
    ("{file}:Scaler", ["Scaler", "did you mean Scaled"]),
])
def test_build_loss_errors(user_file, spec, parts):
    with pytest.raises(KDError) as info:
        build_loss(spec.format(file=user_file), temperature=4.0)
    for part in parts:
        assert part in str(info.value)


# ---------------------------------------------------------------- loss_terms

@pytest.mark.parametrize("output", [torch.tensor(1.5), torch.tensor([1.5]), torch.tensor([[1.5]])])
def test_loss_terms_names_a_single_tensor(output):
    terms = loss_terms("kd", output)
    assert list(terms) == ["kd"] and terms["kd"].shape == () and terms["kd"].item() == 1.5


def test_loss_terms_keeps_dict_keys():
    terms = loss_terms("kd", {"soft": torch.tensor(1.0), "hard": torch.tensor([2.0])})
    assert {k: v.item() for k, v in terms.items()} == {"soft": 1.0, "hard": 2.0}
    assert all(v.shape == () for v in terms.values())


@pytest.mark.parametrize("output, term", [
    (torch.ones(2), "kd"),
    (torch.ones(0), "kd"),
    (3.0, "kd"),
    ({"soft": torch.tensor(1.0), "hard": torch.ones(3)}, "hard"),
    ({"soft": 1.0}, "soft"),
])
def test_loss_terms_rejects_non_scalars(output, term):
    with pytest.raises(KDError, match=f"term '{term}'"):
        loss_terms("kd", output)
