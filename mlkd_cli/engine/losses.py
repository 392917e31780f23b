"""Knowledge-distillation losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mlkd_cli.losses import dist, dkd


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
    ce = labelled_cross_entropy(s, targets, labelled) if with_ce else None
    return temperature * temperature * kl, ce


def labelled_cross_entropy(
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


class MultiExitKDLoss(nn.Module):
    """Hinton KD at the final head plus each exit, summed with per-head weights.

    Each head's loss is `α·distill + (1−α)·CE`, where `distill` is the sum of `distill_terms`
    (one term for KD; a subclass in `LOSSES` changes what a head learns from the teacher).
    """

    class_mean = False  # see `kd_terms`
    uses_labels = False  # whether `distill_terms` reads the targets (a label budget hides some)

    def __init__(self, temperature: float, alpha: float, exit_weights: Sequence[float]) -> None:
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha
        self.head_weights = [1.0, *exit_weights]

    @property
    def reads_labels(self) -> bool:
        """Whether a batch's targets enter the loss: a CE term (α < 1), or the loss's own."""
        return self.alpha < 1.0 or self.uses_labels

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Told before each epoch (0-based) of `epochs`; for losses that change over a run."""

    def distill_terms(
        self,
        logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        labelled: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """What one head learns from the teacher, by name (their sum is its distillation loss)."""
        kd, _ = kd_terms(logits, teacher_logits, targets, self.temperature, False, self.class_mean)
        return {"kd": kd}

    def named(
        self,
        outputs: Sequence[torch.Tensor],
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        labelled: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss and its parts: `loss` (what trains), the final head's distillation terms
        (`kd`, or the loss's own) and `ce` term (when α < 1), and each exit's own loss
        `exit1_loss`, ... (before its weight). `labelled`: which images' labels may be used
        (see `kd_terms`)."""
        if len(outputs) != len(self.head_weights):
            raise ValueError(f"expected {len(self.head_weights)} heads, got {len(outputs)}")
        teacher_logits = teacher_logits.detach()
        parts: dict[str, torch.Tensor] = {}
        total = None
        for head, (weight, logits) in enumerate(zip(self.head_weights, outputs, strict=True)):
            loss, head_parts = self.head_loss(logits, teacher_logits, targets, labelled)
            if head == 0:
                parts.update(head_parts)
            else:
                parts[f"exit{head}_loss"] = loss
            total = weight * loss if total is None else total + weight * loss
        return {"loss": total, **parts}

    def head_loss(
        self,
        logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        labelled: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One head's `α·distill + (1−α)·CE`, with its named terms (no `ce` when α = 1)."""
        parts = self.distill_terms(logits, teacher_logits, targets, labelled)
        distill = torch.stack(list(parts.values())).sum()
        if self.alpha >= 1.0:
            return self.alpha * distill, parts
        ce = labelled_cross_entropy(logits, targets, labelled)
        return self.alpha * distill + (1.0 - self.alpha) * ce, {**parts, "ce": ce}

    def forward(
        self, outputs: Sequence[torch.Tensor], teacher_logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        return self.named(outputs, teacher_logits, targets)["loss"]


class OriginalMultiExitKDLoss(MultiExitKDLoss):
    """The original's loss: its KL term averaged over classes too (`nn.KLDivLoss()`), which
    divides the distillation signal by the class count."""

    class_mean = True


class MultiExitDKDLoss(MultiExitKDLoss):
    """Decoupled KD at every head (`mlkd_cli/losses/dkd.py`): `w·(α·TCKD + β·NCKD)`, the weight
    `w` rising linearly from 0 to 1 over the run's first WARMUP_FRACTION, as in the paper.

    DKD needs each image's target class. Under a label budget an image whose label is hidden
    takes the teacher's top class instead, so no hidden label is read.
    """

    uses_labels = True

    def __init__(
        self,
        temperature: float,
        alpha: float,
        exit_weights: Sequence[float],
        tckd_weight: float = dkd.TCKD_WEIGHT,
        nckd_weight: float = dkd.NCKD_WEIGHT,
        warmup_fraction: float = dkd.WARMUP_FRACTION,
    ) -> None:
        super().__init__(temperature, alpha, exit_weights)
        self.tckd_weight, self.nckd_weight = tckd_weight, nckd_weight
        self.warmup_fraction = warmup_fraction
        self.warmup = 1.0

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """The warm-up weight for this epoch (1 once the warm-up is over)."""
        span = self.warmup_fraction * epochs
        self.warmup = 1.0 if span <= 0 else min(1.0, (epoch + 1) / span)

    def distill_terms(
        self,
        logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        labelled: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """`tckd` and `nckd`, each weighted (warm-up included)."""
        if labelled is not None:
            guess = F.one_hot(teacher_logits.argmax(dim=1), targets.shape[1]).to(targets.dtype)
            targets = torch.where(labelled[:, None], targets, guess)
        tckd, nckd = dkd.dkd_terms(logits, teacher_logits, targets, self.temperature)
        return {
            "tckd": self.warmup * self.tckd_weight * tckd,
            "nckd": self.warmup * self.nckd_weight * nckd,
        }


class MultiExitDISTLoss(MultiExitKDLoss):
    """DIST at every head (`mlkd_cli/losses/dist.py`): `β·inter + γ·intra` at DIST's own
    temperature τ (the paper's 1), not --temperature."""

    def __init__(
        self,
        temperature: float,
        alpha: float,
        exit_weights: Sequence[float],
        inter_weight: float = dist.INTER_WEIGHT,
        intra_weight: float = dist.INTRA_WEIGHT,
        tau: float = dist.TAU,
    ) -> None:
        super().__init__(temperature, alpha, exit_weights)
        self.inter_weight, self.intra_weight, self.tau = inter_weight, intra_weight, tau

    def distill_terms(
        self,
        logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        labelled: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """`inter` and `intra`, each weighted."""
        inter, intra = dist.dist_terms(logits, teacher_logits, self.tau)
        return {"inter": self.inter_weight * inter, "intra": self.intra_weight * intra}


# Distillation losses by name (config key `loss`, `--loss`): a new loss is one entry here. Each
# takes (temperature, alpha, exit weights) and has `named(outputs, teacher_logits, targets)`.
# `multi_exit_kd` and `original_multi_exit_kd` are the names runs before `--loss` recorded.
LOSSES: dict[str, type[MultiExitKDLoss]] = {
    "kd": MultiExitKDLoss,
    "dkd": MultiExitDKDLoss,
    "dist": MultiExitDISTLoss,
    "original": OriginalMultiExitKDLoss,
    "multi_exit_kd": MultiExitKDLoss,
    "original_multi_exit_kd": OriginalMultiExitKDLoss,
}
