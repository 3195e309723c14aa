"""Tests of the feature losses (kd/losses/hints.py, attention.py, relations.py, contrastive.py): each against its
paper's formula, computed independently in float64 with loops and numpy, plus gradients, perfect students and CRD's
memory bank."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from kd.errors import KDError
from kd.losses.base import LOSSES, DistillationLoss, build_loss
from kd.losses.attention import AttentionTransfer
from kd.losses.contrastive import ContrastiveRepresentationDistillation
from kd.losses.hints import FitNets
from kd.losses.relations import ProbabilisticKT, RelationalKD, SimilarityPreserving

B = 4
SIMPLE = ["fitnets", "at", "sp", "pkt", "rkd"]
DEFAULTS = {  # name: (class, weight, ce_weight, connect)
    "fitnets": (FitNets, 100.0, 1.0, True),
    "at": (AttentionTransfer, 1000.0, 1.0, False),
    "rkd": (RelationalKD, 1.0, 1.0, False),
    "pkt": (ProbabilisticKT, 30000.0, 1.0, False),
    "sp": (SimilarityPreserving, 3000.0, 1.0, False),
    "crd": (ContrastiveRepresentationDistillation, 0.8, 1.0, False),
}


def rand(*shape: int, seed: int, grad: bool = False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(grad)


def named(*tensors: torch.Tensor, prefix: str = "layer") -> dict[str, torch.Tensor]:
    return {f"{prefix}{i}": t for i, t in enumerate(tensors)}


def call(loss, student: list[torch.Tensor], teacher: list[torch.Tensor], **extras):
    logits = torch.zeros(len(student[0]), 3, dtype=torch.float64)
    return loss(logits, logits, torch.zeros(len(student[0]), dtype=torch.long),
                student_features=named(*student, prefix="s"), teacher_features=named(*teacher, prefix="t"), **extras)


def total(output) -> torch.Tensor:
    return sum(output.values()) if isinstance(output, dict) else output


def same_shape_pairs(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two pairs of (B, 3, 5, 5) maps, the second pair shifted so the two sides differ more."""
    student = [rand(B, 3, 5, 5, seed=seed, grad=True), rand(B, 3, 5, 5, seed=seed + 1, grad=True)]
    teacher = [rand(B, 3, 5, 5, seed=seed + 2), rand(B, 3, 5, 5, seed=seed + 3) + 0.5]
    return student, teacher


def mixed_pairs(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pairs whose sides differ in shape: maps with other channels/sizes and vectors of other widths."""
    student = [rand(B, 3, 5, 5, seed=seed, grad=True), rand(B, 7, seed=seed + 1, grad=True)]
    teacher = [rand(B, 5, 4, 4, seed=seed + 2), rand(B, 11, seed=seed + 3) * 2]
    return student, teacher


def rows(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().reshape(len(t), -1)


def huber(x: float) -> float:
    """Smooth L1 with beta = 1."""
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


# ---- registry and defaults ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_registered_with_paper_defaults(name: str) -> None:
    cls, weight, ce_weight, connect = DEFAULTS[name]
    assert LOSSES.get(name) is cls
    assert issubclass(cls, DistillationLoss)
    assert (cls.weight, cls.ce_weight, cls.features, cls.connect) == (weight, ce_weight, True, connect)
    assert cls.__doc__ and "20" in cls.__doc__  # cites the paper's year


# ---- fitnets -----------------------------------------------------------------------------------------


def test_fitnets_matches_mse_summed_over_pairs() -> None:
    student, teacher = same_shape_pairs()
    expected = sum(np.mean((rows(s) - rows(t)) ** 2) for s, t in zip(student, teacher))
    assert call(FitNets(), student, teacher).item() == pytest.approx(expected, rel=1e-12)


def test_fitnets_rejects_unconnected_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        call(FitNets(), [rand(B, 3, 5, 5, seed=0)], [rand(B, 4, 5, 5, seed=1)])


# ---- at ----------------------------------------------------------------------------------------------


def attention(f: torch.Tensor) -> np.ndarray:
    """(B, H, W) mean over channels of f², in numpy."""
    x = f.detach().numpy()
    return (x**2).mean(axis=1)


def at_pair(am_s: np.ndarray, am_t: np.ndarray) -> float:
    a = am_s.reshape(len(am_s), -1)
    b = am_t.reshape(len(am_t), -1)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float(np.mean((a - b) ** 2))


def bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize of (B, H, W) with half-pixel centres (align_corners=False), by loops."""
    n, in_h, in_w = x.shape

    def taps(out_i: int, size_in: int, size_out: int) -> tuple[int, int, float]:
        src = max((out_i + 0.5) * size_in / size_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), size_in - 1)
        return i0, min(i0 + 1, size_in - 1), src - i0

    out = np.zeros((n, out_h, out_w))
    for i in range(out_h):
        y0, y1, ly = taps(i, in_h, out_h)
        for j in range(out_w):
            x0, x1, lx = taps(j, in_w, out_w)
            out[:, i, j] = ((1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1])
                            + ly * ((1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]))
    return out


