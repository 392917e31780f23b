"""DataLoaders for training (shuffled, sharded across ranks) and evaluation (sharded, exact)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from mlkd_cli.data.sources import ImageSource
from mlkd_cli.engine.launch import DistContext


class TransformedSubset(Dataset):
    """Selected items of a source, transformed on access."""

    def __init__(self, source: ImageSource, indices: Sequence[int], transform: Callable) -> None:
        self.source = source
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.source[self.indices[index]]
        return self.transform(image), label


class ShardSampler(Sampler[int]):
    """Rank r takes items r, r + W, r + 2W, ...: every item exactly once over all ranks.

    Unlike DistributedSampler it never pads, so summed metrics count each image once.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def default_workers(ctx: DistContext) -> int:
    """Loader workers per rank: on a GPU the cores this rank has (at most 8); on a CPU few.

    On a CPU-only run the model computes on the same cores the workers would decode on; on
    2 cores loading in the main process was faster (BENCHMARKS.md), so workers start at 8 cores.
    """
    per_rank = (os.cpu_count() or 1) // max(1, ctx.world_size)
    if ctx.device.type == "cpu":
        return per_rank // 4 if per_rank >= 8 else 0
    return max(0, min(8, per_rank))


def _loader_kwargs(ctx: DistContext, workers: int | None) -> dict[str, Any]:
    n = default_workers(ctx) if workers is None else workers
    kwargs: dict[str, Any] = {"num_workers": n, "pin_memory": ctx.device.type == "cuda"}
    if n > 0:
        # Workers are not persistent: each epoch's worker seeds then come from the loader's
        # generator, which the trainer reseeds per epoch, so a resumed run sees the same crops.
        kwargs["prefetch_factor"] = 4
    return kwargs


def build_train_loader(
    dataset: Dataset, batch_size: int, ctx: DistContext, seed: int, workers: int | None = None
) -> tuple[DataLoader, DistributedSampler]:
    """A shuffled loader over this rank's shard; call `sampler.set_epoch(e)` each epoch.

    Every rank gets the same number of batches (the sampler pads the shards to equal length),
    so no rank waits at a collective for a batch that never comes. Full batches only, so
    Mixup/CutMix always sees an even batch when `batch_size` is even.
    """
    sampler = DistributedSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed
    )
    generator = torch.Generator().manual_seed(seed * 1000 + ctx.rank)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=len(sampler) >= batch_size,
        generator=generator,
        **_loader_kwargs(ctx, workers),
    )
    return loader, sampler


def build_eval_loader(
    dataset: Dataset, batch_size: int, ctx: DistContext, workers: int | None = None
) -> DataLoader:
    """An ordered loader over this rank's shard, with no item repeated across ranks."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), ctx.rank, ctx.world_size),
        **_loader_kwargs(ctx, workers),
    )
