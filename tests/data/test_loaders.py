"""The data loaders: each process's shard of a split."""

from __future__ import annotations

from mlkd_cli.data.loaders import ShardSampler


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
