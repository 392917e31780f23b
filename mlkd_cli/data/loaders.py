"""DataLoaders for training (shuffled, sharded across ranks) and evaluation (sharded, exact).

Image files can be damaged. A source that cannot decode one returns an `UnreadableImage` in its
place; the loaders' collate function leaves it out of the batch and reports it beside the batch,
so the training loop can name it, count it, or stop (`--strict-data`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from mlkd_cli.core.cpus import cores_per_process
from mlkd_cli.core.dist import DistContext
from mlkd_cli.core.rng import derive_seed
from mlkd_cli.data.sources import ImageSource, UnreadableImage


class Batch(NamedTuple):
    """Images and labels of the readable items, and where the unreadable ones were."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: tuple[UnreadableImage, ...] = ()
    # Positions in the requested batch of the items kept; None when none was left out.
    kept: torch.Tensor | None = None
    # Each kept item's position in the dataset (what a teacher-output cache is indexed by).
    indices: torch.Tensor | None = None


class TransformedSubset(Dataset):
    """Selected items of a source, transformed on access.

    An item asked for as `(position, seed)` draws its random transform from its own generator
    seeded by (seed, position): the augmented data of an epoch is then a function of the seed
    alone, the same with or without loader workers and when a resumed run skips batches.
    """

    def __init__(self, source: ImageSource, indices: Sequence[int], transform: Callable) -> None:
        self.source = source
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(
        self, key: int | tuple[int, int]
    ) -> tuple[torch.Tensor, int, int] | UnreadableImage:
        index, seed = key if isinstance(key, tuple) else (key, None)
        item = self.source[self.indices[index]]
        if isinstance(item, UnreadableImage):
            return item._replace(position=index)
        image, label = item
        if seed is None:
            return self.transform(image), label, index
        # torchvision's random transforms draw from torch's global generator, timm's from
        # Python's `random` (and RandAugment from numpy's too): give each image its own stream of
        # each and put the process's generators back as they were.
        own = (seed * 1_000_003 + index) % (1 << 63)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(own)
                random.seed(own)
                np.random.seed(own % (1 << 32))
                return self.transform(image), label, index
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def collate_readable(items: list[Any]) -> Batch:
    """Stack the readable items of a batch; list the unreadable ones beside it.

    Items are (image, label) or (image, label, dataset position).
    """
    skipped = tuple(item for item in items if isinstance(item, UnreadableImage))
    kept = [i for i, item in enumerate(items) if not isinstance(item, UnreadableImage)]
    if kept:
        images, labels, *rest = default_collate([items[i] for i in kept])
    else:
        images, labels, rest = torch.zeros(0), torch.zeros(0, dtype=torch.long), []
    return Batch(
        images,
        labels,
        skipped,
        torch.tensor(kept, dtype=torch.long) if skipped else None,
        rest[0] if rest else None,
    )


class ShardSampler(Sampler[int]):
    """Whole batches dealt to ranks in turn: rank r takes batches r, r + W, r + 2W, ...

    Every item is taken exactly once over all ranks (never padded, so summed metrics count each
    image once), and every batch a rank's loader makes is a batch one process would make: the
    same images, the same size. Per-batch arithmetic (kernels chosen by batch size) is then the
    same, so W processes produce bit-identical outputs to one.
    """

    def __init__(self, length: int, rank: int, world_size: int, batch_size: int = 1) -> None:
        starts = range(rank * batch_size, length, world_size * batch_size)
        self.indices = [
            i for start in starts for i in range(start, min(start + batch_size, length))
        ]

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

    def batch_count(self, batch_size: int) -> int:
        """Batches in a whole epoch: full ones only, unless the shard is under one batch."""
        n = self.num_samples
        return n // batch_size if n >= batch_size else min(n, 1)


class SeededSampler(Sampler[tuple[int, int]]):
    """Another sampler's indices, each paired with the epoch's augmentation seed.

    The seed travels with the index, so persistent loader workers need not be told of epochs.
    """

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler = sampler
        self.seed = 0
        # Replaying stored views: each item's own seed (by dataset position) instead of `seed`.
        self.item_seeds: Any = None

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.item_seeds is not None:
            return ((index, int(self.item_seeds[index])) for index in self.sampler)
        return ((index, self.seed) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


class TrainingBatches(Protocol):
    """What the training loop draws from: either pipeline (CPU workers or on the device)."""

    @property
    def batches_per_epoch(self) -> int: ...

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]: ...

    def shard_in_order(self, batch_size: int) -> Iterator[Batch]: ...


