"""Knowledge-distillation losses: what every head of the student learns from the teacher.

A loss is one class here and one line in `LOSSES`: its `PARAMS` (each settable with
`--loss-param NAME=VALUE` or the preset key `loss_params`, and listed by `--list-losses`; two of
them, FEATURE_PARAM and CE_WEIGHT, also say what the loss is made of) and its `distill_terms`
(the named terms of one head). The formulas themselves live in `mlkd_cli/losses`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mlkd_cli.losses import dist, dkd, feature


@dataclass(frozen=True)
class LossParam:
    """One parameter of a loss: its name (`--loss-param NAME=VALUE`), default and meaning."""

    name: str
    default: float
    help: str
    positive: bool = False  # > 0 (else >= 0)

    def check(self, value: float) -> str | None:
        """Why `value` is not allowed, or None."""
        if not math.isfinite(value) or value < 0 or (self.positive and value == 0):
            return f"must be {'positive' if self.positive else 'non-negative'}, got {value:g}"
        return None


# Parameters that say what a loss is made of: a loss declaring FEATURE_PARAM has feature terms
# at the exits (it needs one teacher with stages matching the student's); one declaring
# CE_WEIGHT adds its terms to a cross-entropy of that weight, as DKD's and DIST's papers do
# (--alpha, KD's mix, does not apply).
FEATURE_PARAM = LossParam(
    "feature_weight", feature.FEATURE_WEIGHT, "weight of each exit's feature term"
)
CE_WEIGHT = LossParam("ce_weight", 1.0, "weight of cross-entropy, which the terms add to")


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
    (one term for KD; a subclass in `LOSSES` changes what a head learns from the teacher). A loss
    with the CE_WEIGHT parameter (DKD, DIST) weighs its head `distill + ce_weight·CE` instead.
    """

    SUMMARY = "Hinton KD: KL divergence to the teacher's softened probabilities (--temperature)"
    PARAMS: tuple[LossParam, ...] = ()
    class_mean = False  # see `kd_terms`
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
        is blended at it: `mlkd_cli/losses/mixing.py`)."""
        return self.temperature

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
        features: Sequence[torch.Tensor] | None = None,
        teacher_features: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss and its parts: `loss` (what trains), the final head's distillation terms
        (`kd`, or the loss's own) and `ce` term (when α < 1), and each exit's own loss
        `exit1_loss`, ... (before its weight). `labelled`: which images' labels may be used
        (see `kd_terms`). `features`, `teacher_features`: each exit's adapted map and the
        teacher stage's, for losses with FEATURE_PARAM."""
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
        if self.has_features():
            if features is None or teacher_features is None:
                raise ValueError(f"{type(self).__name__} needs the exits' and teacher's features")
            for i, term in enumerate(self.feature_terms(features, teacher_features), start=1):
                parts[f"feat_exit{i}"] = term
                total = total + term
        return {"loss": total, **parts}

    def feature_terms(
        self, features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Each exit's weighted feature term (`mlkd_cli/losses/feature.py`)."""
        if len(features) != len(self.head_weights) - 1 or len(teacher_features) != len(features):
            raise ValueError("one adapted map and one teacher map per exit are needed")
        weight = self.params[FEATURE_PARAM.name]
        return [
            weight * feature.feature_term(s, t)
            for s, t in zip(features, teacher_features, strict=True)
        ]

    def head_loss(
        self,
        logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        labelled: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One head's `w·distill + c·CE` (`mixing`), with its named terms (no `ce` when c = 0)."""
        parts = self.distill_terms(logits, teacher_logits, targets, labelled)
        distill = torch.stack(list(parts.values())).sum()
        weight, ce_weight = self.mixing
        if ce_weight <= 0:
            return weight * distill, parts
        ce = labelled_cross_entropy(logits, targets, labelled)
        return weight * distill + ce_weight * ce, {**parts, "ce": ce}

    def forward(
        self, outputs: Sequence[torch.Tensor], teacher_logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        return self.named(outputs, teacher_logits, targets)["loss"]


class OriginalMultiExitKDLoss(MultiExitKDLoss):
    """The original's loss: its KL term averaged over classes too (`nn.KLDivLoss()`), which
    divides the distillation signal by the class count."""

    SUMMARY = "the original's KD: its KL term also averaged over the classes (--recipe original)"
    class_mean = True


class MultiExitDKDLoss(MultiExitKDLoss):
    """Decoupled KD at every head (`mlkd_cli/losses/dkd.py`): `CE + w·(α·TCKD + β·NCKD)`, the
    weight `w` rising linearly from 0 to 1 over the run's first WARMUP_FRACTION, as in the paper
    (whose CE weighs 1: --alpha does not apply).

    DKD needs each image's target class. Under a label budget an image whose label is hidden
    takes the teacher's top class instead, so no hidden label is read.
    """

    SUMMARY = "Decoupled KD: CE plus target-class (tckd) and non-target (nckd) terms"
    PARAMS = (
        LossParam("tckd_weight", dkd.TCKD_WEIGHT, "weight of the target-class term (DKD's α)"),
        LossParam("nckd_weight", dkd.NCKD_WEIGHT, "weight of the non-target term (DKD's β)"),
        LossParam("warmup", dkd.WARMUP_FRACTION, "share of the run over which DKD ramps up"),
        CE_WEIGHT,
    )
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
            "tckd": self.warmup * self.params["tckd_weight"] * tckd,
            "nckd": self.warmup * self.params["nckd_weight"] * nckd,
        }


class MultiExitDISTLoss(MultiExitKDLoss):
    """DIST at every head (`mlkd_cli/losses/dist.py`): `CE + β·inter + γ·intra` at DIST's own
    temperature τ (the paper's 1), not --temperature; as in the paper CE weighs 1 (--alpha does
    not apply)."""

    SUMMARY = "DIST: CE plus Pearson matching, across classes (inter) and images (intra)"
    PARAMS = (
        LossParam("inter_weight", dist.INTER_WEIGHT, "weight of the inter-class term (β)"),
        LossParam("intra_weight", dist.INTRA_WEIGHT, "weight of the intra-class term (γ)"),
        LossParam("tau", dist.TAU, "DIST's own temperature τ", positive=True),
        CE_WEIGHT,
    )

    @property
    def teacher_temperature(self) -> float:
        """DIST reads the teacher at its own τ."""
        return self.params["tau"]

    def distill_terms(
        self,
        logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        labelled: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """`inter` and `intra`, each weighted."""
        inter, intra = dist.dist_terms(logits, teacher_logits, self.params["tau"])
        return {
            "inter": self.params["inter_weight"] * inter,
            "intra": self.params["intra_weight"] * intra,
        }


class MultiExitKDFeatureLoss(MultiExitKDLoss):
    """Hinton KD at every head, plus each exit's stage features regressed onto the teacher's
    matching stage through a 1x1 adapter (`mlkd_cli/losses/feature.py`)."""

    SUMMARY = "kd, plus each exit's features matched to the teacher's stage (one CNN teacher)"
    PARAMS = (FEATURE_PARAM,)


class MultiExitDKDFeatureLoss(MultiExitDKDLoss):
    """DKD at every head, plus the exits' feature terms (as `kd+feature`)."""

    SUMMARY = "dkd, plus each exit's features matched to the teacher's stage (one CNN teacher)"
    PARAMS = (*MultiExitDKDLoss.PARAMS, FEATURE_PARAM)


# Distillation losses by name (config key `loss`, `--loss`): a new loss is one entry here. Each
# takes (temperature, alpha, exit weights, **its PARAMS) and has `named(outputs, teacher_logits,
# targets, ...)`.
LOSSES: dict[str, type[MultiExitKDLoss]] = {
    "kd": MultiExitKDLoss,
    "dkd": MultiExitDKDLoss,
    "dist": MultiExitDISTLoss,
    "kd+feature": MultiExitKDFeatureLoss,
    "dkd+feature": MultiExitDKDFeatureLoss,
    "original": OriginalMultiExitKDLoss,
}
# The names runs recorded before `--loss` existed: accepted, not listed.
FORMER_NAMES = {"multi_exit_kd": "kd", "original_multi_exit_kd": "original"}


def loss_class(name: str) -> type[MultiExitKDLoss]:
    """The loss registered under `name` (or a former name of it)."""
    return LOSSES[FORMER_NAMES.get(name, name)]


def loss_param_problem(name: str, params: dict[str, float]) -> str | None:
    """Why `params` do not fit the loss `name` (one line naming the fix), or None."""
    cls = loss_class(name)
    declared = {p.name: p for p in cls.PARAMS}
    for key, value in params.items():
        if key not in declared:
            owners = [n for n, c in LOSSES.items() if any(p.name == key for p in c.PARAMS)]
            takes = ", ".join(declared) if declared else "no parameters"
            where = f" ({key} belongs to {', '.join(owners)})" if owners else ""
            return (
                f"--loss-param {key}: the loss {name} takes {takes}{where}; "
                "see `mlkd distill --list-losses`"
            )
        problem = declared[key].check(value)
        if problem:
            return f"--loss-param {key} {problem}"
    return None


def build_loss(
    name: str,
    temperature: float,
    alpha: float,
    exit_weights: Sequence[float],
    params: dict[str, float] | None = None,
) -> MultiExitKDLoss:
    """The loss `name` with its parameters (defaults for those not given)."""
    return loss_class(name)(temperature, alpha, exit_weights, **(params or {}))
