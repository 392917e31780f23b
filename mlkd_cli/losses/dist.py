"""DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

Instead of matching the teacher's probabilities exactly (KL), the student matches their
relations: with y = softmax(z/τ) for a batch (B images x C classes),
- inter-class: 1 − the mean over images of the Pearson correlation of the student's and the
  teacher's rows (how the classes rank within one image);
- intra-class: 1 − the mean over classes of the Pearson correlation of their columns (how the
  images rank within one class).
Both carry τ². The paper's ImageNet defaults: β = γ = 1, τ = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INTER_WEIGHT = 1.0
INTRA_WEIGHT = 1.0
TAU = 1.0
EPS = 1e-8


def mean_pearson(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """The Pearson correlation of `a` and `b` along `dim`, averaged over the other dimension."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    return F.cosine_similarity(a, b, dim=dim, eps=EPS).mean()


def dist_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter, intra), unweighted, for one batch of logits (B, C)."""
    y_s = F.softmax(student_logits.float() / tau, dim=1)
    y_t = F.softmax(teacher_logits.float() / tau, dim=1)
    scale = tau * tau
    inter = scale * (1.0 - mean_pearson(y_s, y_t, dim=1))
    intra = scale * (1.0 - mean_pearson(y_s, y_t, dim=0))
    return inter, intra
