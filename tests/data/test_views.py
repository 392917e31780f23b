"""Numbered views of a training image (the soft-label store's keys) are the same pixels wherever,
whenever and in whatever company they are made, in the CPU and the device pipeline."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from mlkd_cli.core.coerce import build_config
from mlkd_cli.data.device import DRAWS_PER_IMAGE, DeviceAugment
from mlkd_cli.data.loaders import TransformedSubset, collate_readable
from mlkd_cli.data.registry import load_splits
from mlkd_cli.data.transforms import build_train_transform
from mlkd_cli.data.views import chosen_views, view_draws, view_seed
from mlkd_cli.engine.config import TeacherTrainConfig
from mlkd_cli.engine.planning import dataset_image_config

SEED = 7


def _image_config(**flags: object):
    values = {"dataset": "digits", "model": "test_resnet", "color_jitter": 0.3, **flags}
    cfg = build_config(TeacherTrainConfig, values, origin="test")
    splits = load_splits("digits", Path("data"))
    return splits, dataset_image_config(cfg, splits)


def test_a_cpu_view_is_the_same_alone_in_a_batch_through_workers_and_after_other_draws() -> None:
    splits, image_config = _image_config(hflip=0.5)
    subset = TransformedSubset(splits.train, range(200), build_train_transform(image_config))
    seeds = [view_seed(SEED, v) for v in range(3)]
    alone = {(i, v): subset[(i, seeds[v])] for i in (0, 5, 199) for v in range(3)}
    # The process's generators moved on, other images drawn in between: nothing changes.
    torch.rand(100), random.random(), np.random.rand(3)
    for _ in range(5):
        subset[(17, seeds[0])]
    for (i, v), (image, label, position) in alone.items():
        again, again_label, _ = subset[(i, seeds[v])]
        assert torch.equal(again, image) and again_label == label and position == i
    # Views differ from each other (crop, flip and jitter are drawn per view).
    assert not torch.equal(alone[(5, 0)][0], alone[(5, 1)][0])
    # Through a loader with two workers, in another order, mixed with other views.
    keys = [(199, seeds[2]), (3, seeds[1]), (0, seeds[1]), (5, seeds[0]), (0, seeds[0])]
    loader = DataLoader(
        subset, batch_size=5, sampler=keys, num_workers=2, collate_fn=collate_readable
    )
    (batch,) = list(loader)
    assert torch.equal(batch.images[0], alone[(199, 2)][0])
    assert torch.equal(batch.images[2], alone[(0, 1)][0])
    assert torch.equal(batch.images[3], alone[(5, 0)][0])
    assert batch.labels[4].item() == alone[(0, 0)][1]


def test_a_device_view_depends_on_its_own_draws_only() -> None:
    splits, image_config = _image_config()
    augment = DeviceAugment(image_config, torch.device("cpu"))
    images = torch.from_numpy(splits.train.images[:64]).permute(0, 3, 1, 2).contiguous()
    draws = view_draws(SEED, 1, 64)
    assert draws.shape == (64, DRAWS_PER_IMAGE) and torch.equal(draws, view_draws(SEED, 1, 64))
    whole = augment(images, None, draws)
    # Image 5 in a batch of three others, at another position: the same pixels.
    pick = torch.tensor([40, 5, 63])
    part = augment(images[pick], None, draws[pick])
    assert torch.equal(part[1], whole[5]) and torch.equal(part[2], whole[63])
    # The draws of a view do not depend on how many images there are.
    assert torch.equal(view_draws(SEED, 1, 10), draws[:10])
    other = augment(images[:8], None, view_draws(SEED, 2, 8))
    assert not torch.equal(other[5], whole[5])


def test_each_epoch_chooses_a_stored_view_per_image_the_same_way_every_time() -> None:
    first = chosen_views(SEED, 3, 5_000, 8)
    assert torch.equal(first, chosen_views(SEED, 3, 5_000, 8))
    assert first.min() >= 0 and first.max() == 7
    counts = torch.bincount(first, minlength=8)
    assert counts.min() > 5_000 / 8 * 0.8  # every view used, about evenly
    assert not torch.equal(first, chosen_views(SEED, 4, 5_000, 8))
    # Epochs 0-7 take each image through all 8 views once, in an order of its own; the next 8
    # again, in another order.
    cycle = torch.stack([chosen_views(SEED, e, 5_000, 8) for e in range(8)])
    assert torch.equal(cycle.sort(dim=0).values, torch.arange(8)[:, None].expand(8, 5_000))
    again = torch.stack([chosen_views(SEED, e, 5_000, 8) for e in range(8, 16)])
    assert torch.equal(again.sort(dim=0).values, cycle.sort(dim=0).values)
    assert not torch.equal(again, cycle)
