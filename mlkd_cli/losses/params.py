"""A loss's parameters, torch-free: each settable with `--loss-param NAME=VALUE` or the preset key
`loss_params`, listed by `--list-losses`, declared in a loss's registry entry."""

from __future__ import annotations

import math
from dataclasses import dataclass


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
FEATURE_PARAM = LossParam("feature_weight", 1.0, "weight of each exit's feature term")
CE_WEIGHT = LossParam("ce_weight", 1.0, "weight of cross-entropy, which the terms add to")
