"""The data loaders: each process's shard of a split, and a small split replayed from memory."""

from __future__ import annotations

import torch

from mlkd_cli.data.loaders import ReplayedBatches, ShardSampler


def test_shard_sampler_covers_every_item_once_in_whole_batches() -> None:
    for length in (0, 1, 7, 10, 23):
        for world in (1, 2, 3):
            for batch in (1, 4):
                shards = [list(ShardSampler(length, r, world, batch)) for r in range(world)]
                assert sorted(i for shard in shards for i in shard) == list(range(length))
                # Each rank's consecutive runs of `batch` items are batches one process makes.
                one = list(range(length))
                batches = [one[i : i + batch] for i in range(0, length, batch)]
                for r, shard in enumerate(shards):
                    assert [shard[i : i + batch] for i in range(0, len(shard), batch)] == (
                        batches[r::world]
                    )


def test_a_small_validation_split_is_transformed_once_and_replayed() -> None:
    passes = []

    class Loader:
        def __len__(self) -> int:
            return 2

        def __iter__(self):
            passes.append(1)
            for i in range(2):
                yield (torch.full((4, 3, 8, 8), float(i)), torch.zeros(4, dtype=torch.long))

    replayed = ReplayedBatches(Loader())
    first, second = list(replayed), list(replayed)
    assert len(passes) == 1 and len(second) == 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True))
    too_big = ReplayedBatches(Loader(), limit_bytes=4 * 3 * 8 * 8 * 4)  # one batch fits, not two
    list(too_big), list(too_big)
    assert len(passes) == 3  # loaded again on every pass
