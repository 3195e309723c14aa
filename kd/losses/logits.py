"""Distillation losses on logits: Hinton's softened KL, the MSE between logits, DKD, DIST (and DIST+, which adds
DIST's relations on a hooked feature map), logit standardisation and SKD."""

import torch
import torch.nn.functional as F

from kd.losses.base import LOSSES, DistillationLoss, Range
from kd.losses.features import Shapes, feature_pairs, require_maps


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


def map_rows(feature: torch.Tensor) -> torch.Tensor:
    """A (B, C, H, W) feature map as one row of C channel values per sample and position: (B·H·W, C)."""
    return feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1])


@LOSSES.register("dist_plus")
class DISTPlus(DIST):
    """DIST+ (Huang et al., TPAMI 2025, "DIST+: Knowledge Distillation From a Stronger Adaptive Teacher"): DIST's
    logit relations plus the same Pearson relations on each pair of hooked feature maps.

    ``inter`` and ``intra`` are :class:`DIST`'s. On each pair of (B, C, H, W) maps, ``channel``: 1 − the mean
    over samples and positions of the Pearson correlation of the C channel values; ``spatial``: 1 − the mean
    over positions of the correlation across the batch of the maps summed over channels; weighted ι and κ and
    summed over pairs. The student's maps pass kd's connector to the teacher's shape (the identity when the
    shapes agree, as in the reference's ResNet-18/34 layer4 pair).

    Follows torchdistill's ``DISTPlusLoss`` (yoshitomo-matsubara/torchdistill torchdistill/losses/mid_level.py)
    with the values of its sample configuration (configs/sample/ilsvrc2012/dist_plus/resnet18_from_resnet34.yaml:
    β = γ = 2, ι = κ = 1, τ = 1, weight 2, CE weight 1), except the channel term: torchdistill adds the mean
    correlation itself, which rewards anti-correlated channels, where every other DIST term (its spatial one
    included) is 1 − the correlation; kd uses 1 − r, which changes the gradient's sign, not only a constant.
    The paper's other addition, teacher acclimation, is no part of torchdistill's loss nor of kd's (whose
    teacher stays frozen).
    """

    weight = 2.0
    ce_weight = 1.0
    features = True
    connect = True
    space = {"weight": Range(0.25, 8.0, log=True), "ce_weight": Range(0.1, 2.0, log=True),
             "temperature": Range(0.5, 8.0, log=True), "beta": Range(0.25, 8.0, log=True),
             "gamma": Range(0.25, 8.0, log=True), "iota": Range(0.1, 4.0, log=True),
             "kappa": Range(0.1, 4.0, log=True)}

    def __init__(self, temperature: float = 1.0, beta: float = 2.0, gamma: float = 2.0, iota: float = 1.0,
                 kappa: float = 1.0, student_shapes: Shapes | None = None,
                 teacher_shapes: Shapes | None = None) -> None:
        super().__init__(temperature, beta, gamma)
        require_maps("dist_plus", student_shapes, "student")
        require_maps("dist_plus", teacher_shapes, "teacher")
        self.iota = iota
        self.kappa = kappa

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                student_features: dict[str, torch.Tensor],
                teacher_features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms = super().forward(student_logits, teacher_logits, labels)
        for side, features in (("student", student_features), ("teacher", teacher_features)):
            require_maps("dist_plus", {k: tuple(v.shape) for k, v in features.items()}, side, per_sample=False)
        channel = spatial = student_logits.new_zeros(())
        for s, t in feature_pairs(student_features, teacher_features):
            channel = channel + 1 - pearson_correlation(map_rows(s), map_rows(t), self.eps).mean()
            s, t = s.sum(dim=1).flatten(1).T, t.sum(dim=1).flatten(1).T  # (H·W, B): each position across the batch
            spatial = spatial + 1 - pearson_correlation(s, t, self.eps).mean()
        return terms | {"channel": self.iota * channel, "spatial": self.kappa * spatial}


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


# ---------------------------------------------------------------- SKD

def direction_gram(logits: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of the L2-normalised logit rows: the cosines between every two samples' logits, (B, B)."""
    directions = F.normalize(logits, p=2, dim=1)
    return directions @ directions.T


@LOSSES.register("skd")
class SKD(DistillationLoss):
    """Streamlined Knowledge Distillation (Jeong, Lee & Choi, CVPR 2026): instance-wise and direction-wise terms.

    ``instance``: KL(softmax(t/T) ‖ softmax(s/T)) averaged over the batch, without Hinton's T² factor.
    ``direction``: with D = G_s − G_t the difference of :func:`direction_gram` and Σ' = cov(D's columns over its
    rows) + λI (Tikhonov), the batch mean of the Mahalanobis norms √(D_i Σ'⁻¹ D_iᵀ) of D's rows, Σ' inverted
    through its Cholesky factor. Σ' depends on the student too and is differentiated, as in the reference.
    A batch of one sample has no direction relations: ``direction`` is 0 there (the reference's covariance of
    one observation is NaN).

    Follows torchdistill's ``SKDInstanceLoss`` and ``SKDDirectionLoss`` (yoshitomo-matsubara/torchdistill
    torchdistill/losses/mid_level.py: T = 4, λ = 0.1, the values it takes from the authors' code) and its sample
    configuration (configs/sample/ilsvrc2012/skd/resnet18_from_resnet34.yaml): both terms weighted 1 and no
    label cross-entropy, so CE weight 0.
    """

    weight = 1.0
    ce_weight = 0.0
    space = {"weight": Range(0.1, 4.0, log=True), "ce_weight": Range(0.0, 1.0),
             "temperature": Range(1.0, 16.0, log=True), "tikhonov": Range(0.001, 1.0, log=True)}

    def __init__(self, temperature: float = 4.0, tikhonov: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature
        self.tikhonov = tikhonov

    def direction(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The mean Mahalanobis norm of the rows of G_s − G_t under their Tikhonov-regularised covariance."""
        if len(student_logits) < 2:
            return 0 * student_logits.sum()
        diff = direction_gram(student_logits) - direction_gram(teacher_logits)
        eye = torch.eye(diff.shape[1], dtype=diff.dtype, device=diff.device)
        precision = torch.cholesky_inverse(torch.linalg.cholesky(torch.cov(diff.T) + self.tikhonov * eye))
        squared = torch.einsum("bi,ij,bj->b", diff, precision, diff)
        positive = squared > 0  # √ has no gradient at 0: a row the student matches exactly gives 0 and no gradient
        return (torch.where(positive, squared, torch.ones_like(squared)).sqrt() * positive).mean()

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.temperature
        log_student = F.log_softmax(student_logits / t, dim=1)
        log_teacher = F.log_softmax(teacher_logits / t, dim=1)
        instance = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
        return {"instance": instance, "direction": self.direction(student_logits, teacher_logits)}
