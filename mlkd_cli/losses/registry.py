"""The distillation losses by name, declared without torch: what `--list-losses`, `--loss`,
`--loss-param`, preset `loss_params`, the study's `--losses` and the config checks read. A loss's
class (torch) is imported on first use, from the module its entry names.

A new loss is one module in this package, one entry in `LOSSES` and its test in tests/losses/.
The entry names the module and class, a one-line summary and the loss's `PARAMS` (`params.py`;
FEATURE_PARAM and CE_WEIGHT also say what the loss is made of). The module holds the formula as
a pure function of tensors and the class: a subclass of `heads.MultiExitLoss` whose `PARAMS`
are its entry's and whose `distill_terms` returns one head's named terms (they become history
columns). Nothing else changes: flags, presets, the study and the listing find it here.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlkd_cli.losses.params import CE_WEIGHT, FEATURE_PARAM, LossParam

if TYPE_CHECKING:  # the classes import torch; the registry must not
    from mlkd_cli.losses.heads import MultiExitLoss


@dataclass(frozen=True)
class LossSpec:
    """A registered loss, torch-free: where its class lives, what it learns, its parameters.

    `SUMMARY` and `PARAMS` are named as the class attributes they declare (the class takes its
    PARAMS from here), so that a spec answers what its class would, torch unloaded. Calling a
    spec builds the loss: `LOSSES["dkd"](temperature, alpha, exit_weights, **params)`.
    """

    target: str  # "module:Class", the module under mlkd_cli.losses
    SUMMARY: str
    PARAMS: tuple[LossParam, ...] = ()

    def has_features(self) -> bool:
        """Whether the loss has feature terms at the exits (see FEATURE_PARAM)."""
        return FEATURE_PARAM in self.PARAMS

    def adds_to_ce(self) -> bool:
        """Whether the loss adds its terms to a weighted CE rather than α-mixing (CE_WEIGHT)."""
        return CE_WEIGHT in self.PARAMS

    def load(self) -> type[MultiExitLoss]:
        """The loss's class (its module imported on first use)."""
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(f"mlkd_cli.losses.{module}"), name)

    def __call__(
        self, temperature: float, alpha: float, exit_weights: Sequence[float], **params: float
    ) -> MultiExitLoss:
        return self.load()(temperature, alpha, exit_weights, **params)


# DKD's: the paper's CIFAR-100 setting, α = 1, β = 8, the DKD weight warmed up linearly over the
# first 20 of 240 epochs (here a fraction of the run, so that short runs warm up in proportion).
DKD_PARAMS = (
    LossParam("tckd_weight", 1.0, "weight of the target-class term (DKD's α)"),
    LossParam("nckd_weight", 8.0, "weight of the non-target term (DKD's β)"),
    LossParam("warmup", 20 / 240, "share of the run over which DKD ramps up"),
    CE_WEIGHT,
)
# DIST's: the paper's ImageNet defaults, β = γ = 1, τ = 1.
DIST_PARAMS = (
    LossParam("inter_weight", 1.0, "weight of the inter-class term (β)"),
    LossParam("intra_weight", 1.0, "weight of the intra-class term (γ)"),
    LossParam("tau", 1.0, "DIST's own temperature τ", positive=True),
    CE_WEIGHT,
)

# Distillation losses by name (config key `loss`, `--loss`), in `--list-losses` order: a new loss
# is one module in this package and one entry here. Each class takes (temperature, alpha, exit
# weights, **its PARAMS) and has `named(outputs, teacher_logits, targets, ...)`.
LOSSES: dict[str, LossSpec] = {
    "kd": LossSpec(
        "kd:MultiExitKDLoss",
        "Hinton KD: KL divergence to the teacher's softened probabilities (--temperature)",
    ),
    "dkd": LossSpec(
        "dkd:MultiExitDKDLoss",
        "Decoupled KD: CE plus target-class (tckd) and non-target (nckd) terms",
        DKD_PARAMS,
    ),
    "dist": LossSpec(
        "dist:MultiExitDISTLoss",
        "DIST: CE plus Pearson matching, across classes (inter) and images (intra)",
        DIST_PARAMS,
    ),
    "kd+feature": LossSpec(
        "feature:MultiExitKDFeatureLoss",
        "kd, plus each exit's features matched to the teacher's stage (one CNN teacher)",
        (FEATURE_PARAM,),
    ),
    "dkd+feature": LossSpec(
        "feature:MultiExitDKDFeatureLoss",
        "dkd, plus each exit's features matched to the teacher's stage (one CNN teacher)",
        (*DKD_PARAMS, FEATURE_PARAM),
    ),
    "original": LossSpec(
        "kd:OriginalMultiExitKDLoss",
        "the original's KD: its KL term also averaged over the classes (--recipe original)",
    ),
}
# The names runs recorded before `--loss` existed: accepted, not listed.
FORMER_NAMES = {"multi_exit_kd": "kd", "original_multi_exit_kd": "original"}


def loss_spec(name: str) -> LossSpec:
    """The loss registered under `name` (or a former name of it), torch unloaded."""
    return LOSSES[FORMER_NAMES.get(name, name)]


def loss_class(name: str) -> type[MultiExitLoss]:
    """The class of the loss registered under `name` (or a former name of it)."""
    return loss_spec(name).load()


def loss_param_problem(name: str, params: dict[str, float]) -> str | None:
    """Why `params` do not fit the loss `name` (one line naming the fix), or None."""
    declared = {p.name: p for p in loss_spec(name).PARAMS}
    for key, value in params.items():
        if key not in declared:
            owners = [n for n, s in LOSSES.items() if any(p.name == key for p in s.PARAMS)]
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
) -> MultiExitLoss:
    """The loss `name` with its parameters (defaults for those not given)."""
    return loss_spec(name)(temperature, alpha, exit_weights, **(params or {}))
