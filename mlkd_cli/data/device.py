"""The GPU-resident data pipeline for datasets held in memory (CIFAR, digits).

The uint8 images live on the device; each batch is gathered there and augmented in one batched
pass — random resized crop, flip, colour jitter and normalisation — so the accelerator never
waits on CPU decoding and there are no loader workers. Randomness comes from a generator seeded
per (seed, epoch, rank, batch), so a batch is the same whenever it is made: a resumed run skips
batches without drawing them. Nothing here reads a device value back to the host.

Differences from the CPU pipeline (torchvision) in the random views: crop boxes are continuous
rather than whole pixels, the three colour jitters are applied in a fixed order rather than a
random one, and resampling has no antialiasing (images held in memory are upscaled, where it
plays no part). The evaluation view (no augmentation) is the CPU's, resized as PIL resizes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mlkd_cli.core.dist import DistContext
from mlkd_cli.core.rng import derive_seed
from mlkd_cli.data.loaders import Batch, ResumableSampler
from mlkd_cli.data.sources import ArraySource
from mlkd_cli.data.transforms import ImageConfig, eval_resize

CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop, before it falls back to a centre crop
# Uniform draws one augmented image takes: crop scales and ratios per attempt, position, two
# flips, one spare, three colour jitters.
DRAWS_PER_IMAGE = 2 * CROP_ATTEMPTS + 7
# The image config's knobs this pipeline cannot follow (only the CPU pipeline, through timm, can).
DEVICE_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")  # what grid_sample resamples with


def device_unsupported(image_config: ImageConfig) -> list[str]:
    """The image config's augmentation flags this pipeline cannot follow (timm's CPU transforms
    can)."""
    missing = []
    if image_config.auto_augment:
        missing.append(f"--auto-augment {image_config.auto_augment}")
    if image_config.reprob > 0:
        missing.append(f"--reprob {image_config.reprob:g}")
    if image_config.interpolation not in DEVICE_INTERPOLATIONS:
        missing.append(f"--interpolation {image_config.interpolation}")
    return missing


_GREY = (0.299, 0.587, 0.114)


class DeviceAugment:
    """Batched augmentation of uint8 images (B, 3, H, W) on their own device."""

    def __init__(
        self, image_config: ImageConfig, device: torch.device, augment: bool = True
    ) -> None:
        self.image_config = image_config
        self.augment = augment
        self.mean = torch.tensor(image_config.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(image_config.std, device=device).view(1, 3, 1, 1)
        self.grey = torch.tensor(_GREY, device=device).view(1, 3, 1, 1)

    def __call__(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None,
        draws: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Float images of the image config's size, normalised; random only when augmenting.

        `draws` (B, DRAWS_PER_IMAGE) uniform numbers fix each image's view (a stored view
        replayed); without them they come from `generator`. An image's view depends on its own
        row alone, never on the others in the batch.
        """
        count, _, height, width = images.shape
        x = images.float().div_(255)
        if self.augment:
            if draws is None:
                draws = torch.rand(
                    count, DRAWS_PER_IMAGE, generator=generator, device=images.device
                )
            theta = self._crop_boxes(draws, height, width)
            x = self._resample(x, theta)
            if self.image_config.color_jitter > 0:
                x = self._jitter(x, draws[:, -3:])
        else:
            x = self._evaluation_view(x)
        return (x - self.mean) / self.std

    def _crop_boxes(self, draws: torch.Tensor, height: int, width: int) -> torch.Tensor:
        # (B, 2, 3) affine maps from output to input coordinates: a random resized crop,
        # mirrored horizontally / vertically with the image config's flip probabilities.
        low, high = self.image_config.crop_scale
        ratios = self.image_config.crop_ratio
        area = height * width
        scale = low + (high - low) * draws[:, :CROP_ATTEMPTS]
        log_ratio = (
            math.log(ratios[0])
            + (math.log(ratios[1]) - math.log(ratios[0]))
            * draws[:, CROP_ATTEMPTS : 2 * CROP_ATTEMPTS]
        )
        ratio = log_ratio.exp()
        w = (area * scale * ratio).sqrt()
        h = (area * scale / ratio).sqrt()
        fits = (w <= width) & (h <= height)
        first = fits.int().argmax(dim=1, keepdim=True)  # the first attempt that fits
        found = fits.any(dim=1)
        w = torch.where(found, w.gather(1, first).squeeze(1), float(min(width, height)))
        h = torch.where(found, h.gather(1, first).squeeze(1), float(min(width, height)))
        base = 2 * CROP_ATTEMPTS
        x0 = draws[:, base] * (width - w)
        y0 = draws[:, base + 1] * (height - h)
        flip = torch.where(draws[:, base + 2] < self.image_config.hflip, -1.0, 1.0)
        vflip = torch.where(draws[:, base + 3] < self.image_config.vflip, -1.0, 1.0)
        return _affine(x0, y0, w, h, height, width, flip, vflip)

    def _evaluation_view(self, x: torch.Tensor) -> torch.Tensor:
        """The CPU pipeline's evaluation view (`transforms.build_eval_transform`): the short side
        resized to img_size / crop_pct with antialiasing, then the centre img_size square.

        torch's antialiased bicubic and bilinear are PIL's filters (a = -0.5), so the view is
        the CPU's to within PIL's rounding to whole grey levels: a model trained on it is
        evaluated on what it saw (grid_sample's bicubic, a = -0.75 and a slightly smaller crop,
        was 0.09 in normalised units away, and a student trained on it lost a point on 32 px
        digits, BENCHMARKS.md "Issue 36").
        """
        mode = self.image_config.interpolation
        if mode == "nearest":  # no antialiasing to match: the crop box and grid_sample
            count, _, height, width = x.shape
            return self._resample(x, self._centre_box(count, height, width, x.device))
        size = self.image_config.img_size
        height, width = x.shape[-2:]
        # torchvision's Resize(int): the short side to `short`, the long one truncated
        short = eval_resize(self.image_config)
        long = int(short * max(height, width) / min(height, width))
        target = (short, long) if height <= width else (long, short)
        x = F.interpolate(x, size=target, mode=mode, antialias=True, align_corners=False)
        # torchvision's CenterCrop's offsets, rounded as it rounds them (half to even)
        top, left = (int(round((side - size) / 2.0)) for side in target)
        return x[..., top : top + size, left : left + size].clamp_(0, 1)

    def _centre_box(
        self, count: int, height: int, width: int, device: torch.device
    ) -> torch.Tensor:
        # The evaluation view: the central crop_pct of the short side, resized.
        side = self.image_config.crop_pct * min(height, width)
        w = torch.full((count,), side, device=device)
        return _affine((width - w) / 2, (height - w) / 2, w, w, height, width, 1.0, 1.0)

    def _resample(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        size = self.image_config.img_size
        grid = F.affine_grid(theta, [x.shape[0], 3, size, size], align_corners=False)
        out = F.grid_sample(
            x,
            grid,
            mode=self.image_config.interpolation,
            padding_mode="border",
            align_corners=False,
        )
        return out.clamp_(0, 1)  # bicubic overshoots

    def _jitter(self, x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        j = self.image_config.color_jitter
        factors = max(0.0, 1 - j) + (1 + j - max(0.0, 1 - j)) * draws  # (B, 3)
        brightness, contrast, saturation = (factors[:, i].view(-1, 1, 1, 1) for i in range(3))
        x = (x * brightness).clamp_(0, 1)
        mean = (x * self.grey).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
        x = (contrast * x + (1 - contrast) * mean).clamp_(0, 1)
        grey = (x * self.grey).sum(1, keepdim=True)
        return (saturation * x + (1 - saturation) * grey).clamp_(0, 1)


def _affine(
    x0: torch.Tensor,
    y0: torch.Tensor,
    w: torch.Tensor,
    h: torch.Tensor,
    height: int,
    width: int,
    flip: torch.Tensor | float,
    vflip: torch.Tensor | float,
) -> torch.Tensor:
    # affine_grid's coordinates run from -1 to 1 over the whole input.
    theta = torch.zeros(w.shape[0], 2, 3, device=w.device)
    theta[:, 0, 0] = flip * w / width
    theta[:, 0, 2] = (2 * x0 + w) / width - 1
    theta[:, 1, 1] = vflip * h / height
    theta[:, 1, 2] = (2 * y0 + h) / height - 1
    return theta


class DeviceBatches:
    """One rank's training batches from images held on its device (same order as the CPU path)."""

    def __init__(
        self,
        source: ArraySource,
        indices: Sequence[int],
        image_config: ImageConfig,
        batch_size: int,
        ctx: DistContext,
        seed: int,
        augment: bool = True,
        replay: Any = None,
    ) -> None:
        chosen = np.asarray(indices, dtype=np.int64)
        # Replaying a store's views (a views.ViewReplay): every view's draws, on the device.
        self.replay = replay
        self.view_table = None if replay is None else replay.draw_table().to(ctx.device)
        images = torch.from_numpy(source.images[chosen]).permute(0, 3, 1, 2).contiguous()
        self.images = images.to(ctx.device)
        targets = torch.as_tensor(np.asarray(source.targets)[chosen], dtype=torch.long)
        self.labels = targets.to(ctx.device)
        self.batch_size, self.seed, self.ctx = batch_size, seed, ctx
        self.augment = DeviceAugment(image_config, ctx.device, augment)
        self.sampler = ResumableSampler(range(len(chosen)), ctx.rank, ctx.world_size, seed)
        self.generator = torch.Generator(device=ctx.device)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def batches_per_epoch(self) -> int:
        """Batches in a whole epoch (the same on every rank)."""
        return self.sampler.batch_count(self.batch_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches `start_batch`, `start_batch + 1`, ... of `epoch`, augmented on the device."""
        self.sampler.set_epoch(epoch)
        self.sampler.skip = 0
        order = torch.tensor(list(self.sampler), dtype=torch.long).to(self.ctx.device)
        views = None
        if self.view_table is not None:
            views = self.replay.epoch_views(epoch).to(self.ctx.device)
        for b in range(start_batch, self.batches_per_epoch):
            index = order[b * self.batch_size : (b + 1) * self.batch_size]
            draws = None if views is None else self.view_table[views[index], index]
            if draws is None:
                self.generator.manual_seed(derive_seed(self.seed, epoch, self.ctx.rank, b, 0xD1))
            images = self.augment(self.images[index], self.generator, draws)
            yield Batch(images, self.labels[index], indices=index)

    def shard_in_order(self, batch_size: int) -> Iterator[Batch]:
        """This rank's share (items r, r + W, ...) in order, in the evaluation view."""
        view = DeviceAugment(self.augment.image_config, self.ctx.device, augment=False)
        mine = torch.arange(self.ctx.rank, len(self), self.ctx.world_size, device=self.ctx.device)
        for start in range(0, len(mine), batch_size):
            index = mine[start : start + batch_size]
            yield Batch(view(self.images[index], None), self.labels[index], indices=index)
