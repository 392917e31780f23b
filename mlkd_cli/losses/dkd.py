"""Decoupled knowledge distillation (DKD; Zhao et al., "Decoupled Knowledge Distillation",
CVPR 2022).

With p = softmax(z/T) and g the target class, Hinton's KL(p_teacher ‖ p_student) splits into
- TCKD: the KL divergence of the binary distributions [p_g, 1 − p_g] (target against the rest);
- NCKD: the KL divergence of the distributions over the non-target classes alone, renormalised;
and KD = TCKD + (1 − p_teacher,g) · NCKD, image by image. DKD weighs the two freely,
`α·TCKD + β·NCKD`, freeing NCKD from the (1 − p_teacher,g) factor that shrinks it exactly where the
teacher is confident. Both terms carry T², as KD does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The paper's CIFAR-100 setting: α = 1, β = 8, the DKD weight warmed up linearly over the first
# 20 of 240 epochs (here a fraction of the run, so that short runs warm up in proportion).
TCKD_WEIGHT = 1.0
NCKD_WEIGHT = 8.0
WARMUP_FRACTION = 20 / 240


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
