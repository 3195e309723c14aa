"""Losses on the ground-truth labels."""

import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import LOSSES


@LOSSES.register("ce")
class CrossEntropy(nn.Module):
    """Cross-entropy between the student's logits and the labels; ignores the teacher."""

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student_logits, labels)
