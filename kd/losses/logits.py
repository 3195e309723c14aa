"""Distillation losses on logits: Hinton's softened KL and the MSE between logits."""

import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import LOSSES


def kl_softmax(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: KL(softmax(t/T) || softmax(s/T)) · T², averaged over the batch.

    The T² factor keeps the gradient scale independent of T, so alpha means the same at any T.
    """
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


@LOSSES.register("kl_softmax")
class KLSoftmax(nn.Module):
    """Hinton's distillation loss on temperature-softened softmax outputs."""

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        return kl_softmax(student_logits, teacher_logits, self.temperature)


@LOSSES.register("mse_logits")
class MSELogits(nn.Module):
    """Mean squared error between student and teacher logits (Ba & Caruana 2014), over all entries."""

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(student_logits, teacher_logits)
