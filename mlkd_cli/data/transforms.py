"""Image transforms: the original's training augmentation and a resize + centre-crop evaluation."""

from __future__ import annotations

from dataclasses import dataclass

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

# The original normalised every dataset to [-1, 1]; checkpoints record these so eval matches.
from mlkd_cli.core.constants import DEFAULT_MEAN, DEFAULT_STD


@dataclass(frozen=True)
class ImageRecipe:
    """How images are sized and normalised for one run; recorded in every checkpoint."""

    img_size: int
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = DEFAULT_MEAN
    std: tuple[float, float, float] = DEFAULT_STD
    interpolation: str = "bicubic"
    hflip: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    color_jitter: float = 0.4


def build_train_transform(recipe: ImageRecipe) -> T.Compose:
    """Random resized crop (bicubic), optional flip, colour jitter, normalise."""
    steps: list = [
        T.RandomResizedCrop(
            recipe.img_size,
            scale=recipe.crop_scale,
            interpolation=InterpolationMode(recipe.interpolation),
            antialias=True,
        )
    ]
    if recipe.hflip:
        steps.append(T.RandomHorizontalFlip())
    if recipe.color_jitter > 0:
        j = recipe.color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j))
    steps += [T.ToTensor(), T.Normalize(recipe.mean, recipe.std)]
    return T.Compose(steps)


def build_eval_transform(recipe: ImageRecipe) -> T.Compose:
    """Resize to img_size / crop_pct, centre crop to img_size, normalise."""
    resize = int(round(recipe.img_size / recipe.crop_pct))
    return T.Compose(
        [
            T.Resize(resize, interpolation=InterpolationMode(recipe.interpolation), antialias=True),
            T.CenterCrop(recipe.img_size),
            T.ToTensor(),
            T.Normalize(recipe.mean, recipe.std),
        ]
    )
