"""Distillation losses on logits: Hinton's softened KL, the MSE between logits, DKD, DIST and logit standardisation."""

import torch
import torch.nn.functional as F

from kd.losses.base import LOSSES, DistillationLoss, Range


def kl_softmax(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: KL(softmax(t/T) || softmax(s/T)) · T², averaged over the batch.

    The T² factor keeps the gradient scale independent of T, so alpha means the same at any T.
    """
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


@LOSSES.register("kl_softmax")
class KLSoftmax(DistillationLoss):
    """Hinton's distillation loss on temperature-softened softmax outputs (Hinton et al. 2015; alpha = 0.9)."""

    weight = 0.9
    ce_weight = 0.1
    # Both terms are on the labels' scale, so a larger total is a larger learning rate, which short trials
    # reward and full runs pay for (a tune of both scales chose 2.8 times the total; one seed of three collapsed).
    share_of_total = True
    space = {"weight": Range(0.05, 0.99), "temperature": Range(1.0, 16.0, log=True)}

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        return kl_softmax(student_logits, teacher_logits, self.temperature)


@LOSSES.register("mse_logits")
class MSELogits(DistillationLoss):
    """Mean squared error between student and teacher logits (Ba & Caruana 2014), over all entries."""

    weight = 0.9
    ce_weight = 0.1
    space = {"weight": Range(0.01, 10.0, log=True), "ce_weight": Range(0.01, 1.0, log=True)}

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(student_logits, teacher_logits)


# ---------------------------------------------------------------- DKD

def _binary_and_non_target(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of (target, non-target) and of the classes other than the target, from ``logits``.

    The binary pair is ``log softmax(logits)`` summed over {target} and over the rest, computed in log space;
    the non-target distribution is the softmax over the C − 1 other logits (the target removed outright,
    the limit of mdistiller's ``- 1000 · gt_mask``).
    """
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels.reshape(-1, 1), True)
    others = logits[~mask].reshape(logits.shape[0], logits.shape[1] - 1)
    log_total = torch.logsumexp(logits, dim=1, keepdim=True)
    target = logits.gather(1, labels.reshape(-1, 1))
    log_binary = torch.cat([target, torch.logsumexp(others, dim=1, keepdim=True)], dim=1) - log_total
    return log_binary, F.log_softmax(others, dim=1)


@LOSSES.register("dkd")
class DKD(DistillationLoss):
    """Decoupled Knowledge Distillation (Zhao et al., CVPR 2022): alpha·TCKD + beta·NCKD, warmed up linearly.

    Follows mdistiller's ``dkd_loss``, whose trainer counts epochs from 1: kd's 0-based epoch e weighs
    ``min((e + 1) / warmup, 1)``, so the first epoch already distils (warmup = 0: no warm-up).
    """

    weight = 1.0
    ce_weight = 1.0
    space = {"weight": Range(0.1, 4.0, log=True), "ce_weight": Range(0.1, 2.0, log=True),
             "temperature": Range(1.0, 16.0, log=True), "alpha": Range(0.1, 4.0, log=True),
             "beta": Range(0.5, 16.0, log=True)}

    def __init__(self, temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0, warmup: int = 20) -> None:
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha
        self.beta = beta
        self.warmup = warmup

    def warmup_factor(self, epoch: int) -> float:
        """The warm-up weight of 0-based ``epoch``: (epoch + 1) / warmup, capped at 1."""
        return 1.0 if self.warmup <= 0 else min((epoch + 1) / self.warmup, 1.0)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                epoch: int = 0) -> dict[str, torch.Tensor]:
        t = self.temperature
        binary_s, others_s = _binary_and_non_target(student_logits / t, labels)
        binary_t, others_t = _binary_and_non_target(teacher_logits / t, labels)
        tckd = F.kl_div(binary_s, binary_t, reduction="batchmean", log_target=True) * t**2
        nckd = F.kl_div(others_s, others_t, reduction="batchmean", log_target=True) * t**2
        scale = self.warmup_factor(epoch)
        return {"tckd": scale * self.alpha * tckd, "nckd": scale * self.beta * nckd}


# ---------------------------------------------------------------- DIST

def pearson_correlation(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``, as DIST's code computes it.

    That is the cosine similarity of the mean-centred rows, with ``eps`` added to the product of norms.
    """
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@LOSSES.register("dist")
class DIST(DistillationLoss):
    """DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher"): Pearson relations.

    ``inter``: τ²·(1 − mean Pearson over samples' class rows); ``intra``: the same over classes' batch columns.
    With one sample a column has no variance: its correlation is 0 and ``intra`` is the constant τ².

    Weight 2 with β = γ = τ = 1 and CE weight 1, as torchdistill's DIST configuration has them
    (yoshitomo-matsubara/torchdistill configs/sample/ilsvrc2012/dist/resnet18_from_resnet34.yaml: DISTLoss
    beta = gamma = tau = 1.0 with weight 2.0, CrossEntropyLoss with weight 1.0). The official code
    (hunto/image_classification_sota lib/models/losses/kd_loss.py) fixes β = γ = 1 and takes the weight from
    its run configuration's ``kd_loss_weight``.
    """

    weight = 2.0
    ce_weight = 1.0
    space = {"weight": Range(0.25, 8.0, log=True), "ce_weight": Range(0.1, 2.0, log=True),
             "temperature": Range(0.5, 8.0, log=True), "beta": Range(0.25, 4.0, log=True),
             "gamma": Range(0.25, 4.0, log=True)}
    eps: float = 1e-8  # added to the product of norms, as in hunto/image_classification_sota's dist_kd.py

    def __init__(self, temperature: float = 1.0, beta: float = 1.0, gamma: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.beta = beta
        self.gamma = gamma

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.temperature
        p_s = F.softmax(student_logits / t, dim=1)
        p_t = F.softmax(teacher_logits / t, dim=1)
        inter = t**2 * (1 - pearson_correlation(p_s, p_t, self.eps).mean())
        intra = t**2 * (1 - pearson_correlation(p_s.T, p_t.T, self.eps).mean())
        return {"inter": self.beta * inter, "intra": self.gamma * intra}


# ---------------------------------------------------------------- logit standardisation

def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score of each row, (z − mean) / (std + eps), with the unbiased std of the reference code."""
    std, mean = torch.std_mean(logits, dim=1, keepdim=True)
    return (logits - mean) / (std + eps)


@LOSSES.register("logit_std")
class LogitStandardization(DistillationLoss):
    """Hinton's KD on z-scored logits (Sun et al., CVPR 2024, "Logit Standardization in Knowledge Distillation").

    Defaults are the paper's KD+LS setting: base temperature 2, weights 9 (KD) and 0.1 (CE).
    """

    weight = 9.0
    ce_weight = 0.1
    space = {"weight": Range(0.5, 20.0, log=True), "ce_weight": Range(0.01, 1.0, log=True),
             "temperature": Range(0.5, 8.0, log=True)}

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        return kl_softmax(standardize(student_logits), standardize(teacher_logits), self.temperature)
