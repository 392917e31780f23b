"""DataLoaders for training (shuffled, sharded across ranks) and evaluation (sharded, exact).

Image files can be damaged. A source that cannot decode one returns an `UnreadableImage` in its
place; the loaders' collate function leaves it out of the batch and reports it beside the batch,
so the training loop can name it, count it, or stop (`--strict-data`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from mlkd_cli.data.sources import ImageSource, UnreadableImage
from mlkd_cli.engine.launch import DistContext


class Batch(NamedTuple):
    """Images and labels of the readable items, and where the unreadable ones were."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: tuple[UnreadableImage, ...] = ()
    # Positions in the requested batch of the items kept; None when none was left out.
    kept: torch.Tensor | None = None


def augment_seed(seed: int, epoch: int, rank: int) -> int:
    """The base seed of one epoch's per-image augmentation on one rank."""
    return int(np.random.SeedSequence([seed, epoch, rank, 0xA06]).generate_state(1)[0])


class TransformedSubset(Dataset):
    """Selected items of a source, transformed on access.

    With `augment_seed` set, each item's random transform is drawn from its own generator seeded
    by (augment_seed, position): the augmented data of an epoch is then a function of the seed
    alone, the same with or without loader workers and when a resumed run skips batches.
    """

    def __init__(self, source: ImageSource, indices: Sequence[int], transform: Callable) -> None:
        self.source = source
        self.indices = list(indices)
        self.transform = transform
        self.augment_seed: int | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | UnreadableImage:
        item = self.source[self.indices[index]]
        if isinstance(item, UnreadableImage):
            return item._replace(position=index)
        image, label = item
        if self.augment_seed is None:
            return self.transform(image), label
        # torchvision's random transforms draw from torch's global generator; give each image
        # its own stream and put the process's generator back as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.augment_seed * 1_000_003 + index) % (1 << 63))
            return self.transform(image), label


def collate_readable(items: list[Any]) -> Batch:
    """Stack the readable items of a batch; list the unreadable ones beside it."""
    skipped = tuple(item for item in items if isinstance(item, UnreadableImage))
    if not skipped:
        images, labels = default_collate(items)
        return Batch(images, labels)
    kept = [i for i, item in enumerate(items) if not isinstance(item, UnreadableImage)]
    if kept:
        images, labels = default_collate([items[i] for i in kept])
    else:
        images, labels = torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return Batch(images, labels, skipped, torch.tensor(kept, dtype=torch.long))


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


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way, after `skip` of its items."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        order = list(super().__iter__())
        return iter(order[self.skip :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


class TrainBatches:
    """One rank's training batches, epoch by epoch, resumable part-way through an epoch.

    The CPU pipeline: a DataLoader decoding and augmenting images on worker processes.
    """

    def __init__(
        self, dataset: TransformedSubset, batch_size: int, ctx: DistContext, seed: int, workers: int
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = ctx.rank
        self.sampler = ResumableSampler(dataset, ctx.rank, ctx.world_size, seed)
        self.drop_last = self.sampler.num_samples >= batch_size
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            drop_last=self.drop_last,
            # Its own generator: making an iterator draws a seed, and drawing it from torch's
            # global generator would shift the model's random stream on a mid-epoch resume.
            generator=torch.Generator().manual_seed(seed),
            collate_fn=collate_readable,
            **_loader_kwargs(ctx, workers, train=True),
        )

    @property
    def batches_per_epoch(self) -> int:
        """Batches in a whole epoch (the same on every rank)."""
        n = self.sampler.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches `start_batch`, `start_batch + 1`, ... of `epoch`."""
        self.sampler.set_epoch(epoch)
        self.sampler.skip = start_batch * self.batch_size
        self.dataset.augment_seed = augment_seed(self.seed, epoch, self.rank)
        # Workers are not persistent, so each epoch's workers see the new augmentation seed.
        return iter(self.loader)


def default_workers(ctx: DistContext) -> int:
    """Loader workers per rank: on a GPU the cores this rank has (at most 8); on a CPU few.

    On a CPU-only run the model computes on the same cores the workers would decode on; on
    2 cores loading in the main process was faster (BENCHMARKS.md), so workers start at 8 cores.
    """
    per_rank = (os.cpu_count() or 1) // max(1, ctx.world_size)
    if ctx.device.type == "cpu":
        return per_rank // 4 if per_rank >= 8 else 0
    return max(0, min(8, per_rank))


def _loader_kwargs(ctx: DistContext, workers: int | None, train: bool = False) -> dict[str, Any]:
    n = default_workers(ctx) if workers is None else workers
    kwargs: dict[str, Any] = {"num_workers": n, "pin_memory": ctx.device.type == "cuda"}
    if n > 0:
        kwargs["prefetch_factor"] = 4
        # Training workers are not kept between epochs: they must pick up each epoch's
        # augmentation seed, and their start-up is hidden behind the prefetch.
        kwargs["persistent_workers"] = not train
    return kwargs


def build_train_batches(
    dataset: TransformedSubset,
    batch_size: int,
    ctx: DistContext,
    seed: int,
    workers: int | None = None,
) -> TrainBatches:
    """A shuffled, resumable loader over this rank's shard.

    Every rank gets the same number of batches (the sampler pads the shards to equal length),
    so no rank waits at a collective for a batch that never comes. Full batches only, so
    Mixup/CutMix always sees an even batch when `batch_size` is even.
    """
    n = default_workers(ctx) if workers is None else workers
    return TrainBatches(dataset, batch_size, ctx, seed, n)


def build_eval_loader(
    dataset: Dataset, batch_size: int, ctx: DistContext, workers: int | None = None
) -> DataLoader:
    """An ordered loader over this rank's shard, with no item repeated across ranks."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), ctx.rank, ctx.world_size),
        collate_fn=collate_readable,
        **_loader_kwargs(ctx, workers),
    )