class TrainBatches:
    """One rank's training batches, epoch by epoch, resumable part-way through an epoch.

    The CPU pipeline: a DataLoader decoding and augmenting images on worker processes.
    """

    def __init__(
        self,
        dataset: TransformedSubset,
        batch_size: int,
        ctx: DistContext,
        seed: int,
        workers: int,
        replay: Any = None,
    ) -> None:
        self.dataset = dataset
        self.replay = replay  # a views.ViewReplay: each image's view comes from a store
        self.batch_size = batch_size
        self.seed = seed
        self.ctx, self.workers = ctx, workers
        self.sampler = ResumableSampler(dataset, ctx.rank, ctx.world_size, seed)
        self.drop_last = self.sampler.num_samples >= batch_size
        self.seeded = SeededSampler(self.sampler)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.seeded,
            drop_last=self.drop_last,
            # Its own generator: making an iterator draws a seed, and drawing it from torch's
            # global generator would shift the model's random stream on a mid-epoch resume.
            generator=torch.Generator().manual_seed(seed),
            collate_fn=collate_readable,
            **_loader_kwargs(ctx, workers),
        )

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def batches_per_epoch(self) -> int:
        """Batches in a whole epoch (the same on every rank)."""
        return self.sampler.batch_count(self.batch_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches `start_batch`, `start_batch + 1`, ... of `epoch`."""
        self.sampler.set_epoch(epoch)
        self.sampler.skip = start_batch * self.batch_size
        self.seeded.seed = derive_seed(self.seed, epoch, self.ctx.rank, 0xA06)
        if self.replay is not None:
            self.seeded.item_seeds = self.replay.item_seeds(epoch)
        return iter(self.loader)

    def shard_in_order(self, batch_size: int) -> Iterator[Batch]:
        """This rank's share (items r, r + W, ...) in order, through the training transform."""
        return iter(build_eval_loader(self.dataset, batch_size, self.ctx, self.workers))


def default_cpu_workers(local_processes: int) -> int:
    """Loader workers per process of a CPU-only run: few, since the model computes on the same
    cores the workers would decode on; on 2 cores loading in the main process was faster
    (BENCHMARKS.md), so workers start at 8 cores a process."""
    share = cores_per_process(local_processes)
    return share // 4 if share >= 8 else 0


def default_workers(ctx: DistContext) -> int:
    """Loader workers per rank: on a GPU the cores this rank may use (at most 8); on a CPU few
    (`default_cpu_workers`)."""
    if ctx.device.type == "cpu":
        return default_cpu_workers(ctx.world_size)
    return max(0, min(8, cores_per_process(ctx.world_size)))


def _loader_kwargs(ctx: DistContext, workers: int | None) -> dict[str, Any]:
    n = default_workers(ctx) if workers is None else workers
    kwargs: dict[str, Any] = {"num_workers": n, "pin_memory": ctx.device.type == "cuda"}
    if n > 0:
        # Workers live for the whole run (no start-up each epoch) and keep 4 batches ready each.
        kwargs["prefetch_factor"] = 4
        kwargs["persistent_workers"] = True
    return kwargs


def build_train_batches(
    dataset: TransformedSubset,
    batch_size: int,
    ctx: DistContext,
    seed: int,
    workers: int | None = None,
    replay: Any = None,
) -> TrainBatches:
    """A shuffled, resumable loader over this rank's shard.

    Every rank gets the same number of batches (the sampler pads the shards to equal length),
    so no rank waits at a collective for a batch that never comes. Full batches only, so
    Mixup/CutMix always sees an even batch when `batch_size` is even.
    """
    n = default_workers(ctx) if workers is None else workers
    return TrainBatches(dataset, batch_size, ctx, seed, n, replay)


def build_eval_loader(
    dataset: Dataset, batch_size: int, ctx: DistContext, workers: int | None = None
) -> DataLoader:
    """An ordered loader over this rank's shard, with no item repeated across ranks."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), ctx.rank, ctx.world_size, batch_size),
        collate_fn=collate_readable,
        **_loader_kwargs(ctx, workers),
    )


def build_keyed_loader(
    dataset: TransformedSubset,
    keys: Sequence[tuple[int, int]],
    batch_size: int,
    ctx: DistContext,
    workers: int | None = None,
) -> DataLoader:
    """An ordered loader over `(position, seed)` items (`TransformedSubset`): batch b holds
    keys[b * batch_size : (b + 1) * batch_size], less the unreadable ones (`Batch.kept`)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=keys,
        collate_fn=collate_readable,
        **_loader_kwargs(ctx, workers),
    )


# The most memory an evaluation split's transformed images may take to be kept between passes.
REPLAY_LIMIT_BYTES = 256 * 2**20


class ReplayedBatches:
    """An evaluation loader whose batches are made once and replayed on every later pass.

    The evaluation view never changes, so a validation split small enough (REPLAY_LIMIT_BYTES of
    transformed images) is decoded and transformed on the first pass only: on a small dataset
    those per-image transforms took as long each epoch as training on it. A larger split is
    loaded again each pass, as a plain loader would.
    """

    def __init__(self, loader: DataLoader, limit_bytes: int = REPLAY_LIMIT_BYTES) -> None:
        self.loader = loader
        self.limit_bytes = limit_bytes
        self.kept: list[Batch] | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        if self.kept is not None:
            yield from self.kept
            return
        kept: list[Batch] | None = []
        size = 0
        for batch in self.loader:
            if kept is not None:
                size += batch[0].numel() * batch[0].element_size()  # the images
                if size <= self.limit_bytes:
                    kept.append(batch)
                else:
                    kept = None
            yield batch
        self.kept = kept  # only a whole pass is replayed
