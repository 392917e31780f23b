"""Knowledge-distillation losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def kd_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    with_ce: bool = True,
    class_mean: bool = False,
    labelled: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(T²·KL(softmax(t/T) ‖ softmax(s/T)), CE(s, y))`, in fp32; CE is None without `with_ce`.

    The KL divergence is summed over classes and averaged over the batch (the original averaged
    over classes too, shrinking the distillation term by the class count). `targets` are
    probabilities (Mixup/CutMix soft targets). `class_mean` divides by the class count as well,
    as the original's `nn.KLDivLoss()` (reduction "mean": over batch x classes) did.
    `labelled` (a bool per image, under a label budget) limits CE to the images whose labels may
    be used: its mean over those (0 for a batch with none).
    """
    s = student_logits.float()
    t = teacher_logits.float() / temperature
    log_p_student = F.log_softmax(s / temperature, dim=1)
    p_teacher = F.softmax(t, dim=1)
    kl = (p_teacher * (F.log_softmax(t, dim=1) - log_p_student)).sum(dim=1).mean()
    if class_mean:
        kl = kl / s.shape[1]
    ce = None
    if with_ce and labelled is None:
        ce = F.cross_entropy(s, targets)
    elif with_ce:
        per_image = F.cross_entropy(s, targets, reduction="none")
        weights = labelled.to(per_image.dtype)
        ce = (per_image * weights).sum() / weights.sum().clamp(min=1.0)  # no host sync
    return temperature * temperature * kl, ce


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Hinton KD: `α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y)` (see `kd_terms`)."""
    kd, ce = kd_terms(student_logits, teacher_logits, targets, temperature, alpha < 1.0)
    return alpha * kd if ce is None else alpha * kd + (1.0 - alpha) * ce


class MultiExitKDLoss(nn.Module):
    """The KD loss of the final head plus each exit, summed with per-head weights."""

    class_mean = False  # see `kd_terms`

    def __init__(self, temperature: float, alpha: float, exit_weights: Sequence[float]) -> None:
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha
        self.head_weights = [1.0, *exit_weights]

    def named(
        self,
        outputs: Sequence[torch.Tensor],
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        labelled: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss and its parts: `loss` (what trains), the final head's `kd` term and `ce`
        term (when α < 1), and each exit's own loss `exit1_loss`, ... (before its weight).
        `labelled`: which images' labels the CE term may use (see `kd_terms`)."""
        if len(outputs) != len(self.head_weights):
            raise ValueError(f"expected {len(self.head_weights)} heads, got {len(outputs)}")
        teacher_logits = teacher_logits.detach()
        parts: dict[str, torch.Tensor] = {}
        total = None
        for head, (weight, logits) in enumerate(zip(self.head_weights, outputs, strict=True)):
            loss, kd, ce = self.head_loss(logits, teacher_logits, targets, labelled)
            if head == 0:
                parts["kd"] = kd
                if ce is not None:
                    parts["ce"] = ce
            else:
                parts[f"exit{head}_loss"] = loss
            total = weight * loss if total is None else total + weight * loss
        return {"loss": total, **parts}

    def head_loss(
        self,
        logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        labelled: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One head's `α·KD + (1−α)·CE`, with its KD and CE terms (CE None when α = 1)."""
        kd, ce = kd_terms(
            logits,
            teacher_logits,
            targets,
            self.temperature,
            self.alpha < 1.0,
            self.class_mean,
            labelled,
        )
        loss = self.alpha * kd if ce is None else self.alpha * kd + (1.0 - self.alpha) * ce
        return loss, kd, ce

    def forward(
        self, outputs: Sequence[torch.Tensor], teacher_logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        return self.named(outputs, teacher_logits, targets)["loss"]


# Distillation losses by name (config key `loss`): a new loss is one entry here. Each takes
# (temperature, alpha, exit weights) and has `named(outputs, teacher_logits, targets)`.
class OriginalMultiExitKDLoss(MultiExitKDLoss):
    """The original's loss: its KL term averaged over classes too (`nn.KLDivLoss()`), which
    divides the distillation signal by the class count."""

    class_mean = True


LOSSES: dict[str, type[MultiExitKDLoss]] = {
    "multi_exit_kd": MultiExitKDLoss,
    "original_multi_exit_kd": OriginalMultiExitKDLoss,
}
