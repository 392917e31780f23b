"""What every distillation loss shares: the student's heads (the final one and each exit) each
learn from the teacher, weighed and summed; a head's loss mixes its distillation terms with
cross-entropy; every part is returned by name, so that it can be logged.

A loss is a subclass that says what one head learns (`distill_terms`) and declares its `PARAMS`
from its registry entry (`mlkd_cli/losses/registry.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from mlkd_cli.losses.ce import soft_cross_entropy
from mlkd_cli.losses.params import CE_WEIGHT, FEATURE_PARAM, LossParam


class Head(NamedTuple):
    """One head's batch, as a loss reads it: the head's logits, the teacher's, the (soft)
    targets, and which images' labels may be read (None: all)."""

    logits: torch.Tensor
    teacher_logits: torch.Tensor
    targets: torch.Tensor
    labelled: torch.Tensor | None = None


class MultiExitLoss(nn.Module):
    """A distillation loss at the final head plus each exit, summed with per-head weights.

    Each head's loss is `α·distill + (1−α)·CE`, where `distill` is the sum of `distill_terms`.
    A loss with the CE_WEIGHT parameter (DKD, DIST) weighs its head `distill + ce_weight·CE`
    instead. A loss with FEATURE_PARAM adds each exit's feature term (`losses/feature.py`).
    """

    PARAMS: tuple[LossParam, ...] = ()
    uses_labels = False  # whether `distill_terms` reads the targets (a label budget hides some)

    def __init__(
        self,
        temperature: float,
        alpha: float,
        exit_weights: Sequence[float],
        **params: float,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha
        self.head_weights = [1.0, *exit_weights]
        known = {p.name: p.default for p in self.PARAMS}
        unknown = set(params) - set(known)
        if unknown:
            raise ValueError(f"{type(self).__name__} takes no parameter {sorted(unknown)}")
        self.params = {**known, **{k: float(v) for k, v in params.items()}}

    @classmethod
    def has_features(cls) -> bool:
        """Whether the loss has feature terms at the exits (see FEATURE_PARAM)."""
        return FEATURE_PARAM in cls.PARAMS

    @classmethod
    def adds_to_ce(cls) -> bool:
        """Whether the loss adds its terms to a weighted CE rather than α-mixing (CE_WEIGHT)."""
        return CE_WEIGHT in cls.PARAMS

    @property
    def mixing(self) -> tuple[float, float]:
        """(weight of the distillation terms, weight of CE) at every head."""
        if self.adds_to_ce():
            return 1.0, self.params[CE_WEIGHT.name]
        return self.alpha, 1.0 - self.alpha

    @property
    def reads_labels(self) -> bool:
        """Whether a batch's targets enter the loss: a CE term, or the loss's own use."""
        return self.mixing[1] > 0 or self.uses_labels

    @property
    def teacher_temperature(self) -> float:
        """The temperature at which the loss reads the teacher's logits (a stored Mixup target
        is blended at it: `mlkd_cli/data/replay.py`)."""
        return self.temperature

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Told before each epoch (0-based) of `epochs`; for losses that change over a run."""

    def distill_terms(self, head: Head) -> dict[str, torch.Tensor]:
        """What one head learns from the teacher, by name (their sum is its distillation loss)."""
        raise NotImplementedError(f"{type(self).__name__} must say what a head learns")

    def feature_terms(
        self, features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Each exit's weighted feature term, for a loss with FEATURE_PARAM."""
        raise NotImplementedError(
            f"{type(self).__name__} declares {FEATURE_PARAM.name}: derive it from "
            "mlkd_cli.losses.feature.FeatureTerms"
        )

    def named(
        self,
        outputs: Sequence[torch.Tensor],
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        labelled: torch.Tensor | None = None,
        features: Sequence[torch.Tensor] | None = None,
        teacher_features: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss and its parts: `loss` (what trains), the final head's distillation terms
        (`kd`, or the loss's own) and `ce` term (when α < 1), and each exit's own loss
        `exit1_loss`, ... (before its weight). `labelled`: which images' labels may be used
        (see `soft_cross_entropy`). `features`, `teacher_features`: each exit's adapted map and
        the teacher stage's, for losses with FEATURE_PARAM."""
        if len(outputs) != len(self.head_weights):
            raise ValueError(f"expected {len(self.head_weights)} heads, got {len(outputs)}")
        teacher_logits = teacher_logits.detach()
        parts: dict[str, torch.Tensor] = {}
        total = None
        for head, (weight, logits) in enumerate(zip(self.head_weights, outputs, strict=True)):
            loss, head_parts = self.head_loss(Head(logits, teacher_logits, targets, labelled))
            if head == 0:
                parts.update(head_parts)
            else:
                parts[f"exit{head}_loss"] = loss
            total = weight * loss if total is None else total + weight * loss
        if self.has_features():
            if features is None or teacher_features is None:
                raise ValueError(f"{type(self).__name__} needs the exits' and teacher's features")
            for i, term in enumerate(self.feature_terms(features, teacher_features), start=1):
                parts[f"feat_exit{i}"] = term
                total = total + term
        return {"loss": total, **parts}

    def head_loss(self, head: Head) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One head's `w·distill + c·CE` (`mixing`), with its named terms (no `ce` when c = 0)."""
        parts = self.distill_terms(head)
        distill = torch.stack(list(parts.values())).sum()
        weight, ce_weight = self.mixing
        if ce_weight <= 0:
            return weight * distill, parts
        ce = soft_cross_entropy(head.logits, head.targets, head.labelled)
        return weight * distill + ce_weight * ce, {**parts, "ce": ce}

    def forward(
        self, outputs: Sequence[torch.Tensor], teacher_logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        return self.named(outputs, teacher_logits, targets)["loss"]
