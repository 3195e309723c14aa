"""Logit methods that reshape the soft labels: NKD, USKD, WSLD and TF-KD's virtual teacher.

NKD and WSLD reweigh or renormalise the teacher's soft labels; USKD and TF-KD make soft labels without a
teacher (``needs_teacher = False``: they ignore ``teacher_logits``). Where a reference adds the label
cross-entropy itself, kd's objective adds it instead, with the class's ``ce_weight``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import LOSSES, DistillationLoss, Range
from kd.losses.features import Shapes


def non_target(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The (B, C − 1) columns of ``values`` other than each row's label, in their order."""
    keep = torch.ones_like(values, dtype=torch.bool).scatter_(1, labels.reshape(-1, 1), False)
    return values[keep].reshape(values.shape[0], values.shape[1] - 1)


# ---------------------------------------------------------------- NKD

@LOSSES.register("nkd")
class NKD(DistillationLoss):
    """Normalized KD (Yang et al., ICCV 2023, "From Knowledge Distillation to Self-Knowledge Distillation: A
    Unified Approach with Normalized Loss and Customized Soft Labels"), Eq. 8.

    ``target``: −mean over the batch of T_y · log S_y, the teacher's and student's softmax at temperature 1 on
    the label y. ``non_target``: −γ·λ² · mean of Σ_{i≠y} T̂_i log Ŝ_i, where T̂ and Ŝ are the softmax at
    temperature λ of the C − 1 logits other than the label's (the non-target probabilities renormalised to
    sum to 1). Both are cross-entropies, as in the reference, so a perfect student leaves the teacher's entropy.

    Reference: yzd-v/cls_KD ``mmcls/distillation/losses/nkd.py`` (temp = 1, gamma = 1.5 at lines 14–15, as
    its ImageNet configuration ``configs/distillers/imagenet/res34_distill_res18_img.py`` has them; CIFAR-100:
    temp = 3, gamma = 3.5). Its distiller adds the label CE with weight 1 beside the loss. The version before
    upstream's fix of 2023-10-10 scattered 1 instead of 0 into the mask (line 40), which kept the target in the
    "non-target" softmax; kd follows the paper and the fixed file: the target is left out.
    """

    weight = 1.0
    ce_weight = 1.0
    space = {"weight": Range(0.1, 4.0, log=True), "ce_weight": Range(0.1, 2.0, log=True),
             "temperature": Range(0.5, 8.0, log=True), "gamma": Range(0.25, 8.0, log=True)}

    def __init__(self, temperature: float = 1.0, gamma: float = 1.5) -> None:
        super().__init__()
        self.temperature = temperature
        self.gamma = gamma

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor) -> dict[str, torch.Tensor]:
        y = labels.reshape(-1, 1)
        teacher_target = F.softmax(teacher_logits, dim=1).gather(1, y)
        target = -(teacher_target * F.log_softmax(student_logits, dim=1).gather(1, y)).mean()
        t = self.temperature
        teacher_others = F.softmax(non_target(teacher_logits, labels) / t, dim=1)
        student_others = F.log_softmax(non_target(student_logits, labels) / t, dim=1)
        others = -(teacher_others * student_others).sum(dim=1).mean()
        return {"target": target, "non_target": self.gamma * t**2 * others}


# ---------------------------------------------------------------- USKD

def pooled(feature: torch.Tensor) -> torch.Tensor:
    """A hooked feature as one vector per sample: a (B, C, H, W) map averaged over space, anything else flattened."""
    return feature.mean(dim=(2, 3)) if feature.dim() == 4 else feature.reshape(feature.shape[0], -1)


def pooled_width(shape: tuple[int, ...]) -> int:
    """The length of :func:`pooled`'s vector for a feature of per-sample ``shape``."""
    return shape[0] if len(shape) == 3 else math.prod(shape)


