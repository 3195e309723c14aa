"""Tests of NST and KDSVD (kd/losses/transfer.py): value and gradient against each reference's formula written out
here in float64 (numpy, or torch with loops and its own SVD backward), gradients where torch's SVD backward fails,
real features of kd's CIFAR networks, and the layers each loss refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import hooked_features
from kd.errors import KDError
from kd.losses.base import LOSSES, DistillationLoss, build_loss
from kd.losses.transfer import KDSVD, NeuronSelectivityTransfer

B = 6


def rand(*shape: int, seed: int, grad: bool = False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(grad)


def call(loss, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    logits = torch.zeros(len(student[0]), 3, dtype=torch.float64)
    return loss(logits, logits, torch.zeros(len(student[0]), dtype=torch.long),
                student_features={f"s{i}": s for i, s in enumerate(student)},
                teacher_features={f"t{i}": t for i, t in enumerate(teacher)})


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("name, cls, weight, connect", [("nst", NeuronSelectivityTransfer, 50.0, False),
                                                        ("kdsvd", KDSVD, 1.0, True)])
def test_registered_with_the_references_defaults(name, cls, weight, connect):
    assert LOSSES.get(name) is cls and issubclass(cls, DistillationLoss)
    assert (cls.weight, cls.ce_weight, cls.features, cls.connect) == (weight, 1.0, True, connect)
    assert cls.__doc__ and "20" in cls.__doc__ and "cfg.py" in cls.__doc__
    assert KDSVD().k == 1


# ---- nst -------------------------------------------------------------------------------------------------------


def block_mean(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """(B, C, H, W) averaged over H/h × W/w blocks (adaptive average pooling at an integer factor)."""
    b, c, height, width = x.shape
    return x.reshape(b, c, h, height // h, w, width // w).mean(axis=(3, 5))


def nst_numpy(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """The squared MMD of L2-normalised channels under k(x, y) = (x . y)², sample by sample."""
    s, t = student.detach().numpy(), teacher.detach().numpy()
    if s.shape[2] > t.shape[2]:
        s = block_mean(s, *t.shape[2:])
    elif t.shape[2] > s.shape[2]:
        t = block_mean(t, *s.shape[2:])
    total = 0.0
    for b in range(len(s)):
        a = s[b].reshape(len(s[b]), -1)
        c = t[b].reshape(len(t[b]), -1)
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        c = c / np.linalg.norm(c, axis=1, keepdims=True)
        total += ((c @ c.T) ** 2).mean() + ((a @ a.T) ** 2).mean() - 2 * ((c @ a.T) ** 2).mean()
    return total / len(s)


def nst_torch(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The same, as the references write it (pairwise products broadcast), pooled with avg_pool2d."""
    teacher = teacher.detach()
    if student.shape[2] > teacher.shape[2]:
        student = F.avg_pool2d(student, student.shape[2] // teacher.shape[2])
    elif teacher.shape[2] > student.shape[2]:
        teacher = F.avg_pool2d(teacher, teacher.shape[2] // student.shape[2])
    s = student.reshape(*student.shape[:2], -1)
    t = teacher.reshape(*teacher.shape[:2], -1)
    s, t = s / s.norm(dim=2, keepdim=True), t / t.norm(dim=2, keepdim=True)

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2).mean()

    return kernel(t, t) + kernel(s, s) - 2 * kernel(s, t)


@pytest.mark.parametrize("seed", [0, 1])
def test_nst_equals_the_formula_in_value_and_gradient(seed):
    """Three pairs as in a real pair of networks: other channel counts, the larger map on either side."""
    student = [rand(B, 16, 16, 16, seed=seed, grad=True), rand(B, 32, 8, 8, seed=seed + 1, grad=True),
               rand(B, 64, 4, 4, seed=seed + 2, grad=True)]
    teacher = [rand(B, 24, 8, 8, seed=seed + 3), rand(B, 48, 8, 8, seed=seed + 4).relu(),
               rand(B, 96, 8, 8, seed=seed + 5)]
    value = call(NeuronSelectivityTransfer(), student, teacher)
    assert value.item() == pytest.approx(sum(nst_numpy(s, t) for s, t in zip(student, teacher)), rel=1e-12)
    expected = sum(nst_torch(s, t) for s, t in zip(student, teacher))
    assert abs(value.item() - expected.item()) < 1e-13
    assert max_difference(torch.autograd.grad(value, student), torch.autograd.grad(expected, student)) < 1e-15


def test_nst_is_zero_for_a_student_equal_to_its_teacher():
    teacher = [rand(B, 8, 4, 4, seed=3)]
    assert call(NeuronSelectivityTransfer(), [teacher[0].clone()], teacher).abs().item() < 1e-14


# ---- kdsvd -----------------------------------------------------------------------------------------------------


def kdsvd_loops(students: list[torch.Tensor], teachers: list[torch.Tensor], k: int = 1) -> torch.Tensor:
    """KDSVD sample by sample: each (H·W, C) matrix's SVD (torch's own backward); per teacher vector, the student
    vector (of the first k + 3) of largest |cosine|, sign-aligned; both scaled by the teacher's first k singular
    values over their norm; RBF matrices exp(-(a - b)² / 8) between consecutive layers, squared differences
    summed, divided by the batch size."""
    total = students[0].new_zeros(())
    for b in range(len(students[0])):
        previous = None
        for student, teacher in zip(students, teachers):
            x_s = student[b].reshape(student.shape[1], -1).T
            x_t = teacher[b].detach().reshape(teacher.shape[1], -1).T
            _, singular_t, vh_t = torch.linalg.svd(x_t, full_matrices=False)
            _, _, vh_s = torch.linalg.svd(x_s, full_matrices=False)
            scale = singular_t[:k] / singular_t[:k].norm()
            v_t, candidates = vh_t[:k].T, vh_s[:k + 3].T
            chosen = []
            for j in range(k):
                cosine = candidates.T @ v_t[:, j]
                best = int(cosine.abs().argmax())
                chosen.append(candidates[:, best] * torch.sign(cosine[best]))
            v_s, v_t = torch.stack(chosen, 1) * scale, v_t * scale
            if previous is not None:
                for j in range(k):
                    r_s = torch.exp(-(v_s[:, j, None] - previous[0][None, :, j]) ** 2 / 8)
                    r_t = torch.exp(-(v_t[:, j, None] - previous[1][None, :, j]) ** 2 / 8)
                    total = total + ((r_s - r_t) ** 2).sum()
            previous = v_s, v_t
    return total / len(students[0])


@pytest.mark.parametrize("k, seed", [(1, 0), (1, 10), (2, 20)])
def test_kdsvd_equals_the_formula_in_value_and_gradient(k, seed):
    """Three pairs of equal channel counts, the teacher's maps larger; the last student map has fewer positions
    than channels (a wide matrix), the second is post-ReLU."""
    student = [rand(B, 8, 8, 8, seed=seed, grad=True), rand(B, 16, 4, 4, seed=seed + 1, grad=True),
               rand(B, 32, 2, 2, seed=seed + 2, grad=True)]
    teacher = [rand(B, 8, 16, 16, seed=seed + 3), rand(B, 16, 8, 8, seed=seed + 4).relu(),
               rand(B, 32, 4, 4, seed=seed + 5)]
    value = call(KDSVD(k=k), student, teacher)
    expected = kdsvd_loops(student, teacher, k)
    assert value.item() > 0 and abs(value.item() - expected.item()) < 1e-13
    assert max_difference(torch.autograd.grad(value, student), torch.autograd.grad(expected, student)) < 1e-14


def test_kdsvd_gradient_is_exact_with_dead_channels():
    """Three channels zero over a whole map give three zero singular values, which make torch's SVD backward
    divide 0 by 0; kd's is finite and matches finite differences."""
    student = [rand(2, 10, 4, 4, seed=30), rand(2, 12, 4, 4, seed=31)]
    for feature in student:
        feature[:, -3:] = 0
        feature.requires_grad_(True)
    teacher = [rand(2, 10, 4, 4, seed=32), rand(2, 12, 4, 4, seed=33)]
    value = call(KDSVD(), student, teacher)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(value, student))
    assert torch.autograd.gradcheck(lambda a, b: call(KDSVD(), [a, b], teacher), tuple(student), eps=1e-6,
                                    atol=1e-6, rtol=1e-5)


