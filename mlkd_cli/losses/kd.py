"""Hinton knowledge distillation (Hinton et al., "Distilling the Knowledge in a Neural Network",
2015): each head matches the teacher's probabilities softened by a temperature T,
`T²·KL(softmax(t/T) ‖ softmax(s/T))`, mixed with cross-entropy as `α·KD + (1−α)·CE`.

The KL divergence is summed over classes and averaged over the batch. The original mlkd code
averaged over the classes too (`nn.KLDivLoss()`), which divides the distillation signal by the
class count; `original` keeps that, for `--recipe original`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlkd_cli.losses.ce import soft_cross_entropy
from mlkd_cli.losses.heads import Head, MultiExitLoss
from mlkd_cli.losses.registry import LOSSES


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
    ce = soft_cross_entropy(s, targets, labelled) if with_ce else None
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


class MultiExitKDLoss(MultiExitLoss):
    """Hinton KD at the final head plus each exit: each head `α·KD + (1−α)·CE`."""

    PARAMS = LOSSES["kd"].PARAMS
    class_mean = False  # see `kd_terms`

    def distill_terms(self, head: Head) -> dict[str, torch.Tensor]:
        """`kd`, the head's KL term (it reads no label)."""
        kd, _ = kd_terms(
            head.logits, head.teacher_logits, head.targets, self.temperature, False, self.class_mean
        )
        return {"kd": kd}


class OriginalMultiExitKDLoss(MultiExitKDLoss):
    """The original's loss: its KL term averaged over classes too (`nn.KLDivLoss()`), which
    divides the distillation signal by the class count."""

    PARAMS = LOSSES["original"].PARAMS
    class_mean = True