@LOSSES.register("uskd")
class USKD(DistillationLoss):
    """Universal Self-KD (Yang et al., ICCV 2023, the teacher-free method of the NKD paper): NKD's two terms
    with soft labels the student makes itself, and a weak classifier on an intermediate feature.

    ``target``: α · −mean(V_y · log S_y), with V_y = S_y² + 1 − mean over the batch of S_y² (S the student's
    softmax, V detached). ``weak``: μ · the cross-entropy of a learned linear head W on the hooked feature,
    against the label smoothed as 0.9·one-hot + 0.1/C. ``non_target``: β · the cross-entropy of the student's
    softmax over the C − 1 non-target logits against Zipf labels: each class ranked (all C, descending) by
    W_i/(1 − W_y + 1e-6) + log S_i/(1 − log S_y + 1e-6), the class at position k (from 1) given 1/k, the
    target dropped and the rest renormalised (detached). The final-logit part of that rank uses log-
    probabilities because the reference's ``s_i`` holds the log-softmax by then (uskd.py lines 53 and 73).

    Reference: yzd-v/cls_KD ``mmcls/distillation/losses/uskd.py`` (alpha = 1, beta = 0.1, mu = 0.005 at lines
    15–17, as its ImageNet configurations ``configs/distillers/imagenet/*_sd_img.py`` have them; CIFAR-100:
    0.1, 0.1, 0.1); its distiller adds the label CE with weight 1. The reference feeds its linear head the
    pooled output of the stage before the last (ResNet: ``neck(stage 3)``, 256 channels); kd's head reads
    the hooked student features (``--student_layers``, e.g. ``layer3``): each map averaged over space (other
    features flattened), several hooked layers concatenated. The head is this loss's parameter, trained with
    the student, and its term trains the student's layers below the hooked one, as in the reference.
    """

    weight = 1.0
    ce_weight = 1.0
    features = True
    needs_teacher = False
    space = {"weight": Range(0.1, 4.0, log=True), "ce_weight": Range(0.1, 2.0, log=True),
             "alpha": Range(0.05, 2.0, log=True), "beta": Range(0.01, 1.0, log=True),
             "mu": Range(0.001, 0.5, log=True)}
    smoothing = 0.1  # the weak head's label smoothing, fixed in the reference (uskd.py line 61)
    eps = 1e-6  # in the rank's denominators (uskd.py line 73)

    def __init__(self, num_classes: int, student_shapes: Shapes, alpha: float = 1.0, beta: float = 0.1,
                 mu: float = 0.005) -> None:
        super().__init__()
        if not student_shapes:
            raise ValueError("uskd needs a hooked student feature for its weak classifier: --student_layers "
                             "(the reference uses the stage before the last, e.g. layer3)")
        self.alpha, self.beta, self.mu = alpha, beta, mu
        self.head = nn.Linear(sum(pooled_width(tuple(shape)) for shape in student_shapes.values()), num_classes)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                student_features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        y = labels.reshape(-1, 1)
        classes = student_logits.shape[1]
        log_s = F.log_softmax(student_logits, dim=1)
        log_s_y = log_s.gather(1, y)
        with torch.no_grad():
            squared = log_s_y.exp() ** 2
            soft_target = squared + 1 - squared.mean()
        target = -(soft_target * log_s_y).mean()

        weak_logits = self.head(torch.cat([pooled(f) for f in student_features.values()], dim=1))
        log_w = F.log_softmax(weak_logits, dim=1)
        smoothed = torch.zeros_like(log_w).scatter_(1, y, 1 - self.smoothing) + self.smoothing / classes
        weak = -(smoothed * log_w).sum(dim=1).mean()

        with torch.no_grad():
            w = log_w.exp()
            score = w / (1 - w.gather(1, y) + self.eps) + log_s / (1 - log_s_y + self.eps)
            position = score.argsort(dim=1, descending=True).argsort(dim=1)
            zipf = non_target(1.0 / (position + 1).to(log_s.dtype), labels)
            zipf = zipf / zipf.sum(dim=1, keepdim=True)
        others = -(zipf * F.log_softmax(non_target(student_logits, labels), dim=1)).sum(dim=1).mean()
        return {"target": self.alpha * target, "non_target": self.beta * others, "weak": self.mu * weak}


# ---------------------------------------------------------------- WSLD

