"""How every export is checked before it is placed: traced on one batch, run on another of another
size (the batch axis must be dynamic), compared with PyTorch (largest absolute difference at most
TOLERANCE), written to a temporary file beside its destination and renamed into place only when it
agrees, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mlkd_cli.core.atomic import plain_file_mode
from mlkd_cli.core.errors import UserError

TOLERANCE = 1e-4


@dataclass(frozen=True)
class Probe:
    """What every writer checks its file with: the batch it is traced on, another of another
    size (the batch axis must be dynamic), and PyTorch's outputs on that one (every head's)."""

    example: torch.Tensor
    check: torch.Tensor
    expected: tuple[torch.Tensor, ...]


def probe(model: nn.Module, size: int) -> Probe:
    """Random batches at `size` px and `model`'s outputs on the checking one."""
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, size, size, generator=generator)
    check = torch.randn(3, 3, size, size, generator=generator)
    with torch.no_grad():
        expected = model(check)
    return Probe(example, check, tuple(expected) if isinstance(expected, Sequence) else (expected,))


def verified_file(
    destination: Path, write: Callable[[Path], None], verify: Callable[[Path], float]
) -> float:
    """Write to a temporary file beside `destination`, verify it, then rename it into place."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent
    )
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        diff = verify(tmp)
        if diff <= TOLERANCE:
            os.chmod(tmp, plain_file_mode())  # not mkstemp's 0600: others may read a model
            os.replace(tmp, destination)
        return diff
    finally:
        tmp.unlink(missing_ok=True)


def largest_diff(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    """The largest absolute difference over every head (inf when the heads do not match up)."""
    if len(got) != len(expected):
        return float("inf")
    return max(float((g - e).abs().max()) for g, e in zip(got, expected, strict=True))


def refuse_if_far(diff: float, fmt: str) -> None:
    """A file that differs from PyTorch by more than TOLERANCE was not placed: say so."""
    if diff > TOLERANCE:
        raise UserError(
            f"the {fmt} export differs from PyTorch by {diff:.2e} (> {TOLERANCE:g}); not written"
        )