def test_at_matches_formula_with_other_channel_counts() -> None:
    student = [rand(B, 3, 5, 5, seed=0, grad=True), rand(B, 2, 3, 3, seed=1, grad=True)]
    teacher = [rand(B, 6, 5, 5, seed=2), rand(B, 4, 3, 3, seed=3).abs()]
    expected = sum(at_pair(attention(s), attention(t)) for s, t in zip(student, teacher))
    assert call(AttentionTransfer(), student, teacher).item() == pytest.approx(expected, rel=1e-12)


def test_at_pools_a_larger_student_attention_map() -> None:
    student, teacher = [rand(B, 3, 6, 6, seed=0, grad=True)], [rand(B, 4, 3, 3, seed=1)]
    am_s = attention(student[0])
    pooled = np.zeros((B, 3, 3))
    for i, j in itertools.product(range(3), range(3)):
        pooled[:, i, j] = am_s[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2))
    expected = at_pair(pooled, attention(teacher[0]))
    assert call(AttentionTransfer(), student, teacher).item() == pytest.approx(expected, rel=1e-12)


def test_at_interpolates_a_smaller_student_attention_map() -> None:
    student, teacher = [rand(B, 3, 3, 3, seed=0, grad=True)], [rand(B, 4, 5, 5, seed=1)]
    expected = at_pair(bilinear(attention(student[0]), 5, 5), attention(teacher[0]))
    assert call(AttentionTransfer(), student, teacher).item() == pytest.approx(expected, rel=1e-12)


def test_at_rejects_vectors() -> None:
    with pytest.raises(ValueError, match="4-D feature maps"):
        AttentionTransfer(student_shapes={"fc": (10,)}, teacher_shapes={"layer4": (8, 2, 2)})
    with pytest.raises(KDError, match="4-D feature maps"):
        build_loss("at", student_shapes={"layer4": (8, 2, 2)}, teacher_shapes={"avgpool": (8, 1)})
    with pytest.raises(ValueError, match="4-D feature maps"):
        call(AttentionTransfer(), [rand(B, 10, seed=0)], [rand(B, 10, seed=1)])


# ---- rkd ---------------------------------------------------------------------------------------------


def rkd_pair(student: torch.Tensor, teacher: torch.Tensor) -> tuple[float, float]:
    """RKD's distance and angle losses of one pair, by loops over every pair and triplet."""
    s, t = rows(student), rows(teacher)
    n = len(s)

    def distances(e: np.ndarray) -> np.ndarray:
        d = np.zeros((n, n))
        for i, j in itertools.product(range(n), range(n)):
            if i != j:
                d[i, j] = math.sqrt(sum((e[i, k] - e[j, k]) ** 2 for k in range(e.shape[1])))
        return d / (d.sum() / (n * n - n))  # mean over the n² - n pairs of distinct samples

    def cosine(e: np.ndarray, i: int, j: int, k: int) -> float:
        u, v = e[j] - e[i], e[k] - e[i]
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))

    d_s, d_t = distances(s), distances(t)
    distance = sum(huber(d_s[i, j] - d_t[i, j]) for i, j in itertools.product(range(n), range(n))) / n**2
    angle = sum(huber(cosine(s, i, j, k) - cosine(t, i, j, k))
                for i, j, k in itertools.product(range(n), range(n), range(n)) if j != i and k != i) / n**3
    return distance, angle


