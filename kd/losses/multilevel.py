"""MLKD: logits aligned at three levels (instance, batch, class), at five temperatures, on two views of each image."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.errors import KDError
from kd.losses.base import LOSSES, DistillationLoss, Range
from kd.losses.logits import kl_softmax

StrongView = tuple[torch.Tensor, torch.Tensor]  # (student's, teacher's) logits of the strongly augmented view


def share_at_or_below_median(values: torch.Tensor) -> torch.Tensor:
    """The fraction of ``values`` at or below their median, the median taken as numpy's default 50th percentile
    (linear interpolation: the mean of the two middle values of an even count). Constant: no gradient."""
    values = values.detach()
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    return (values <= torch.quantile(values, 0.5)).to(values.dtype).mean()


def batch_gram_gap(p_student: torch.Tensor, p_teacher: torch.Tensor) -> torch.Tensor:
    """‖P_t P_tᵀ − P_s P_sᵀ‖²_F / B: how the B×B similarities between the batch's predictions differ."""
    gap = p_teacher @ p_teacher.T - p_student @ p_student.T
    return gap.square().sum() / p_student.shape[0]


def class_gram_gap(p_student: torch.Tensor, p_teacher: torch.Tensor) -> torch.Tensor:
    """‖P_tᵀ P_t − P_sᵀ P_s‖²_F / K: how the K×K co-occurrences of the classes over the batch differ."""
    gap = p_teacher.T @ p_teacher - p_student.T @ p_student
    return gap.square().sum() / p_student.shape[1]


