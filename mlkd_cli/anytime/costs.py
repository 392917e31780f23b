"""What a cascade costs: multiply-accumulates (MACs) per image of each part, counted with torch's
FlopCounterMode segment by segment, and how they read in a table.

`ExitCosts` is what an exits checkpoint records (at the training size) and what the threshold
search, the evaluation job and the classifier read back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class ExitCosts:
    """MACs per image of each part of the cascade, at one image size.

    `segments[j]` is the backbone from the previous cut to exit j's stage (the last one runs on
    to the end of the features), `branches[j]` exit j's branch, `head` the final classifier.
    """

    img_size: int
    segments: tuple[int, ...]
    branches: tuple[int, ...]
    head: int

    @property
    def plain(self) -> int:
        """The plain model (no exits): every segment and the head."""
        return sum(self.segments) + self.head

    def up_to(self, exit_index: int) -> int:
        """What an image leaving at `exit_index` costs (len(branches) means the final head,
        after every exit's branch has run)."""
        if exit_index >= len(self.branches):
            return self.plain + sum(self.branches)
        return sum(self.segments[: exit_index + 1]) + sum(self.branches[: exit_index + 1])

    @property
    def cascade(self) -> list[int]:
        """`up_to` every head, in cascade order (the exits, then the final head)."""
        return [self.up_to(j) for j in range(len(self.branches) + 1)]

    def alone(self, exit_index: int) -> int:
        """What exit `exit_index` costs used by itself (its backbone prefix and its branch)."""
        if exit_index >= len(self.branches):
            return self.plain
        return sum(self.segments[: exit_index + 1]) + self.branches[exit_index]

    def to_record(self) -> dict:
        """Plain types for a checkpoint's card."""
        return {
            "img_size": self.img_size,
            "segments": list(self.segments),
            "branches": list(self.branches),
            "head": self.head,
            "plain": self.plain,
            "cascade": self.cascade,
        }

    @classmethod
    def from_record(cls, record: dict) -> ExitCosts:
        """Read back `to_record`'s dict."""
        return cls(
            int(record["img_size"]),
            tuple(int(v) for v in record["segments"]),
            tuple(int(v) for v in record["branches"]),
            int(record["head"]),
        )


def count_macs(function, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`function(x)` and the MACs it took (FlopCounterMode counts 2 FLOPs per MAC)."""
    counter = FlopCounterMode(display=False)
    with counter:
        y = function(x)
    return y, counter.get_total_flops() // 2


def macs_label(macs: float) -> str:
    """MACs in the unit that reads best (k, M, G)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if macs >= scale:
            return f"{macs / scale:.2f} {unit}"
    return f"{macs:.0f}" if math.isfinite(macs) else "n/a"
