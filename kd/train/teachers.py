"""What a stage learns from: one trained teacher or several as one (their logits averaged), and their checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from kd.config import Config


class TeacherEnsemble(nn.Module):
    """The weighted mean of its members' logits (weights normalised to sum to one).

    Each forward keeps the members' own logits in ``member_logits``, so a stage can log how each
    teacher alone does and agrees with the student without running them twice.
    """

    def __init__(self, members: list[nn.Module], weights: list[float] | None = None) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        chosen = torch.tensor(weights or [1.0] * len(members), dtype=torch.float32)
        self.register_buffer("weights", chosen / chosen.sum(), persistent=False)
        self.member_logits: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.member_logits = [member(x) for member in self.members]
        return sum(w * logits for w, logits in zip(self.weights, self.member_logits))


@dataclass(frozen=True)
class Teacher:
    """What a distill or assistant stage learns from: one network, or an ensemble, and their checkpoints."""

    archs: tuple[str, ...]
    checkpoints: tuple[Path, ...]
    network: nn.Module | None  # a TeacherEnsemble for several; None when the teacher cache holds every output
    weights: tuple[float, ...] = ()  # an ensemble's --ensemble_weights (empty: equal)
    top1: float | None = None  # percent: its validation top-1 as kd recorded it, when known


def teacher_archs(c: Config) -> list[str]:
    """The architecture of each --teacher_checkpoint: one --teacher_arch for all, or one each."""
    return c.teacher_arch * len(c.teacher_checkpoint) if len(c.teacher_arch) == 1 else list(c.teacher_arch)
