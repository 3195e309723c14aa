"""Losses that transfer how a layer's channels respond across space: neuron selectivity transfer (NST, a squared
MMD between the channels' activation patterns) and KD via SVD (KDSVD, RBF relations between the leading singular
vectors of consecutive layers).

Both follow the references' code: megvii-research/mdistiller (``mdistiller/distillers/NST.py``, ``KDSVD.py``;
defaults in ``mdistiller/engine/cfg.py``) and HobbitLong/RepDistiller (``distiller_zoo/NST.py``, ``KDSVD.py``;
weights in ``scripts/run_cifar_distill.sh``). Both references apply them to every stage's output of a CIFAR
network (mdistiller ``feats[1:]``, RepDistiller ``feat[1:-1]``: layer1..layer3 of a ResNet).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kd.losses.base import LOSSES, Range
from kd.losses.features import FeatureLoss, FeaturePairLoss, Shapes, feature_pairs

FLAGS = {"student": "--student_layers", "teacher": "--teacher_layers"}


def check_maps(loss: str, shapes: Shapes | None, side: str, per_sample: bool = True) -> None:
    """A ValueError naming ``side``'s flag unless every shape is a feature map's: (C, H, W), or (B, C, H, W)."""
    for layer, shape in (shapes or {}).items():
        if len(shape) != (3 if per_sample else 4):
            wanted = "(C, H, W) per sample" if per_sample else "(B, C, H, W)"
            raise ValueError(f"{loss} needs 4-D feature maps, but {FLAGS[side]} names '{layer}', of shape "
                             f"{tuple(shape)}, not {wanted}: hook a convolutional layer, not a pooled vector")


def check_layers(loss: str, student_shapes: Shapes | None, teacher_shapes: Shapes | None, least: int = 1) -> None:
    """Both sides hook feature maps, as many on each side (when both are known), and at least ``least`` pairs."""
    check_maps(loss, student_shapes, "student")
    check_maps(loss, teacher_shapes, "teacher")
    if student_shapes is None or teacher_shapes is None:
        return
    if len(student_shapes) != len(teacher_shapes) or len(student_shapes) < least:
        raise ValueError(f"{loss} pairs --student_layers with --teacher_layers in order and needs at least {least} "
                         f"pair(s), but got {len(student_shapes)} student layer(s) ({', '.join(student_shapes)}) "
                         f"and {len(teacher_shapes)} teacher layer(s) ({', '.join(teacher_shapes)})")


def check_features(loss: str, student_features: dict[str, torch.Tensor],
                   teacher_features: dict[str, torch.Tensor]) -> None:
    check_maps(loss, {k: tuple(v.shape) for k, v in student_features.items()}, "student", per_sample=False)
    check_maps(loss, {k: tuple(v.shape) for k, v in teacher_features.items()}, "teacher", per_sample=False)


# ---- NST ------------------------------------------------------------------------------------------------------


def squared_polynomial_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch and over every (row of a, row of b) of (a_i . b_j)^2; a (B, N, D), b (B, M, D)."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


@LOSSES.register("nst")
class NeuronSelectivityTransfer(FeaturePairLoss):
    """Neuron selectivity transfer (Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
    Transfer", 2017).

    Each channel of a (B, C, H, W) map is one sample of the layer's "selectivity" distribution: its H·W
    responses, L2-normalised. The loss of a pair is the squared MMD between the student's and the teacher's
    channels under the polynomial kernel k(x, y) = (x . y)^2: ``mean k(t, t') + mean k(s, s') - 2 mean k(s, t)``,
    each mean over the batch and all channel pairs (the teacher-only term is a constant); summed over pairs.
    Channel counts may differ. Where the spatial sizes differ, the larger map (by height, then width) is
    average-pooled to the smaller's size first. Weight 50, CE weight 1: mdistiller's ``NST.LOSS.FEAT_WEIGHT``
    / ``CE_WEIGHT`` (``mdistiller/engine/cfg.py``, lines 107-111) and RepDistiller's ``-a 0 -b 50``
    (``scripts/run_cifar_distill.sh``, line 27).

    The two references agree line for line (mdistiller ``NST.py`` lines 12-35, RepDistiller ``NST.py`` lines
    16-42, ``full_loss = True``), so kd follows both; kd forms the kernel matrices with a batched product instead
    of their (B, C, C, H·W) broadcast. They pool the larger map to a square of the smaller one's height; kd pools
    to the smaller one's (H, W), the same on the square maps of CIFAR networks.
    """

    weight = 50.0
    space = {"weight": Range(1.0, 500.0, log=True), "ce_weight": FeatureLoss.ce_range}

    def __init__(self, student_shapes: Shapes | None = None, teacher_shapes: Shapes | None = None) -> None:
        super().__init__()
        check_layers("nst", student_shapes, teacher_shapes)

    def pair_loss(self, layer: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s_size, t_size = tuple(student.shape[-2:]), tuple(teacher.shape[-2:])
        if s_size > t_size:
            student = F.adaptive_avg_pool2d(student, t_size)
        elif t_size > s_size:
            teacher = F.adaptive_avg_pool2d(teacher, s_size)
        s = F.normalize(student.flatten(2), dim=2)
        t = F.normalize(teacher.flatten(2), dim=2)
        return (squared_polynomial_kernel_mean(t, t) + squared_polynomial_kernel_mean(s, s)
                - 2 * squared_polynomial_kernel_mean(s, t))

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                student_features: dict[str, torch.Tensor],
                teacher_features: dict[str, torch.Tensor]) -> torch.Tensor:
        check_features("nst", student_features, teacher_features)
        return super().forward(student_logits, teacher_logits, labels, student_features, teacher_features)


# ---- KDSVD ----------------------------------------------------------------------------------------------------


def finite(x: torch.Tensor) -> torch.Tensor:
    """The references' ``removenan``: non-finite entries set to 0."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def channel_svd(feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (B, r) and right singular vectors (B, C, r) of each sample's (H·W, C) matrix."""
    x = feature.flatten(2).transpose(1, 2)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    return finite(s), finite(vh.transpose(1, 2))


class _LeadingRightSingularVectors(torch.autograd.Function):
    """The first ``n`` right singular vectors of each (B, M, P) matrix, with the exact gradient of those alone.

    With G = AᵀA = V diag(λ) Vᵀ (λ = s²), a simple eigenvector moves by dv_i = (λ_i I − G)⁺ dG v_i, so the
    gradient w.r.t. A is A (Γ + Γᵀ) with Γ = Σ_i (λ_i I − G)⁺ g_i v_iᵀ over the kept i, where (λ_i I − G)⁺ g =
    Σ_{j≠i} v_j (v_j . g) / (λ_i − λ_j) + (I − VVᵀ) g / λ_i (the last part only for P > M). This equals torch's
    SVD backward wherever that is finite, but torch's also divides by the gaps between the discarded singular
    values, so two zero singular values (two channels dead over a whole map) make its gradient NaN. A repeated
    or zero kept singular value has no unique vector; that part of the gradient is 0.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, n: int) -> torch.Tensor:
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        s, v = finite(s), finite(vh.transpose(1, 2))
        ctx.save_for_backward(x, s, v)
        return v[..., :n]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, s, v = ctx.saved_tensors
        n = grad.shape[-1]
        lam = s.pow(2)
        gaps = lam[:, None, :n] - lam[:, :, None]  # [b, j, i] = λ_i − λ_j
        inverse_gaps = torch.where(gaps != 0, 1 / torch.where(gaps != 0, gaps, 1), 0)
        inverse_lam = torch.where(lam[:, :n] > 0, 1 / torch.where(lam[:, :n] > 0, lam[:, :n], 1), 0)
        coefficients = v.transpose(1, 2) @ grad  # [b, j, i] = v_j . g_i
        moved = v @ (inverse_gaps * coefficients) + (grad - v @ coefficients) * inverse_lam[:, None, :]
        kept = v[..., :n]
        return (x @ moved) @ kept.transpose(1, 2) + (x @ kept) @ moved.transpose(1, 2), None


