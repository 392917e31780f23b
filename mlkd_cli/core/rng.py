"""Seeds and random-generator states: how runs stay reproducible and resume exactly."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 32-bit seed drawn from a tuple of integers (the run's seed, epoch, rank, ...)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def seed_everything(seed: int, rank: int, epoch: int) -> int:
    """Seed Python, NumPy and torch from (seed, rank, epoch); returns the derived seed.

    Reseeding at every epoch makes a run resumed at an epoch boundary draw the same random
    numbers as one that never stopped; a mid-epoch checkpoint saves each rank's generators.
    """
    derived = derive_seed(seed, rank, epoch + 1)
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)
    return derived


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random generators, in types `torch.load(weights_only=True)` reads back."""
    numpy_state = np.random.get_state(legacy=False)
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Put back what `rng_state` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    saved = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]},
            "has_gauss": saved["has_gauss"],
            "gauss": saved["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