def test_kdsvd_is_zero_for_a_student_equal_to_its_teacher():
    teacher = [rand(B, 8, 4, 4, seed=40), rand(B, 16, 2, 2, seed=41)]
    assert call(KDSVD(), [t.clone() for t in teacher], teacher).item() < 1e-24


# ---- real features ---------------------------------------------------------------------------------------------




@pytest.mark.parametrize("name, student_arch, teacher_arch", [("nst", "cifar:resnet20", "cifar:resnet56"),
                                                              ("nst", "cifar:ShuffleV2", "cifar:resnet8x4"),
                                                              ("kdsvd", "cifar:resnet20", "cifar:resnet56")])
def test_real_features_of_cifar_networks_give_a_finite_loss_and_gradient(name, student_arch, teacher_arch,
                                                                         one_thread):
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    layers = ["layer1", "layer2", "layer3"]
    student = hooked_features(student_arch, layers, images)
    with torch.no_grad():
        teacher = hooked_features(teacher_arch, layers, images)
    loss = build_loss(name, student_shapes={k: tuple(v.shape[1:]) for k, v in student.items()},
                      teacher_shapes={k: tuple(v.shape[1:]) for k, v in teacher.items()})
    logits = torch.zeros(4, 100)
    value = loss(logits, logits, torch.zeros(4, dtype=torch.long), student_features=student, teacher_features=teacher)
    assert value.shape == () and torch.isfinite(value) and value.item() > 0
    gradients = torch.autograd.grad(value, list(student.values()))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in gradients)