def leading_right_singular_vectors(feature: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` right singular vectors (B, C, n) of each sample's (H·W, C) matrix, differentiable."""
    return _LeadingRightSingularVectors.apply(feature.flatten(2).transpose(1, 2), n)


def align(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """The references' ``align_rsv``: for each teacher vector, the student vector of largest |cosine| with it,
    its sign flipped to a positive cosine; (B, C, n) and (B, C, k) -> (B, C, k)."""
    cosine = v_s.transpose(1, 2) @ v_t
    largest = cosine.abs().amax(1, keepdim=True)
    return v_s @ torch.where(cosine.abs() == largest, torch.sign(cosine), torch.zeros_like(cosine))


@LOSSES.register("kdsvd")
class KDSVD(FeatureLoss):
    """Knowledge distillation via singular value decomposition (Lee, Kim & Song, "Self-supervised Knowledge
    Distillation Using Singular Value Decomposition", ECCV 2018).

    Each sample's map of layer i is read as an (H·W, C) matrix. The teacher keeps its first k right singular
    vectors v_t (C, k); the student its first k + 3, and for each teacher vector the one of largest |cosine|
    with it, sign-aligned. Both are scaled by the teacher's first k singular values, L2-normalised (1 for
    k = 1). Between consecutive layers i−1 and i, ``R[c, c', j] = exp(-(v_i[c, j] − v_{i−1}[c', j])² / 8)``; the
    loss is ``Σ_i Σ (R_s − R_t)² / B`` (non-finite entries 0), over the hooked pairs in order, so it needs at
    least two. k = 1, weight 1, CE weight 1: mdistiller's ``KDSVD.K`` and ``KDSVD.LOSS`` (``mdistiller/engine/
    cfg.py``, lines 92-97; RepDistiller's ``KDSVD(k=1)``; its scripts give no weight).

    The references disagree on the matrix. kd follows RepDistiller (``distiller_zoo/KDSVD.py``, lines 17-75), which
    takes ``view(B, C, H·W).transpose`` as the paper and its TensorFlow original (sseung0703/SSKD_SVD, a [B, H·W,
    C] reshape) do: singular vectors over channels. mdistiller (``mdistiller/distillers/KDSVD.py``, lines 38-54)
    reshapes the NCHW map to (B, C·H, W), so its vectors run over the map's width, and computes in float32. The
    teacher's vectors keep the signs the SVD routine gives them, as in both references (the relations between layers
    depend on them). The student's SVD gradient is exact but computed for the kept vectors alone
    (:class:`_LeadingRightSingularVectors`), so dead channels do not make it NaN, as they do through ``torch.svd``.
    R_s and R_t are compared entry by entry, so the student's maps pass kd's connector (``connect``) to the
    teacher's shape: the identity where they agree, as in every same-family CIFAR pair; the references need equal
    channel counts and would take maps of other sizes as they are.
    """

    weight = 1.0
    connect = True
    space = {"weight": Range(0.05, 20.0, log=True), "ce_weight": FeatureLoss.ce_range}

    def __init__(self, k: int = 1, student_shapes: Shapes | None = None, teacher_shapes: Shapes | None = None) -> None:
        super().__init__()
        check_layers("kdsvd", student_shapes, teacher_shapes, least=2)
        self.k = int(k)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                student_features: dict[str, torch.Tensor],
                teacher_features: dict[str, torch.Tensor]) -> torch.Tensor:
        check_features("kdsvd", student_features, teacher_features)
        pairs = feature_pairs(student_features, teacher_features)
        if len(pairs) < 2:
            raise ValueError("kdsvd relates consecutive layers: give at least two --student_layers and "
                             f"--teacher_layers, got {len(pairs)} pair")
        total, previous = student_logits.new_zeros(()), None
        with torch.autocast(student_logits.device.type, enabled=False):  # SVD in float32 or float64, even under AMP
            for layer, (s, t) in zip(student_features, pairs):
                if s.shape[1] != t.shape[1]:
                    raise ValueError(f"kdsvd compares channel by channel, but student feature '{layer}' has "
                                     f"{s.shape[1]} channels and the teacher's {t.shape[1]}")
                dtype = torch.promote_types(s.dtype, t.dtype)
                dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
                s, t = s.to(dtype), t.to(dtype)
                s_t, v_t = channel_svd(t)
                s_t = F.normalize(s_t[:, :self.k], dim=1).unsqueeze(1)
                v_t = F.normalize(v_t[..., :self.k], dim=1)
                v_s = F.normalize(leading_right_singular_vectors(s, self.k + 3), dim=1)
                v_s, v_t = align(v_s, v_t) * s_t, v_t * s_t
                if previous is not None:
                    r_s = torch.exp(-(v_s.unsqueeze(2) - previous[0].unsqueeze(1)).pow(2) / 8)
                    r_t = torch.exp(-(v_t.unsqueeze(2) - previous[1].unsqueeze(1)).pow(2) / 8)
                    total = total + finite((r_s - r_t).pow(2)).sum() / len(s)
                previous = v_s, v_t
        return total
