"""Replaying a soft-label store (`mlkd_cli/data/softlabels.py`) as training targets: a batch's
teacher logits gathered from the store's tables in the images' epoch views, and the target of a
Mixup/CutMix image from the stored teacher outputs of its two unmixed views.

The tables are the store's top-k logits (images, views, k) with their classes; when the store
holds every class they are put in class order once (`replay_tables`), so a step only gathers.
Classes outside a stored top-k take STORE_FILL: probability 0 at any temperature.

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

# The logit a class outside a stored top-k takes: exp(-1e4 / T) is 0 in fp32 for any usable T.
STORE_FILL = -1e4


def replay_tables(
    logits: torch.Tensor, classes: torch.Tensor, num_classes: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A store's tables (`SoftLabelStore.tables`) on `device`, ready for `stored_logits`: with
    every class stored, the logits in class order and no classes (None); otherwise both."""
    if logits.shape[-1] == num_classes:
        # Every class stored: put them in class order once, so a step only gathers.
        # (An unreadable image's -1s land on class 0; it never trains.)
        order = classes.long().clamp(min=0)
        return torch.empty_like(logits).scatter_(2, order, logits).to(device), None
    return logits.to(device), classes.to(device)


def stored_logits(
    logits: torch.Tensor,
    classes: torch.Tensor | None,
    epoch_views: torch.Tensor,
    indices: torch.Tensor,
    num_classes: int,
) -> torch.Tensor:
    """Full (batch, classes) teacher logits from a store's tables (images, views, k) for the
    images at `indices` in their `epoch_views`, on the tables' device without a host sync.
    `classes` None: the tables hold every class in order, a gather is all. Otherwise the
    classes outside the stored top-k get STORE_FILL (probability 0 at any temperature, and no
    0 x inf in a KL term)."""
    index = indices.to(logits.device, non_blocking=True)
    view = epoch_views[index]
    top = logits[index, view].float()
    if classes is None:
        return top
    which = classes[index, view].long().clamp(min=0)
    full = torch.full((index.shape[0], num_classes), STORE_FILL, device=logits.device)
    return full.scatter_(1, which, top)


def mixed_teacher_logits(logits: torch.Tensor, lam: float, temperature: float) -> torch.Tensor:
    """Logits whose softmax at `temperature` is `λ·p(row) + (1 − λ)·p(partner)`, the partner of
    row i being row B−1−i (the batch reversed, as timm's batch mixing pairs them); fp32."""
    if lam >= 1.0:
        return logits
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    own, partner = math.log(lam) if lam > 0 else -math.inf, math.log1p(-lam)
    blended = torch.logaddexp(log_p + own, log_p.flip(0) + partner)
    return temperature * blended