def test_rkd_matches_pair_and_triplet_loops() -> None:
    student, teacher = mixed_pairs()
    output = call(RelationalKD(), student, teacher)
    assert set(output) == {"distance", "angle"}
    expected = [sum(terms) for terms in zip(*(rkd_pair(s, t) for s, t in zip(student, teacher)))]
    assert output["distance"].item() == pytest.approx(25 * expected[0], rel=1e-9)
    assert output["angle"].item() == pytest.approx(50 * expected[1], rel=1e-9)
    assert output["angle"].item() > 0 and output["distance"].item() > 0


def test_rkd_single_sample_batch_is_zero() -> None:
    student = [rand(1, 3, 5, 5, seed=0, grad=True)]
    output = call(RelationalKD(), student, [rand(1, 3, 5, 5, seed=1)])
    assert all(v.item() == 0 for v in output.values())
    total(output).backward()
    assert torch.isfinite(student[0].grad).all()


# ---- pkt and sp --------------------------------------------------------------------------------------


def pkt_pair(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> float:
    def probabilities(e: np.ndarray) -> np.ndarray:
        e = e / (np.sqrt((e**2).sum(axis=1, keepdims=True)) + eps)
        similarity = (e @ e.T + 1) / 2
        return similarity / similarity.sum(axis=1, keepdims=True)

    p_s, p_t = probabilities(rows(student)), probabilities(rows(teacher))
    return float(np.mean(p_t * np.log((p_t + eps) / (p_s + eps))))


def sp_pair(student: torch.Tensor, teacher: torch.Tensor) -> float:
    def gram(e: np.ndarray) -> np.ndarray:
        g = e @ e.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    s = rows(student)
    return float(np.sum((gram(s) - gram(rows(teacher))) ** 2) / len(s) ** 2)


@pytest.mark.parametrize(("cls", "formula"), [(ProbabilisticKT, pkt_pair), (SimilarityPreserving, sp_pair)])
@pytest.mark.parametrize("pairs", [same_shape_pairs, mixed_pairs])
def test_similarity_losses_match_numpy(cls, formula, pairs) -> None:
    student, teacher = pairs()
    expected = sum(formula(s, t) for s, t in zip(student, teacher))
    assert expected > 0
    assert call(cls(), student, teacher).item() == pytest.approx(expected, rel=1e-10)


# ---- common properties -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SIMPLE)
def test_perfect_student_gives_zero(name: str) -> None:
    student, teacher = same_shape_pairs()
    copies = [s.detach().clone().requires_grad_(True) for s in teacher]
    assert abs(total(call(build_loss(name), copies, teacher)).item()) < 1e-10
    assert total(call(build_loss(name), student, teacher)).item() > 1e-6


@pytest.mark.parametrize("name", SIMPLE)
def test_gradients_reach_student_features_not_teacher(name: str) -> None:
    if name == "fitnets":
        student, teacher = same_shape_pairs()
    elif name == "at":
        student = [rand(B, 3, 5, 5, seed=0, grad=True), rand(B, 2, 3, 3, seed=1, grad=True)]
        teacher = [rand(B, 6, 4, 4, seed=2), rand(B, 4, 5, 5, seed=3)]
    else:
        student, teacher = mixed_pairs()
    frozen = [teacher[0]]  # a teacher feature as the framework gives it: no grad
    tracked = [teacher[1].detach().clone().requires_grad_(True)]  # one that asks for it: the loss detaches it
    output = total(call(build_loss(name), student, frozen + tracked))
    assert output.requires_grad and torch.isfinite(output)
    output.backward()
    for s in student:
        assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert not frozen[0].requires_grad and frozen[0].grad is None
    assert tracked[0].grad is None


@pytest.mark.parametrize("name", SIMPLE)
def test_unpaired_features_are_rejected(name: str) -> None:
    student, teacher = same_shape_pairs()
    with pytest.raises(ValueError, match="pairs with teacher layer"):
        call(build_loss(name), student, teacher[:1])


# ---- crd ---------------------------------------------------------------------------------------------

S_SHAPES = {"layer3": (3, 2, 2), "avgpool": (6,)}
T_SHAPES = {"layer3": (4, 2, 2), "avgpool": (9,)}
N = 10


def crd_inputs(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    student = [rand(B, 3, 2, 2, seed=seed).float().requires_grad_(), rand(B, 6, seed=seed + 1).float().requires_grad_()]
    teacher = [rand(B, 4, 2, 2, seed=seed + 2).float(), rand(B, 9, seed=seed + 3).float()]
    return student, teacher, torch.tensor([7, 0, 3, 9])


def make_crd(seed: int = 0, **options) -> ContrastiveRepresentationDistillation:
    torch.manual_seed(seed)
    return ContrastiveRepresentationDistillation(S_SHAPES, T_SHAPES, N, **{"feat_dim": 8, "nce_k": 5, **options})


def crd_call(loss, student, teacher, indices) -> torch.Tensor:
    logits = torch.zeros(len(indices), 3)
    return loss(logits, logits, torch.zeros(len(indices), dtype=torch.long), student_features=named(*student),
                teacher_features=named(*teacher), indices=indices)


def test_crd_builds_embeddings_and_banks_from_the_last_pair() -> None:
    loss = make_crd()
    assert loss.embed_s.linear.in_features == 6 and loss.embed_t.linear.in_features == 9
    assert loss.embed_s.linear.out_features == 8
    stdv = 1 / math.sqrt(8 / 3)
    for bank in (loss.memory_s, loss.memory_t):
        assert bank.shape == (N, 8) and bank.abs().max() <= stdv
    assert {"memory_s", "memory_t", "z_s", "z_t"} <= set(loss.state_dict())
    assert loss.z_s.item() < 0 and loss.z_t.item() < 0


def test_crd_samples_own_index_first_then_uniform_negatives() -> None:
    torch.manual_seed(0)
    loss = ContrastiveRepresentationDistillation(S_SHAPES, T_SHAPES, N, nce_k=2000)
    indices = torch.tensor([7, 0, 3, 9])
    idx = loss.sample(indices)
    assert idx.shape == (B, 2001) and idx.dtype == torch.long
    assert torch.equal(idx[:, 0], indices)
    assert idx.min() == 0 and idx.max() == N - 1
    counts = torch.bincount(idx[:, 1:].reshape(-1), minlength=N).double()
    assert (counts / counts.sum() - 1 / N).abs().max() < 0.02


def test_crd_is_deterministic_under_manual_seed() -> None:
    results = []
    for _ in range(2):
        loss = make_crd(seed=3)
        torch.manual_seed(11)
        values = [crd_call(loss, *crd_inputs()).item() for _ in range(2)]
        results.append((values, loss.memory_s.clone(), loss.memory_t.clone(), loss.z_s.item()))
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][2], results[1][2])
    assert results[0][3] == results[1][3]


