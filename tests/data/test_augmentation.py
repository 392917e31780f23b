"""Augmentation through timm: the flags reach the built transform and the device pipeline, and
the defaults follow what the dataset's images look like."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_error_line, invoke_cli
from PIL import Image
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T

from mlkd_cli.core.coerce import build_config
from mlkd_cli.core.errors import UserError
from mlkd_cli.data.device import DeviceAugment
from mlkd_cli.data.registry import augmentation_defaults, get_dataset_spec, load_splits
from mlkd_cli.data.transforms import ImageConfig, build_train_transform
from mlkd_cli.engine.config import TeacherTrainConfig
from mlkd_cli.engine.planning import data_pipeline, dataset_image_config

CPU = torch.device("cpu")


def _config(**flags: object) -> TeacherTrainConfig:
    values = {"dataset": "digits", "model": "test_resnet", **flags}
    config = build_config(TeacherTrainConfig, values, origin="test")
    config.validate()
    return config


def _steps(image_config: ImageConfig) -> list:
    return list(build_train_transform(image_config).transforms)


def test_flags_change_the_built_transform_as_asked() -> None:
    """`teacher train --scale 0.5 1 --hflip 0 --color-jitter 0` as the engine builds it."""
    splits = load_splits("digits", Path("data"))
    image_config = dataset_image_config(
        _config(scale=[0.5, 1], hflip=0.0, color_jitter=0.0), splits
    )
    steps = _steps(image_config)
    crop = next(s for s in steps if isinstance(s, RandomResizedCropAndInterpolation))
    assert tuple(crop.scale) == (0.5, 1.0)
    assert not any(isinstance(s, T.RandomHorizontalFlip) for s in steps)
    assert not any(isinstance(s, T.ColorJitter) for s in steps)

    asked = _config(
        scale=[0.2, 0.9], ratio=[0.5, 2.0], hflip=0.3, vflip=0.7, color_jitter=0.2,
        auto_augment="rand-m9-mstd0.5", reprob=0.25, interpolation="bilinear",
    )  # fmt: skip
    steps = _steps(dataset_image_config(asked, splits))
    crop = steps[0]
    assert tuple(crop.scale) == (0.2, 0.9) and tuple(crop.ratio) == (0.5, 2.0)
    flips = {
        type(s): s.p for s in steps if isinstance(s, (T.RandomHorizontalFlip, T.RandomVerticalFlip))
    }
    assert flips == {T.RandomHorizontalFlip: 0.3, T.RandomVerticalFlip: 0.7}
    assert any(type(s).__name__ == "RandAugment" for s in steps)
    erasing = next(s for s in steps if isinstance(s, RandomErasing))
    assert erasing.probability == 0.25


def test_defaults_follow_the_images(tmp_path: Path) -> None:
    digits = load_splits("digits", Path("data"))
    plain = augmentation_defaults(get_dataset_spec("imagefolder"), digits.train)
    assert (plain.hflip, plain.crop_scale, plain.color_jitter) == (0.0, (0.5, 1.0), 0.0)
    for split, count in (("train", 4), ("val", 2)):
        for label in ("a", "b"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.random.default_rng(i).integers(0, 256, (96, 128, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    photos = load_splits("imagefolder", tmp_path)
    spec = get_dataset_spec("imagefolder")
    photo = augmentation_defaults(spec, photos.train)
    assert (photo.hflip, photo.crop_scale, photo.color_jitter) == (0.5, (0.08, 1.0), 0.4)
    cifar = augmentation_defaults(get_dataset_spec("cifar-10"), digits.train)
    assert cifar.hflip == 0.5  # a dataset's own augmentation wins over what the images suggest


def test_the_device_pipeline_follows_scale_ratio_flips_and_jitter() -> None:
    images = torch.arange(16 * 16, dtype=torch.float32).view(1, 1, 16, 16).expand(64, 3, 16, 16)
    images = images.to(torch.uint8).contiguous()
    generator = torch.Generator().manual_seed(0)
    plain = ImageConfig(img_size=16, crop_pct=1.0, hflip=0.0, color_jitter=0.0, crop_scale=(1, 1))
    same = DeviceAugment(plain, CPU)(images, generator)
    view = DeviceAugment(plain, CPU, augment=False)(images, None)
    torch.testing.assert_close(same, view, atol=1e-4, rtol=0)  # whole image, no flip: identity
    flipped = ImageConfig(**{**plain.__dict__, "hflip": 1.0, "vflip": 1.0})
    out = DeviceAugment(flipped, CPU)(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, view.flip(-1).flip(-2), atol=1e-4, rtol=0)
    # scale (0.25, 0.25) and ratio (1, 1): every crop a square of a quarter of the area.
    boxes = DeviceAugment(
        ImageConfig(img_size=16, crop_pct=1.0, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0)),
        CPU,
    )._crop_boxes(torch.rand(64, 26, generator=torch.Generator().manual_seed(1)), 16, 16)
    torch.testing.assert_close(boxes[:, 0, 0].abs(), torch.full((64,), 0.5))
    torch.testing.assert_close(boxes[:, 1, 1].abs(), torch.full((64,), 0.5))
    jittered = ImageConfig(**{**plain.__dict__, "color_jitter": 0.4})
    out = DeviceAugment(jittered, CPU)(images, torch.Generator().manual_seed(0))
    assert not torch.allclose(out, view, atol=1e-3)


def test_the_device_pipeline_refuses_what_it_cannot_do() -> None:
    splits = load_splits("digits", Path("data"))
    config = _config(auto_augment="rand-m9-mstd0.5", reprob=0.2, data_pipeline="device")
    with pytest.raises(
        UserError, match=r"does not do --auto-augment rand-m9-mstd0.5, --reprob 0.2"
    ):
        data_pipeline(config, splits, dataset_image_config(config, splits))
    auto = _config(reprob=0.2)
    assert data_pipeline(auto, splits, dataset_image_config(auto, splits)) == "cpu"
    assert data_pipeline(_config(), splits, dataset_image_config(_config(), splits)) == "device"


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (("--scale", "0", "1"), "--scale MIN MAX"),
        (("--hflip", "1.5"), "--hflip is a probability"),
        (("--auto-augment", "bogus"), "--auto-augment"),
        (("--ratio", "2", "1"), "--ratio MIN MAX"),
    ],
)
def test_bad_augmentation_flags_are_one_line(flags, fragment, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke_cli("teacher", "train", "-d", "digits", "-m", "test_resnet", *flags)
    assert result.exit_code == 2
    assert_error_line(result.stderr, fragment)
    assert list(tmp_path.iterdir()) == []
