"""CTKD: a temperature learned adversarially, on a curriculum over the epochs."""

from __future__ import annotations

import math

import torch
from torch import nn

from kd.losses.base import LOSSES, DistillationLoss, Range
from kd.losses.logits import kl_softmax


class ReversedGradient(torch.autograd.Function):
    """The identity going forward; going back, the gradient times −λ (Ganin & Lempitsky's gradient reversal)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


@LOSSES.register("ctkd")
class CTKD(DistillationLoss):
    """Curriculum Temperature for Knowledge Distillation (Li et al., AAAI 2023), with its global temperature.

    Hinton's KL(softmax(t/T) ‖ softmax(s/T)) · T² at a learned temperature T = t_start + t_end · σ(θ), θ a
    parameter trained with the student (starting at 1, so T starts at about 15.6). A gradient reversal layer
    between θ and T makes θ ascend the loss the student descends: θ receives −λ times its gradient, so the
    temperature seeks the hardest distillation. λ follows a cosine curriculum over the epochs, from λ_min to
    λ_max reached after ``decay_loops`` epochs: λ(n) = λ_min + (λ_max − λ_min) · (1 − cos(π · min(n, L) / L)) / 2
    at the reference's epoch n = kd's 0-based epoch + 1. The teacher's raw logits come in (kd's teacher cache
    stores them unsoftened), and both sides are divided by the learned T here.

    Follows zhengli97/CTKD: models/temp_global.py (θ = ``global_T``, initialised to 1; the reversal layer),
    helper/loops.py (T = t_start + t_end · sigmoid(θ); loss = γ·CE + α·KD), distiller_zoo/KD.py (the KD loss,
    times T²) and train_student.py (``CosineDecay``; t_start = 1, t_end = 20), with the CIFAR-100 script's
    values (scripts/run_cifar_distill.sh: -r 0.1 -a 0.9, so weight 0.9 and CE weight 0.1; --decay_max 0
    --decay_min -1 --decay_loops 10). The code multiplies the gradient by its signed decay value, in [−1, 0];
    kd keeps the paper's λ in [0, 1] and negates it in the reversal. θ is trained by the student's optimiser,
    with its learning rate and weight decay, as the reference's single SGD trains both.
    """

    weight = 0.9
    ce_weight = 0.1
    share_of_total = True  # as Hinton's loss it wraps: α and 1 − α
    space = {"weight": Range(0.05, 0.99), "t_end": Range(5.0, 40.0, log=True),
             "lambda_max": Range(0.25, 4.0, log=True), "decay_loops": Range(2.0, 40.0, log=True)}

    def __init__(self, t_start: float = 1.0, t_end: float = 20.0, lambda_min: float = 0.0, lambda_max: float = 1.0,
                 decay_loops: float = 10.0) -> None:
        super().__init__()
        self.t_start = t_start
        self.t_end = t_end
        self.lambda_min = lambda_min
        self.lambda_max = lambda_max
        self.decay_loops = decay_loops
        self.global_t = nn.Parameter(torch.ones(1))

    def reversal(self, epoch: int) -> float:
        """λ at kd's 0-based ``epoch``: the reference's cosine curriculum at its 1-based epoch ``epoch + 1``
        (``decay_loops`` 0: λ_max from the start)."""
        if self.decay_loops <= 0:
            return self.lambda_max
        progress = min(max(epoch + 1, 0), self.decay_loops) / self.decay_loops
        return self.lambda_min + (self.lambda_max - self.lambda_min) * (1 - math.cos(math.pi * progress)) / 2

    def temperature_of(self, theta: torch.Tensor) -> torch.Tensor:
        """T = t_start + t_end · σ(θ), as a scalar, so that the logits' dtype decides the arithmetic's."""
        return (self.t_start + self.t_end * torch.sigmoid(theta)).reshape(())

    @property
    def temperature(self) -> float:
        """The temperature the loss distils at now."""
        return float(self.temperature_of(self.global_t.detach()))

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                epoch: int = 0) -> torch.Tensor:
        theta = ReversedGradient.apply(self.global_t, self.reversal(epoch))
        return kl_softmax(student_logits, teacher_logits, self.temperature_of(theta))