def test_crd_updates_bank_rows_only_in_training() -> None:
    loss = make_crd()
    student, teacher, indices = crd_inputs()
    others = torch.tensor([i for i in range(N) if i not in indices.tolist()])
    before = loss.memory_s.clone(), loss.memory_t.clone()

    loss.eval()
    assert torch.isfinite(crd_call(loss, student, teacher, indices))
    assert torch.equal(loss.memory_s, before[0]) and torch.equal(loss.memory_t, before[1])
    assert loss.z_s.item() < 0 and loss.z_t.item() < 0  # an eval call stores nothing

    loss.train()
    crd_call(loss, student, teacher, indices)
    for bank, old in zip((loss.memory_s, loss.memory_t), before):
        assert not torch.isclose(bank[indices], old[indices]).all(dim=1).any()
        assert torch.equal(bank[others], old[others])
        assert torch.allclose(bank[indices].norm(dim=1), torch.ones(B))
    assert loss.z_s.item() > 0 and loss.z_t.item() > 0


def test_crd_gradients_reach_student_and_heads_not_teacher() -> None:
    loss = make_crd()
    student, teacher, indices = crd_inputs()
    teacher[1].requires_grad_(True)
    value = crd_call(loss, student, teacher, indices)
    assert value.ndim == 0 and torch.isfinite(value) and value.requires_grad
    value.backward()
    assert student[1].grad is not None and student[1].grad.abs().sum() > 0
    assert student[0].grad is None  # only the last pair is used
    for head in (loss.embed_s, loss.embed_t):
        assert head.linear.weight.grad is not None and head.linear.weight.grad.abs().sum() > 0
    assert teacher[1].grad is None


