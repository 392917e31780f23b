"""Knowledge-distillation losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Hinton KD: `α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y)`.

    The KL divergence is summed over classes and averaged over the batch (the original averaged
    over classes too, shrinking the distillation term by the class count). `targets` are
    probabilities (Mixup/CutMix soft targets). Computed in fp32.
    """
    s = student_logits.float()
    t = teacher_logits.float() / temperature
    log_p_student = F.log_softmax(s / temperature, dim=1)
    p_teacher = F.softmax(t, dim=1)
    kl = (p_teacher * (F.log_softmax(t, dim=1) - log_p_student)).sum(dim=1).mean()
    loss = alpha * temperature * temperature * kl
    if alpha < 1.0:
        loss = loss + (1.0 - alpha) * F.cross_entropy(s, targets)
    return loss


class MultiExitKDLoss(nn.Module):
    """The KD loss of the final head plus each exit, summed with per-head weights."""

    def __init__(self, temperature: float, alpha: float, exit_weights: Sequence[float]) -> None:
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha
        self.head_weights = [1.0, *exit_weights]

    def forward(
        self, outputs: Sequence[torch.Tensor], teacher_logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        if len(outputs) != len(self.head_weights):
            raise ValueError(f"expected {len(self.head_weights)} heads, got {len(outputs)}")
        teacher_logits = teacher_logits.detach()
        return sum(
            w * kd_loss(s, teacher_logits, targets, self.temperature, self.alpha)
            for w, s in zip(self.head_weights, outputs, strict=True)
        )