@LOSSES.register("wsld")
class WSLD(DistillationLoss):
    """Weighted soft labels (Zhou et al., ICLR 2021, "Rethinking Soft Labels for Knowledge Distillation: A
    Bias-Variance Tradeoff Perspective"): Hinton's soft cross-entropy, weighted per sample.

    T² · mean over the batch of w · H(softmax(t/T), softmax(s/T)), with w = 1 − exp(−CE_s / (CE_t + 1e-7)),
    CE_s and CE_t the student's and teacher's label cross-entropies at temperature 1 on detached logits
    (no gradient flows through w). The reference clamps the ratio at 0 first, which never binds: both are ≥ 0.

    Reference: bellymonster/Weighted-Soft-Label-Distillation ``knowledge_distiller.py`` (T = 2, alpha = 2.5
    at lines 40–41: the ImageNet setting; ``loss = hard_loss + alpha * soft_loss`` at line 83, so CE weight 1,
    label smoothing off in ``imagenet_train_cfg.py``). yzd-v/cls_KD's ``wsld.py`` uses T = 4, alpha = 2.25 on
    CIFAR-100. The reference's one-hot has 1000 classes (line 69); kd's ``num_classes`` is the run's, and the
    logits must have that many columns (None: as many as they have).
    """

    weight = 2.5
    ce_weight = 1.0
    space = {"weight": Range(0.25, 8.0, log=True), "ce_weight": Range(0.1, 2.0, log=True),
             "temperature": Range(1.0, 8.0, log=True)}
    eps = 1e-7  # added to the teacher's cross-entropy (knowledge_distiller.py line 73)

    def __init__(self, temperature: float = 2.0, num_classes: int | None = None) -> None:
        super().__init__()
        self.temperature = temperature
        self.num_classes = num_classes

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        if self.num_classes is not None and student_logits.shape[1] != self.num_classes:
            raise ValueError(f"wsld: the logits have {student_logits.shape[1]} classes, the run "
                             f"{self.num_classes}")
        t = self.temperature
        soft = -(F.softmax(teacher_logits / t, dim=1) * F.log_softmax(student_logits / t, dim=1)).sum(dim=1)
        with torch.no_grad():
            student_ce = F.cross_entropy(student_logits, labels, reduction="none")
            teacher_ce = F.cross_entropy(teacher_logits, labels, reduction="none")
            sample_weight = 1 - torch.exp(-student_ce / (teacher_ce + self.eps))
        return t**2 * (sample_weight * soft).mean()


# ---------------------------------------------------------------- TF-KD (virtual teacher)

@LOSSES.register("tf_kd")
class VirtualTeacherKD(DistillationLoss):
    """Teacher-free KD with a manually designed virtual teacher, Tf-KD_reg (Yuan et al., CVPR 2020, "Revisiting
    Knowledge Distillation via Label Smoothing Regularization", Sec. 5).

    KL(softmax(u/T) ‖ softmax(s)), summed over classes and averaged over the batch, where u is the virtual
    teacher's distribution: ``correct_prob`` on the label and (1 − correct_prob)/(C − 1) on every other class.
    The softmax of u/T is what both references soften (u is a distribution, not logits), and the student is
    not softened (no T² factor).

    Defaults are the official code's: yuanli2333/Teacher-free-Knowledge-Distillation ``my_loss_function.py``
    (``loss_kd_regularization``: correct_prob = 0.99 at line 39, (1 − α)·CE + α·KL·multiplier at lines 47–49)
    with ``experiments/base_experiments/base_resnet18/params.json`` (reg_temperature 20, reg_alpha 0.1,
    multiplier 100; ImageNet_train/main.py's flags default to T = 20, α = 0.1 at lines 86–87): weight 0.1,
    CE weight 0.9.
    Its ``nn.KLDivLoss()`` averages over batch × classes, which multiplier 100 on CIFAR-100's 100 classes
    undoes: kd's per-sample KL is that value. Other official settings: MobileNetV2 T = 40, α = 0.95,
    multiplier 1 (weight 0.95/C); GoogLeNet T = 40, α = 0.1, multiplier 50. KD-Lib's ``VirtualTeacher``
    (KD_Lib/KD/vision/teacher_free/virtual_teacher.py lines 36–39) computes the same with correct_prob 0.9,
    T = 10, weight 0.5 (CE 0.5), and its KL too divided by the number of classes.
    """

    weight = 0.1
    ce_weight = 0.9
    needs_teacher = False
    space = {"weight": Range(0.005, 1.0, log=True), "ce_weight": Range(0.05, 1.0, log=True),
             "temperature": Range(1.0, 50.0, log=True), "correct_prob": Range(0.5, 0.999)}

    def __init__(self, temperature: float = 20.0, correct_prob: float = 0.99) -> None:
        super().__init__()
        self.temperature = temperature
        self.correct_prob = correct_prob

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                labels: torch.Tensor) -> torch.Tensor:
        classes = student_logits.shape[1]
        virtual = torch.full_like(student_logits, (1 - self.correct_prob) / (classes - 1))
        virtual = virtual.scatter_(1, labels.reshape(-1, 1), self.correct_prob)
        return F.kl_div(F.log_softmax(student_logits, dim=1), F.log_softmax(virtual / self.temperature, dim=1),
                        reduction="batchmean", log_target=True)
