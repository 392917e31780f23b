"""Where a process stands in a run: rank, world size, device, and the collectives it uses.

The launcher (engine/launch.py) makes one; data loaders, models and the loop only read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # How many times the launcher restarted the workers before this attempt (0: the first run).
    restart: int = 0

    @property
    def is_main(self) -> bool:
        """True on the one process that prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is in use."""
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks in place (a no-op on one process) and return it."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Take the maximum of a tensor over ranks in place (a no-op on one process)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Overwrite a tensor in place with rank 0's value (a no-op on one process)."""
        if self.distributed:
            dist.broadcast(tensor, src=0)
        return tensor

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's value of a picklable object, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.distributed:
            dist.barrier()
