"""Decoupled knowledge distillation (DKD; Zhao et al., "Decoupled Knowledge Distillation",
CVPR 2022).

With p = softmax(z/T) and g the target class, Hinton's KL(p_teacher ‖ p_student) splits into
- TCKD: the KL divergence of the binary distributions [p_g, 1 − p_g] (target against the rest);
- NCKD: the KL divergence of the distributions over the non-target classes alone, renormalised;
and KD = TCKD + (1 − p_teacher,g) · NCKD, image by image. DKD weighs the two freely,
`α·TCKD + β·NCKD`, freeing NCKD from the (1 − p_teacher,g) factor that shrinks it exactly where the
teacher is confident. Both terms carry T², as KD does. The defaults (the paper's CIFAR-100
setting: α = 1, β = 8, a warm-up over the first 20 of 240 epochs) are in the registry.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mlkd_cli.losses.heads import Head, MultiExitLoss
from mlkd_cli.losses.registry import LOSSES


def dkd_per_image(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) of each image, times T², for target class indices `target` (B,)."""
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    is_target = F.one_hot(target, s.shape[1]).bool()
    others_s = s.masked_fill(is_target, float("-inf"))
    others_t = t.masked_fill(is_target, float("-inf"))
    # log p_g and log(1 − p_g), the latter a log-sum-exp over the other classes (stable).
    lse_s, lse_t = torch.logsumexp(s, dim=1), torch.logsumexp(t, dim=1)
    log_target_s = s.gather(1, target[:, None]).squeeze(1) - lse_s
    log_target_t = t.gather(1, target[:, None]).squeeze(1) - lse_t
    log_rest_s = torch.logsumexp(others_s, dim=1) - lse_s
    log_rest_t = torch.logsumexp(others_t, dim=1) - lse_t
    tckd = log_target_t.exp() * (log_target_t - log_target_s) + log_rest_t.exp() * (
        log_rest_t - log_rest_s
    )
    # The distributions among the non-target classes. The target's entries (log 0 = −inf) are
    # set to 0 before any arithmetic, so that neither the value nor its gradient meets inf − inf.
    log_qs = F.log_softmax(others_s, dim=1).masked_fill(is_target, 0.0)
    log_qt = F.log_softmax(others_t, dim=1).masked_fill(is_target, 0.0)
    qt = log_qt.exp().masked_fill(is_target, 0.0)
    nckd = (qt * (log_qt - log_qs)).sum(dim=1)
    scale = temperature * temperature
    return scale * tckd, scale * nckd


def dkd_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) averaged over the batch, unweighted, for `targets` as probabilities (B, C).

    A Mixup/CutMix target blends two labels: the terms are taken for each of the target's two
    largest classes and weighed by their shares of it (one class, weight 1, without mixing).
    """
    weights, classes = targets.float().topk(min(2, targets.shape[1]), dim=1)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-12)
    per_label = [
        dkd_per_image(student_logits, teacher_logits, classes[:, k], temperature)
        for k in range(classes.shape[1])
    ]
    tckd = torch.stack([t for t, _ in per_label], dim=1)
    nckd = torch.stack([n for _, n in per_label], dim=1)
    return (weights * tckd).sum(dim=1).mean(), (weights * nckd).sum(dim=1).mean()


class MultiExitDKDLoss(MultiExitLoss):
    """Decoupled KD at every head: `CE + w·(α·TCKD + β·NCKD)`, the weight `w` rising linearly
    from 0 to 1 over the run's first `warmup` share, as in the paper (whose CE weighs 1: --alpha
    does not apply).

    DKD needs each image's target class. Under a label budget an image whose label is hidden
    takes the teacher's top class instead, so no hidden label is read.
    """

    PARAMS = LOSSES["dkd"].PARAMS
    uses_labels = True

    def __init__(
        self, temperature: float, alpha: float, exit_weights: Sequence[float], **params: float
    ) -> None:
        super().__init__(temperature, alpha, exit_weights, **params)
        self.warmup = 1.0

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """The warm-up weight for this epoch (1 once the warm-up is over)."""
        span = self.params["warmup"] * epochs
        self.warmup = 1.0 if span <= 0 else min(1.0, (epoch + 1) / span)

    def distill_terms(self, head: Head) -> dict[str, torch.Tensor]:
        """`tckd` and `nckd`, each weighted (warm-up included)."""
        logits, teacher_logits, targets, labelled = head
        if labelled is not None:
            guess = F.one_hot(teacher_logits.argmax(dim=1), targets.shape[1]).to(targets.dtype)
            targets = torch.where(labelled[:, None], targets, guess)
        tckd, nckd = dkd_terms(logits, teacher_logits, targets, self.temperature)
        return {
            "tckd": self.warmup * self.params["tckd_weight"] * tckd,
            "nckd": self.warmup * self.params["nckd_weight"] * nckd,
        }
