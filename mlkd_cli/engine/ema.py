"""The model EMA of a training run (`--model-ema`): timm's `ModelEmaV3` beside the raw weights.

The average is updated after each optimiser step, as timm's train.py does (its first update
copies the weights; the decay is `--model-ema-decay`, ramped up under `--model-ema-warmup`). It
lives on every rank (each rank's optimiser steps are the same), is validated each epoch beside
the raw weights, and `better_weights` chooses which of the two a run saves. Its state (weights
and update count) is a part of the training state, so a resumed run continues it exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn

# The names of the two sets of weights a run may save.
RAW, EMA = "raw", "ema"


class ModelEma:
    """An exponential moving average of a module's parameters and buffers, and its step count."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool) -> None:
        # Kept in fp32 whatever the model holds: bf16 weights would need stochastic rounding,
        # whose generator the training state does not hold.
        self.average = ModelEmaV3(model, decay=decay, use_warmup=warmup, dtype=torch.float32)
        self.updates = 0

    @property
    def module(self) -> nn.Module:
        """The averaged model (as the trained one, in eval mode)."""
        return self.average.module

    def update(self, model: nn.Module) -> None:
        """Fold the model's weights in after an optimiser step (timm's step numbering)."""
        self.updates += 1
        self.average.update(model, step=self.updates)

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights (on the CPU) and how many steps they have seen."""
        weights = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        return {"weights": weights, "updates": self.updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a saved average."""
        self.module.load_state_dict(state_dict["weights"])
        self.updates = int(state_dict["updates"])

    def restart_from(self, model: nn.Module) -> None:
        """Start the average again from `model`'s weights (a run that had none continues)."""
        self.module.load_state_dict(model.state_dict())
        self.updates = 0


def better_weights(raw_score: float, ema_score: float) -> str:
    """Which weights an epoch keeps: the EMA's when they score strictly higher (a tie, or a NaN
    score, keeps the raw weights, which the run trained)."""
    return EMA if ema_score > raw_score else RAW


def ema_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """The EMA's validation metrics of a history row, under the plain names (`val_top1`...)."""
    return {k.removeprefix("ema_"): v for k, v in row.items() if k.startswith("ema_")}
