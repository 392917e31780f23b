"""Augmentation on the device: shapes, ranges and seeds, crops inside the image, the evaluation
view without augmentation, and batches in the CPU pipeline's order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mlkd_cli.core.dist import DistContext
from mlkd_cli.data.device import DeviceAugment, DeviceBatches
from mlkd_cli.data.loaders import TransformedSubset, build_train_batches
from mlkd_cli.data.registry import load_splits
from mlkd_cli.data.sources import ArraySource
from mlkd_cli.data.transforms import ImageConfig, build_eval_transform
from mlkd_cli.engine import planning
from mlkd_cli.engine.config import TeacherTrainConfig

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
IMAGE_CONFIG = ImageConfig(img_size=24, crop_pct=0.875)


def _images(count: int = 8, size: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8)


def test_device_augmentation_shapes_ranges_and_seeds() -> None:
    augment = DeviceAugment(IMAGE_CONFIG, CPU.device)
    images = _images()
    first = augment(images, torch.Generator().manual_seed(1))
    assert first.shape == (8, 3, 24, 24) and first.dtype == torch.float32
    low = (0 - torch.tensor(IMAGE_CONFIG.mean)) / torch.tensor(IMAGE_CONFIG.std)
    high = (1 - torch.tensor(IMAGE_CONFIG.mean)) / torch.tensor(IMAGE_CONFIG.std)
    per_channel = first.transpose(0, 1).flatten(1)
    assert (per_channel.min(1).values >= low - 1e-5).all()
    assert (per_channel.max(1).values <= high + 1e-5).all()
    again = augment(images, torch.Generator().manual_seed(1))
    other = augment(images, torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.allclose(first, other)
    # Different images of one batch get different crops: a constant-per-image batch stays
    # constant, a gradient does not give eight identical views.
    ramp = torch.arange(12, dtype=torch.uint8).mul(20).expand(8, 3, 12, 12).contiguous()
    views = augment(ramp, torch.Generator().manual_seed(3))
    assert len({tuple(v[0, 0, :3].tolist()) for v in views}) > 1


def test_crop_boxes_stay_inside_the_image() -> None:
    augment = DeviceAugment(IMAGE_CONFIG, CPU.device)
    draws = torch.rand(4096, 26, generator=torch.Generator().manual_seed(0))
    theta = augment._crop_boxes(draws, 12, 20)
    for axis in (0, 1):
        reach = theta[:, axis, axis].abs() + theta[:, axis, 2].abs()
        assert (reach <= 1 + 1e-5).all()
    areas = (theta[:, 0, 0].abs() * theta[:, 1, 1]).numpy()  # share of the image each crop covers
    assert areas.min() >= IMAGE_CONFIG.crop_scale[0] - 1e-4 and areas.max() <= 1 + 1e-5
    assert np.mean(theta[:, 0, 0].numpy() < 0) == pytest.approx(0.5, abs=0.05)  # flips


def test_without_augmentation_the_device_view_is_the_evaluation_view() -> None:
    # Smooth images, upscaled as CIFAR is: torch's antialiased bicubic is PIL's, to within
    # PIL's rounding to whole grey levels.
    coarse = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    smooth = torch.nn.functional.interpolate(coarse, size=16, mode="bilinear")
    images = smooth.mul(255).round().to(torch.uint8)
    device_view = DeviceAugment(IMAGE_CONFIG, CPU.device, augment=False)(images, None)
    cpu_transform = build_eval_transform(IMAGE_CONFIG)
    source = ArraySource(images.permute(0, 2, 3, 1).numpy(), [0] * 4)
    cpu_view = torch.stack([cpu_transform(source[i][0]) for i in range(4)])
    assert (device_view - cpu_view).abs().max() < 0.02  # in normalised units (std 0.5)
    assert (device_view - cpu_view.roll(1, 0)).abs().mean() > 0.3  # other images: far


def test_device_batches_follow_the_cpu_order_and_resume_part_way() -> None:
    splits = load_splits("digits", Path("data"))
    device = DeviceBatches(splits.train, splits.train_indices, IMAGE_CONFIG, 32, CPU, seed=5)
    subset = TransformedSubset(
        splits.train, splits.train_indices, build_eval_transform(IMAGE_CONFIG)
    )
    cpu = build_train_batches(subset, 32, CPU, seed=5, workers=0)
    assert device.batches_per_epoch == cpu.batches_per_epoch
    cpu_batches = list(cpu.epoch(2))
    device_batches = list(device.epoch(2))
    for a, b in zip(cpu_batches, device_batches, strict=True):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.indices, b.indices)
    tail = list(device.epoch(2, start_batch=30))
    assert len(tail) == len(device_batches) - 30
    assert all(
        torch.equal(a.images, b.images) for a, b in zip(tail, device_batches[30:], strict=True)
    )


def test_in_memory_data_is_augmented_in_batches_on_a_cpu_too() -> None:
    cfg = TeacherTrainConfig(dataset="digits", model="test_resnet")
    splits = load_splits("digits", Path("data"))
    image_config = planning.dataset_image_config(cfg, splits)
    assert planning.data_pipeline(cfg, splits, image_config) == "device"
    erasing = TeacherTrainConfig(dataset="digits", model="test_resnet", reprob=0.25)
    image_config = planning.dataset_image_config(erasing, splits)
    assert planning.data_pipeline(erasing, splits, image_config) == "cpu"  # timm's only
