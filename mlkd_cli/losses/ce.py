"""Cross-entropy against probability targets (a one-hot label, or a Mixup/CutMix blend of two), in
fp32: what a teacher trains by, and the label term every distillation loss mixes in."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, labelled: torch.Tensor | None = None
) -> torch.Tensor:
    """CE(logits, targets) in fp32, `targets` as probabilities; with `labelled` (a bool per
    image, under a label budget) its mean over those images only (0 for a batch with none)."""
    s = logits.float()
    if labelled is None:
        return F.cross_entropy(s, targets)
    per_image = F.cross_entropy(s, targets, reduction="none")
    weights = labelled.to(per_image.dtype)
    return (per_image * weights).sum() / weights.sum().clamp(min=1.0)  # no host sync
