"""DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

Instead of matching the teacher's probabilities exactly (KL), the student matches their
relations: with y = softmax(z/τ) for a batch (B images x C classes),
- inter-class: 1 − the mean over images of the Pearson correlation of the student's and the
  teacher's rows (how the classes rank within one image);
- intra-class: 1 − the mean over classes of the Pearson correlation of their columns (how the
  images rank within one class).
Both carry τ². The paper's ImageNet defaults (β = γ = 1, τ = 1) are in the registry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlkd_cli.losses.heads import Head, MultiExitLoss
from mlkd_cli.losses.registry import LOSSES

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


class MultiExitDISTLoss(MultiExitLoss):
    """DIST at every head: `CE + β·inter + γ·intra` at DIST's own temperature τ (the paper's 1),
    not --temperature; as in the paper CE weighs 1 (--alpha does not apply)."""

    PARAMS = LOSSES["dist"].PARAMS

    @property
    def teacher_temperature(self) -> float:
        """DIST reads the teacher at its own τ."""
        return self.params["tau"]

    def distill_terms(self, head: Head) -> dict[str, torch.Tensor]:
        """`inter` and `intra`, each weighted."""
        inter, intra = dist_terms(head.logits, head.teacher_logits, self.params["tau"])
        return {
            "inter": self.params["inter_weight"] * inter,
            "intra": self.params["intra_weight"] * intra,
        }