@LOSSES.register("mlkd")
class MLKD(DistillationLoss):
    """Multi-Level Logit Distillation (Jin, Wang & Lin, CVPR 2023), as its code computes it, on a weak view (the
    usual crop and flip; its logits are ``student_logits``/``teacher_logits``) and a strong view (the same
    images with RandAugment after the crop and flip; ``strong_view`` = its (student, teacher) logits).

    With p = softmax(z / T), KL_T(z_s, z_t) = T² · mean over the batch of KL(p_t ‖ p_s), the temperature set
    𝒯 = (τ, 3, 5, 2, 6), τ = ``temperature``, and the superscripts w and s the weak and strong views:

    * ``instance`` = m · Σ_{T∈𝒯} KL_T(zʷ_s, zʷ_t) + Σ_{T∈(τ,3,5)} KL_T(zˢ_s, zˢ_t) + Σ_{T∈(2,6)} KL_T(zʷ_s, zʷ_t)
    * ``batch``    = m · Σ_{T∈𝒯} ‖P_t P_tᵀ − P_s P_sᵀ‖²_F / B, P = softmax(zʷ / T), (B, K): weak view only
    * ``class``    = c · Σ_{T∈𝒯} ‖P_tᵀ P_t − P_sᵀ P_s‖²_F / K, weak view only
    * ``ce_strong`` = ``strong_ce`` · CE(zˢ_s, labels)

    The batch and class terms carry no T² factor. m is the share of the batch's samples whose teacher confidence
    (the largest softmax probability of zʷ_t at temperature 1) is at or below the batch median, and c the share
    of classes whose teacher probability summed over the batch is at or below the median of those sums; both
    medians are ``np.percentile(·, 50)`` (linear interpolation) and both shares are constants (no gradient).

    Follows Jin-Ying/Multi-Level-Logit-Distillation ``mdistiller/distillers/KD_ours.py`` (``KD_ours``:
    ``kd_loss``, ``cc_loss``, ``bc_loss`` and ``forward_train``) with the defaults of
    ``mdistiller/engine/cfg.py`` that its CIFAR-100 configurations (``configs/cifar100/ours/*.yaml``, trainer
    ``ours``) leave in force: ``KD.TEMPERATURE`` 4, ``KD.LOSS.CE_WEIGHT`` 0.1, ``KD.LOSS.KD_WEIGHT`` 0.9. Its
    ImageNet configurations (``configs/imagenet/*/kd_ours.yaml``) set τ = 1 and both weights to 0.5. Where the
    code departs from a plain reading, kd keeps the code:

    * The masks scale, they do not select. The reference builds a sample mask (teacher confidence ≤ the median)
      and a class mask (summed class probability ≤ the median), but its loss helpers are called with their
      default ``reduce=True`` (the ``reduce=False`` arguments are commented out), so each returns a scalar;
      ``(scalar * mask).mean()`` is that scalar times the mask's share of True entries. So every weak-view
      instance and batch term is multiplied by m (½ for an even batch of distinct confidences, (B + 1)/2B for
      an odd one, more with ties at the median) and every class term by c; no sample or class is left out.
    * Its "strong" instance sum takes the strong view at τ, 3 and 5 but the weak view, unmasked, at 2 and 6.
    * It also computes strong-view batch and class terms (``loss_cc_strong``, ``loss_bc_strong``) but leaves
      them out of the returned losses, so they train nothing; kd does not compute them.

    Weights: the reference's total is CE_WEIGHT · (CE(zʷ_s) + CE(zˢ_s)) + KD_WEIGHT · (instance + batch + class)
    (its trainer sums the returned terms). kd adds ``ce_weight`` · CE(zʷ_s) itself and multiplies this loss's
    terms by ``weight``, so with ``weight`` = KD_WEIGHT = 0.9 and ``ce_weight`` = CE_WEIGHT = 0.1 the strong
    view's CE needs ``strong_ce`` = CE_WEIGHT / KD_WEIGHT = 1/9 to keep its reference weight 0.1; kd's total
    then equals the reference's (at ImageNet's 0.5 and 0.5, ``strong_ce`` = 1). Changing ``weight`` or
    ``ce_weight`` does not change ``strong_ce``: the strong CE's weight is ``weight`` · ``strong_ce``. The CE on
    the strong view has no label smoothing, as in the reference.
    """

    weight = 0.9
    ce_weight = 0.1
    space = {"weight": Range(0.1, 4.0, log=True), "ce_weight": Range(0.01, 1.0, log=True),
             "temperature": Range(1.0, 8.0, log=True), "strong_ce": Range(0.01, 2.0, log=True)}
    strong_temperatures: tuple[float, ...] = (3.0, 5.0)  # with τ, on the strong view
    weak_temperatures: tuple[float, ...] = (2.0, 6.0)  # on the weak view, also unmasked in the "strong" sum

    def __init__(self, temperature: float = 4.0, strong_ce: float = 0.1 / 0.9) -> None:
        super().__init__()
        self.temperature = temperature
        self.strong_ce = strong_ce

    @property
    def temperatures(self) -> tuple[float, ...]:
        """𝒯: the temperatures of the weak view's instance, batch and class terms, in the reference's order."""
        return (self.temperature, *self.strong_temperatures, *self.weak_temperatures)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                strong_view: StrongView | None = None) -> dict[str, torch.Tensor]:
        if strong_view is None:
            raise KDError("--kd_loss mlkd: needs a second, strongly augmented view of each training image "
                          "(strong_view), and got none")
        strong_student, strong_teacher = strong_view
        if strong_student.shape != student_logits.shape or strong_teacher.shape != teacher_logits.shape:
            raise KDError(f"--kd_loss mlkd: the strong view's logits {tuple(strong_student.shape)} (student) and "
                          f"{tuple(strong_teacher.shape)} (teacher) must have the weak view's shape "
                          f"{tuple(student_logits.shape)}")
        teacher_logits, strong_teacher = teacher_logits.detach(), strong_teacher.detach()

        teacher_probs = F.softmax(teacher_logits, dim=1)
        sample_share = share_at_or_below_median(teacher_probs.max(dim=1).values).to(student_logits.dtype)
        class_share = share_at_or_below_median(teacher_probs.sum(dim=0)).to(student_logits.dtype)

        weak = strong = batch = classes = student_logits.new_zeros(())
        for t in self.temperatures:
            weak = weak + kl_softmax(student_logits, teacher_logits, t)
            p_s, p_t = F.softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1)
            batch = batch + batch_gram_gap(p_s, p_t)
            classes = classes + class_gram_gap(p_s, p_t)
        for t in (self.temperature, *self.strong_temperatures):
            strong = strong + kl_softmax(strong_student, strong_teacher, t)
        for t in self.weak_temperatures:
            strong = strong + kl_softmax(student_logits, teacher_logits, t)
        return {"instance": sample_share * weak + strong, "batch": sample_share * batch,
                "class": class_share * classes, "ce_strong": self.strong_ce * F.cross_entropy(strong_student, labels)}
