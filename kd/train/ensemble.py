"""Several trained teachers as one: their logits averaged, for distilling from an ensemble."""

from __future__ import annotations

import torch
from torch import nn


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
