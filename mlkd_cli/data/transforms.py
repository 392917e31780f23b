"""Image transforms: timm's training augmentation, and a resize + centre-crop for evaluation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from timm.data import create_transform
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

# The original normalised every dataset to [-1, 1]; checkpoints record these so eval matches.
from mlkd_cli.core.constants import DEFAULT_MEAN, DEFAULT_STD


@dataclass(frozen=True)
class ImageConfig:
    """How images are sized, augmented and normalised for one run.

    Named after timm's data config (`resolve_data_config`, a model's `pretrained_cfg`): it holds
    those fields plus timm's train-transform arguments ("recipe" is `--recipe`'s training recipe).

    The sizing and normalisation (img_size, crop_pct, mean, std, interpolation) are recorded in
    every checkpoint so that evaluation views images as training did; the rest says how training
    images are augmented, in timm's terms (`timm.data.create_transform`).
    """

    img_size: int
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = DEFAULT_MEAN
    std: tuple[float, float, float] = DEFAULT_STD
    interpolation: str = "bicubic"
    hflip: float = 0.5  # probability of a horizontal flip
    vflip: float = 0.0  # probability of a vertical flip
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random resized crop: share of the area
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # ... and aspect ratio
    color_jitter: float = 0.4  # brightness, contrast and saturation, each by up to this much
    auto_augment: str | None = None  # timm's RandAugment/AutoAugment spec, e.g. rand-m9-mstd0.5
    reprob: float = 0.0  # random erasing probability


def build_train_transform(image_config: ImageConfig) -> Callable:
    """timm's training transform for the image config: random resized crop, flips, colour jitter or
    auto-augment, normalisation, random erasing."""
    return create_transform(
        image_config.img_size,
        is_training=True,
        scale=image_config.crop_scale,
        ratio=image_config.crop_ratio,
        hflip=image_config.hflip,
        vflip=image_config.vflip,
        color_jitter=image_config.color_jitter or None,
        auto_augment=image_config.auto_augment,
        interpolation=image_config.interpolation,
        mean=image_config.mean,
        std=image_config.std,
        re_prob=image_config.reprob,
        re_mode="pixel",
    )


def eval_resize(image_config: ImageConfig) -> int:
    """The short side an evaluation view resizes to before its centre crop."""
    return int(round(image_config.img_size / image_config.crop_pct))


def build_eval_transform(image_config: ImageConfig) -> T.Compose:
    """Resize to img_size / crop_pct, centre crop to img_size, normalise."""
    return T.Compose(
        [
            T.Resize(
                eval_resize(image_config),
                interpolation=InterpolationMode(image_config.interpolation),
                antialias=True,
            ),
            T.CenterCrop(image_config.img_size),
            T.ToTensor(),
            T.Normalize(image_config.mean, image_config.std),
        ]
    )