def test_crd_nce_matches_hand_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    loss = make_crd(nce_k=3, momentum=0.25).double()
    student, teacher, indices = crd_inputs()
    student, teacher = [s.double() for s in student], [t.double() for t in teacher]
    idx = torch.tensor([[7, 1, 1, 4], [0, 9, 2, 5], [3, 3, 8, 0], [9, 6, 7, 2]])
    monkeypatch.setattr(loss, "sample", lambda _: idx)
    mem_s, mem_t = loss.memory_s.numpy().copy(), loss.memory_t.numpy().copy()

    def embed(head, f: torch.Tensor) -> np.ndarray:
        v = rows(f) @ head.linear.weight.detach().numpy().T + head.linear.bias.detach().numpy()
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    v_s, v_t = embed(loss.embed_s, student[1]), embed(loss.embed_t, teacher[1])

    def nce(anchor: np.ndarray, bank: np.ndarray, z: float | None) -> tuple[float, float]:
        scores = np.array([[math.exp(bank[idx[b, k]] @ anchor[b] / 0.07) for k in range(4)] for b in range(B)])
        z = scores.mean() * N if z is None else z
        p = scores / z
        noise, eps = 3 / N, 1e-7
        value = -sum(math.log(p[b, 0] / (p[b, 0] + noise + eps))
                     + sum(math.log(noise / (p[b, k] + noise + eps)) for k in range(1, 4)) for b in range(B)) / B
        return value, z

    (loss_s, z_s), (loss_t, z_t) = nce(v_s, mem_t, None), nce(v_t, mem_s, None)
    assert crd_call(loss, student, teacher, indices).item() == pytest.approx(loss_s + loss_t, rel=1e-10)
    assert (loss.z_s.item(), loss.z_t.item()) == (pytest.approx(z_s, rel=1e-12), pytest.approx(z_t, rel=1e-12))
    for bank, old, v in ((loss.memory_s, mem_s, v_s), (loss.memory_t, mem_t, v_t)):
        moved = 0.25 * old[indices.numpy()] + 0.75 * v
        np.testing.assert_allclose(bank[indices].numpy(), moved / np.linalg.norm(moved, axis=1, keepdims=True),
                                   rtol=1e-12)

    # The next batch reuses the stored Z and the updated banks.
    mem_s, mem_t = loss.memory_s.numpy().copy(), loss.memory_t.numpy().copy()
    expected = nce(v_s, mem_t, z_s)[0] + nce(v_t, mem_s, z_t)[0]
    assert crd_call(loss, student, teacher, indices).item() == pytest.approx(expected, rel=1e-10)


def test_crd_needs_indices() -> None:
    student, teacher, _ = crd_inputs()
    logits = torch.zeros(B, 3)
    with pytest.raises(ValueError, match="indices"):
        make_crd()(logits, logits, torch.zeros(B, dtype=torch.long), named(*student), named(*teacher))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        crd_call(make_crd(), student, teacher, torch.tensor([0, 1, 2, 10]))


def test_build_loss_crd_ignores_settings_it_does_not_name() -> None:
    torch.manual_seed(0)
    loss = build_loss("crd", student_shapes=S_SHAPES, teacher_shapes=T_SHAPES, num_samples=N, temperature=4.0,
                      num_classes=3)
    assert isinstance(loss, ContrastiveRepresentationDistillation)
    assert (loss.feat_dim, loss.nce_k, loss.nce_t, loss.momentum) == (128, 16384, 0.07, 0.5)
    assert loss.memory_s.shape == (N, 128) and loss.memory_t.shape == (N, 128)
    value = crd_call(loss, *crd_inputs())
    assert torch.isfinite(value) and value.requires_grad
    with pytest.raises(KDError, match="num_samples"):
        build_loss("crd", student_shapes=S_SHAPES, teacher_shapes=T_SHAPES)
