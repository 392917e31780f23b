"""TorchScript export of a plain classifier: traced, reloaded with `torch.jit.load` and run."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mlkd_cli.core.checkpoint import ModelCard
from mlkd_cli.export.verify import Probe, largest_diff, verified_file


def write_torchscript(
    model: nn.Module, card: ModelCard | None, probe: Probe, destination: Path
) -> tuple[float, str]:
    """Trace `model` into `destination`; its difference from `expected` and how it was checked."""

    def write(path: Path) -> None:
        with torch.no_grad():
            traced = torch.jit.trace(model, probe.example)
        traced.save(str(path))

    def verify(path: Path) -> float:
        loaded = torch.jit.load(str(path))
        with torch.no_grad():
            return largest_diff([loaded(probe.check)], probe.expected)

    return verified_file(destination, write, verify), "torch.jit.load"
