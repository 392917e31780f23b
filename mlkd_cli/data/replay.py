"""Replaying a soft-label store (`mlkd_cli/data/softlabels.py`) as training targets: the target
of a Mixup/CutMix image from the stored teacher outputs of its two unmixed views.

A live teacher sees the mixed image. A soft-label store holds the teacher's outputs for the two
unmixed views only, so a mixed image's target is their blend with the images' own share λ (as
FKD does): `p = λ·softmax(z_a/T) + (1 − λ)·softmax(z_b/T)` at the temperature T the loss reads
the teacher at. It is returned as logits, `T·log p`, so that every loss takes it unchanged:
softmax of those over T is exactly `p`, and so is any renormalised part of it (DKD's
non-target term).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def mixed_teacher_logits(logits: torch.Tensor, lam: float, temperature: float) -> torch.Tensor:
    """Logits whose softmax at `temperature` is `λ·p(row) + (1 − λ)·p(partner)`, the partner of
    row i being row B−1−i (the batch reversed, as timm's batch mixing pairs them); fp32."""
    if lam >= 1.0:
        return logits
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    own, partner = math.log(lam) if lam > 0 else -math.inf, math.log1p(-lam)
    blended = torch.logaddexp(log_p + own, log_p.flip(0) + partner)
    return temperature * blended