# ---- refusals --------------------------------------------------------------------------------------------------

MAP, VECTOR = (16, 8, 8), (64,)


@pytest.mark.parametrize("name, student_shapes, teacher_shapes, parts", [
    ("nst", {"avgpool": VECTOR}, {"layer3": MAP}, ["4-D feature maps", "--student_layers", "'avgpool'"]),
    ("kdsvd", {"layer2": MAP, "layer3": MAP}, {"layer2": MAP, "fc": VECTOR}, ["4-D feature maps", "--teacher_layers"]),
    ("nst", {"layer2": MAP, "layer3": MAP}, {"layer3": MAP}, ["--student_layers", "--teacher_layers", "2 student",
                                                             "1 teacher"]),
    ("kdsvd", {"layer3": MAP}, {"layer3": MAP}, ["at least 2", "--student_layers", "--teacher_layers"]),
])
def test_each_loss_refuses_layers_it_cannot_use(name, student_shapes, teacher_shapes, parts):
    with pytest.raises(KDError) as info:
        build_loss(name, student_shapes=student_shapes, teacher_shapes=teacher_shapes)
    assert all(part in str(info.value) for part in parts), str(info.value)


def test_features_it_cannot_use_are_refused_when_called():
    maps = [rand(B, 8, 4, 4, seed=50), rand(B, 8, 2, 2, seed=51)]
    with pytest.raises(ValueError, match="--teacher_layers names 't0'"):
        call(NeuronSelectivityTransfer(), maps[:1], [rand(B, 8, seed=52)])
    with pytest.raises(ValueError, match="at least two --student_layers"):
        call(KDSVD(), maps[:1], maps[:1])
    with pytest.raises(ValueError, match="channel by channel"):
        call(KDSVD(), maps, [rand(B, 4, 4, 4, seed=53), maps[1]])
