"""Numbered augmented views of a training image, reproducible anywhere: the keys of a soft-label
store (a teacher's outputs stored per view, replayed exactly when a student trains on them).

View `v` of image `i` under a store seed is fixed by two things only, in either pipeline:
- the CPU pipeline (timm/torchvision transforms, `TransformedSubset`): the item `(i, view_seed(s,
  v))`, whose transforms draw from generators seeded by that pair alone;
- the device pipeline (`DeviceAugment`): the row `i` of `view_draws(s, v, N)`, uniform numbers
  drawn on the CPU from a generator seeded by (s, v), so that the view is the same whichever
  device augments it and whatever batch, order or rank the image lands in.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from mlkd_cli.core.rng import derive_seed
from mlkd_cli.data.device import DRAWS_PER_IMAGE

_VIEW_KEY = 0x5F1E  # keeps view seeds apart from the other streams derived from a run's seed


def view_seed(store_seed: int, view: int) -> int:
    """The CPU pipeline's per-item seed for view `view` of every image."""
    return derive_seed(store_seed, view, _VIEW_KEY)


def view_draws(store_seed: int, view: int, count: int) -> torch.Tensor:
    """(count, DRAWS_PER_IMAGE) uniform numbers fixing view `view` of images 0..count-1 in the
    device pipeline; drawn on the CPU, so every device replays the same view."""
    generator = torch.Generator().manual_seed(view_seed(store_seed, view))
    return torch.rand(count, DRAWS_PER_IMAGE, generator=generator)


@functools.lru_cache(maxsize=2)
def chosen_views(store_seed: int, epoch: int, count: int, views: int) -> torch.Tensor:
    """Which stored view each image takes in `epoch` (count,), a seeded choice: a resumed run
    takes the same ones. Each image goes through its views in an order of its own, without
    repeating one until it has taken them all (epochs 0..K-1 take K different views, and so on),
    so that a run sees as many different views as the store and its epochs allow. Computed once
    an epoch per process (the task and the data pipeline both ask; a sort of images x views);
    callers must not change the tensor."""
    cycle, turn = divmod(epoch, views)
    generator = torch.Generator().manual_seed(derive_seed(store_seed, cycle, _VIEW_KEY + 1))
    orders = torch.rand(count, views, generator=generator).argsort(dim=1)
    return orders[:, turn].contiguous()


@dataclass(frozen=True)
class ViewReplay:
    """A run that replays a store's views: which one each training image takes each epoch."""

    seed: int  # the store's
    views: int
    images: int

    def epoch_views(self, epoch: int) -> torch.Tensor:
        """The view each image takes in `epoch` (images,)."""
        return chosen_views(self.seed, epoch, self.images, self.views)

    def item_seeds(self, epoch: int) -> np.ndarray:
        """The CPU pipeline's per-item seed of each image in `epoch` (images,)."""
        seeds = np.array([view_seed(self.seed, v) for v in range(self.views)], dtype=np.int64)
        return seeds[self.epoch_views(epoch).numpy()]

    def draw_table(self) -> torch.Tensor:
        """The device pipeline's draws of every view of every image (views, images, draws)."""
        return torch.stack([view_draws(self.seed, v, self.images) for v in range(self.views)])
