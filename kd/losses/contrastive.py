"""Contrastive representation distillation (CRD): a student's embedding told apart from other images'."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from kd.losses.base import LOSSES, Range
from kd.losses.features import FeatureLoss, Shapes, feature_pairs, flat


class Embed(nn.Module):
    """CRD's embedding head: flatten, a linear map to ``dim_out``, L2-normalise (mdistiller's ``Embed``)."""

    def __init__(self, dim_in: int, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(flat(x))
        return x / x.pow(2).sum(1, keepdim=True).sqrt()


def nce_loss(scores: torch.Tensor, num_samples: int, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE loss (Eq. 18; mdistiller/RepDistiller ``ContrastLoss``) of (B, K+1) scores, positive first.

    With m = K negatives from the uniform noise P_n = 1/N: ``-(Σ_b log(P_pos / (P_pos + m P_n + eps))
    + Σ_b,k log(m P_n / (P_neg + m P_n + eps))) / B``.
    """
    m = scores.shape[1] - 1
    noise = m / float(num_samples)
    log_d1 = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    log_d0 = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


@LOSSES.register("crd")
class ContrastiveRepresentationDistillation(FeatureLoss):
    """Contrastive representation distillation (Tian et al., "Contrastive Representation Distillation", ICLR 2020).

    The last feature pair, flattened, is embedded by a student and a teacher head (linear +
    L2-normalise, ``feat_dim`` = 128). A memory bank per side (``num_samples`` × ``feat_dim``,
    initialised uniform in ±1/sqrt(feat_dim/3)) supplies, for each sample, its own row (the positive,
    index 0) and ``nce_k`` = 16384 negatives drawn uniformly with replacement, from torch's global RNG.
    Scores ``exp(<bank row, embedding> / nce_t)`` (nce_t = 0.07) are divided by a constant Z per side,
    ``mean score × num_samples`` estimated on the first training batch and kept as a buffer, and the
    NCE loss (``nce_loss``) of both anchors — the student embedding against the teacher bank and the
    teacher embedding against the student bank — is summed. After the loss, in training mode only,
    the batch's rows of each bank move to ``momentum · row + (1 - momentum) · embedding`` (0.5),
    renormalised. Weight 0.8, CE weight 1 (mdistiller's ``CRD.LOSS``).

    Follows mdistiller's / RepDistiller's ``CRD``, ``ContrastMemory`` and ``ContrastLoss``, with the
    memory's own uniform draw (the ``idx=None`` path) by default; ``negatives="exact"`` draws them as the references'
    CIFAR runs do (mdistiller's ``CRD.MODE`` "exact", RepDistiller's ``--mode exact``: the dataset's ``contrast_idx``,
    uniform over the training images of the other classes, without replacement unless ``nce_k`` exceeds them).
    Departures: an eval-mode call changes no state (neither the banks nor an unset Z, which it estimates for that
    call only), and the scores are computed in the banks' dtype (float32 under mixed precision, as exp(1/0.07)
    overflows float16).
    """

    weight = 0.8
    space = {"weight": Range(0.01, 2.0, log=True), "ce_weight": FeatureLoss.ce_range,
             "nce_t": Range(0.02, 0.5, log=True)}

    memory_s: torch.Tensor
    memory_t: torch.Tensor
    z_s: torch.Tensor
    z_t: torch.Tensor

    def __init__(self, student_shapes: Shapes, teacher_shapes: Shapes, num_samples: int, feat_dim: int = 128,
                 nce_k: int = 16384, nce_t: float = 0.07, momentum: float = 0.5, negatives: str = "uniform",
                 sample_labels: Sequence[int] | None = None) -> None:
        super().__init__()
        if not student_shapes or not teacher_shapes:
            raise ValueError("crd needs at least one hooked student and teacher feature")
        if not num_samples or num_samples < 1:
            raise ValueError(f"crd needs the training-set size (num_samples >= 1), got {num_samples}")
        if nce_k < 1 or feat_dim < 1 or nce_t <= 0 or not 0 <= momentum <= 1:
            raise ValueError(f"crd: need nce_k >= 1, feat_dim >= 1, nce_t > 0 and 0 <= momentum <= 1, got "
                             f"nce_k={nce_k}, feat_dim={feat_dim}, nce_t={nce_t}, momentum={momentum}")
        if negatives not in ("uniform", "exact"):
            raise ValueError(f"crd: negatives is uniform (from every training image) or exact (from other classes), "
                             f"got {negatives!r}")
        self.negatives = negatives
        if negatives == "exact":
            labels = torch.as_tensor(list(sample_labels or []), dtype=torch.long)
            if len(labels) != num_samples:
                raise ValueError(f"crd: negatives=exact needs the class of each of the {num_samples} training images, "
                                 f"got {len(labels)}")
            counts = torch.bincount(labels)
            if (counts == num_samples).any():
                raise ValueError("crd: negatives=exact needs two classes or more in the training set")
            self.register_buffer("sample_label", labels, persistent=False)
            self.distinct = nce_k <= num_samples - int(counts.max())  # else some anchor has too few negatives
        s_dim = math.prod(list(student_shapes.values())[-1])
        t_dim = math.prod(list(teacher_shapes.values())[-1])
        self.num_samples, self.feat_dim = int(num_samples), int(feat_dim)
        self.nce_k, self.nce_t, self.momentum = int(nce_k), float(nce_t), float(momentum)
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(num_samples, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(num_samples, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z_s", torch.tensor(-1.0))  # mdistiller's params[2] (Z_v1), < 0 = unset
        self.register_buffer("z_t", torch.tensor(-1.0))  # params[3] (Z_v2)

    def sample(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, nce_k + 1) bank rows: each sample's own index, then nce_k draws with replacement, uniform over every
        training image, or (``negatives="exact"``, the references' CIFAR mode) over the images of other classes."""
        device = self.memory_s.device
        if self.negatives == "uniform":
            drawn = torch.randint(self.num_samples, (len(indices), self.nce_k + 1), device=device)
            drawn[:, 0] = indices
            return drawn
        # Random keys, the anchor's own class last: the nce_k largest are distinct images of other classes, drawn
        # uniformly without replacement (the references' np.random.choice(cls_negative, k, replace=k > len)).
        own = self.sample_label.unsqueeze(0) == self.sample_label[indices].unsqueeze(1)
        if self.distinct:
            keys = torch.rand(len(indices), self.num_samples, device=device).masked_fill_(own, -1.0)
            negatives = keys.topk(self.nce_k, dim=1).indices
        else:  # too few negatives for some anchor: with replacement, among the others
            weights = (~own).float()
            negatives = torch.multinomial(weights, self.nce_k, replacement=True)
        return torch.cat([indices.unsqueeze(1), negatives], dim=1)

    def normalizer(self, z: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Z for one side: the stored constant, set from this batch if unset (stored only in training)."""
        value = torch.where(z < 0, scores.detach().mean() * self.num_samples, z)  # no host sync
        if self.training:
            z.copy_(value)
        return value

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                student_features: dict[str, torch.Tensor], teacher_features: dict[str, torch.Tensor],
                indices: torch.Tensor | None = None) -> torch.Tensor:
        if indices is None:
            raise ValueError("crd needs the dataset indices of the batch (indices)")
        f_s, f_t = feature_pairs(student_features, teacher_features)[-1]
        indices = indices.to(device=self.memory_s.device, dtype=torch.long).reshape(-1)
        if len(indices) != len(f_s):
            raise ValueError(f"crd: {len(indices)} indices for a batch of {len(f_s)}")
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise ValueError(f"crd: dataset indices must lie in [0, {self.num_samples}), got "
                             f"{indices.min().item()}..{indices.max().item()}")
        dtype = self.memory_s.dtype
        v_s, v_t = self.embed_s(f_s).to(dtype), self.embed_t(f_t).to(dtype)
        idx = self.sample(indices)
        with torch.autocast(v_s.device.type, enabled=False):  # scores in the banks' dtype, even under AMP
            # Student anchor against the teacher bank (mdistiller's out_v1), teacher anchor against the student's.
            out_s = torch.exp(torch.bmm(self.memory_t[idx].detach(), v_s.unsqueeze(2)).squeeze(2) / self.nce_t)
            out_t = torch.exp(torch.bmm(self.memory_s[idx].detach(), v_t.unsqueeze(2)).squeeze(2) / self.nce_t)
            out_s = out_s / self.normalizer(self.z_s, out_s)
            out_t = out_t / self.normalizer(self.z_t, out_t)
            loss = nce_loss(out_s, self.num_samples) + nce_loss(out_t, self.num_samples)
        if self.training:
            with torch.no_grad():
                for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                    rows = memory[indices] * self.momentum + v.detach() * (1 - self.momentum)
                    memory.index_copy_(0, indices, rows / rows.pow(2).sum(1, keepdim=True).sqrt())
        return loss
