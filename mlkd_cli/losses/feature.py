"""Feature distillation at the exits (FitNets: Romero et al., "FitNets: Hints for Thin Deep Nets",
ICLR 2015), as mlkd takes it: each exit's stage features, projected by a learned 1x1 convolution
(the adapter, owned by the student) to the matching teacher stage's width, regress onto that
stage's features.

The two maps are brought to one resolution by average pooling the finer one (a teacher fed a
larger input has larger maps). The error is the mean squared error relative to the teacher
features' mean square, so that one weight means the same on every architecture and stage (a
ResNet's last stage runs an order of magnitude larger than its first).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mlkd_cli.losses.dkd import MultiExitDKDLoss
from mlkd_cli.losses.heads import MultiExitLoss
from mlkd_cli.losses.kd import MultiExitKDLoss
from mlkd_cli.losses.params import FEATURE_PARAM
from mlkd_cli.losses.registry import LOSSES

EPS = 1e-6


def matched_resolution(
    student: torch.Tensor, teacher: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps (N, C, H, W) at the coarser one's resolution, the finer average-pooled."""
    size = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))
    if tuple(student.shape[-2:]) != size:
        student = F.adaptive_avg_pool2d(student, size)
    if tuple(teacher.shape[-2:]) != size:
        teacher = F.adaptive_avg_pool2d(teacher, size)
    return student, teacher


def feature_term(adapted: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """`mean((s − t)²) / mean(t²)` in fp32, for the adapted student map and the teacher's."""
    if adapted.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"feature maps {tuple(adapted.shape)} and {tuple(teacher.shape)} differ")
    s, t = matched_resolution(adapted.float(), teacher.float().detach())
    return (s - t).square().mean() / t.square().mean().clamp(min=EPS)


class FeatureTerms(MultiExitLoss):
    """The exits' feature terms, for a loss declaring FEATURE_PARAM: a logit loss with them is
    `class L(FeatureTerms, LogitLoss)`."""

    def feature_terms(
        self, features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Each exit's weighted feature term (`feature_term`)."""
        if len(features) != len(self.head_weights) - 1 or len(teacher_features) != len(features):
            raise ValueError("one adapted map and one teacher map per exit are needed")
        weight = self.params[FEATURE_PARAM.name]
        pairs = zip(features, teacher_features, strict=True)
        return [weight * feature_term(s, t) for s, t in pairs]


class MultiExitKDFeatureLoss(FeatureTerms, MultiExitKDLoss):
    """Hinton KD at every head, plus each exit's stage features regressed onto the teacher's
    matching stage through a 1x1 adapter."""

    PARAMS = LOSSES["kd+feature"].PARAMS


class MultiExitDKDFeatureLoss(FeatureTerms, MultiExitDKDLoss):
    """DKD at every head, plus the exits' feature terms (as `kd+feature`)."""

    PARAMS = LOSSES["dkd+feature"].PARAMS
