"""The dataset registry: what each name means, where it looks, and its train/val/test splits."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlkd_cli.core.errors import UserError
from mlkd_cli.data import sources
from mlkd_cli.data.sources import ImageSource, RawSplits

# The validation split is held out of the training data with this seed, never with the run's
# --seed: teachers trained with different seeds must share one validation split, or fitting an
# ensemble on it would score members on images they were trained on.
HOLDOUT_SEED = 53_303
DEFAULT_VAL_FRACTION = 0.1
# The labelled images of a label budget (`--label-fraction`) are drawn with this seed, never the
# run's --seed, for the same reason: the teachers, the student and its cross-entropy baseline
# must see the same labels.
LABELLED_SEED = 7_919


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset name: its classes, files, and the image config it trains with."""

    name: str
    description: str
    num_classes: int | None  # None: read from the files (image folders)
    looks_in: Callable[[Path], str]
    read: Callable[[Path, bool], RawSplits]
    img_size: int = 224
    crop_pct: float = 0.875
    # Training augmentation; None: chosen from the images (`augmentation_defaults`).
    hflip: float | None = None
    crop_scale: tuple[float, float] | None = None
    color_jitter: float | None = None
    splits: str = "train, val, test"
    downloadable: bool = False
    reads_files: bool = True  # False: embedded, no --data-dir read


def _torchvision_download(kind: str) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        # Imported here: torchvision's dataset module is only needed by users who download.
        from torchvision import datasets

        if kind == "cifar-10":
            datasets.CIFAR10(str(root), train=True, download=True)
            datasets.CIFAR10(str(root), train=False, download=True)
        elif kind == "cifar-100":
            datasets.CIFAR100(str(root), train=True, download=True)
            datasets.CIFAR100(str(root), train=False, download=True)
        else:
            datasets.OxfordIIITPet(str(root), split="trainval", download=True)

    return download


def _cifar_spec(
    name: str, layout: sources.CifarLayout, description: str, classes: int
) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        description=description,
        num_classes=classes,
        looks_in=lambda d: str(d / layout.folder),
        read=lambda d, dl: sources.load_cifar(d, layout, dl, _torchvision_download(name)),
        downloadable=True,
        # The original's recipe (224 px, upscaled): natural photos, ImageNet's augmentation.
        hflip=0.5,
        crop_scale=(0.08, 1.0),
        color_jitter=0.4,
    )


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        _cifar_spec(
            "cifar-10", sources.CIFAR10_LAYOUT, "CIFAR-10: 60,000 32x32 images, 10 classes", 10
        ),
        _cifar_spec(
            "cifar-100", sources.CIFAR100_LAYOUT, "CIFAR-100: 60,000 32x32 images, 100 classes", 100
        ),
        DatasetSpec(
            name="oxford-iiit",
            description="Oxford-IIIT Pet: 7,349 photos of 37 breeds",
            num_classes=37,
            looks_in=lambda d: str(d / sources.OXFORD_FOLDER),
            read=lambda d, dl: sources.load_oxford_pet(d, dl, _torchvision_download("oxford-iiit")),
            downloadable=True,
        ),
        DatasetSpec(
            name="imagefolder",
            description="your images in class subfolders",
            num_classes=None,
            looks_in=lambda d: f"{d}/train, {d}/val, {d}/test",
            read=lambda d, dl: sources.load_image_folder(d),
            splits="train, val, test (if present)",
        ),
        DatasetSpec(
            name="csv",
            description="your images listed in train.csv (and test.csv): path,label rows",
            num_classes=None,
            looks_in=lambda d: f"{d}/train.csv, {d}/test.csv",
            read=lambda d, dl: sources.load_csv_dataset(d),
            splits="train, val (held out), test (if test.csv)",
        ),
        DatasetSpec(
            name="digits",
            description="UCI handwritten digits: 1,797 8x8 images",
            num_classes=10,
            looks_in=lambda d: "embedded in mlkd",
            read=lambda d, dl: sources.load_digits(),
            reads_files=False,
            img_size=32,
            crop_pct=1.0,
            hflip=0.0,  # a mirrored 2 is not a 2
            crop_scale=(0.5, 1.0),  # 8x8 glyphs do not survive ImageNet's 8% crops
            splits="train, val, test (fixed 20%)",
        ),
    )
}


# Images this small (longest side, px) are glyphs, icons or thumbnails: ImageNet's crops and
# flips destroy them.
SMALL_SIDE = 64


@dataclass(frozen=True)
class Augmentation:
    """Default training augmentation for a dataset."""

    hflip: float
    crop_scale: tuple[float, float]
    color_jitter: float
    why: str


def augmentation_defaults(spec: DatasetSpec, train: sources.ImageSource) -> Augmentation:
    """The dataset's own augmentation, else one chosen from what its images look like.

    Photos get ImageNet's (the original's): random crops down to 8 % of the area, flips, colour
    jitter 0.4. Small images (longest side <= 64 px) or grayscale ones — digits, glyphs, scans,
    icons — get no flip (a mirrored 2 is not a 2), crops of at least half the area, and no
    colour jitter when grey: on such data ImageNet's augmentation made distillation lose to plain
    training (issue 14).
    """
    traits = sources.image_traits(train)
    plain = traits.grayscale or traits.side <= SMALL_SIDE
    kind = "grayscale" if traits.grayscale else f"{traits.side} px" if plain else "photos"
    return Augmentation(
        hflip=spec.hflip if spec.hflip is not None else (0.0 if plain else 0.5),
        crop_scale=spec.crop_scale or ((0.5, 1.0) if plain else (0.08, 1.0)),
        color_jitter=(
            spec.color_jitter
            if spec.color_jitter is not None
            else (0.0 if traits.grayscale else 0.4)
        ),
        why=kind,
    )


# Datasets named by a prefix and a place: `hfds/NAME` (a Hugging Face dataset: a Hub name or a
# local folder in the Hub's layout, `data.hub`) and `wds/FOLDER` (WebDataset tar shards,
# `data.shards`). Their readers import `datasets` / `webdataset` only when used.
PREFIXES = {
    "hfds": "a Hugging Face dataset: a Hub name, or a folder of data/train-*.parquet",
    "wds": "WebDataset shards: FOLDER/train-*.tar (image + .cls) and classes.txt",
}
PREFIXED_SPLITS = "train, val (its own, or held out), test (if present)"
MAX_PLACE_CHARS = 1000  # the NAME / FOLDER after a prefix


def _hub_spec(name: str, place: str) -> DatasetSpec:
    from mlkd_cli.data import hub

    return DatasetSpec(
        name=name,
        description=PREFIXES["hfds"],
        num_classes=None,
        looks_in=lambda d: hub.looks_in(place, d),
        read=lambda d, dl: hub.load_hub_dataset(place, d),
        splits=PREFIXED_SPLITS,
        downloadable=True,  # a Hub name is fetched by `datasets` into --data-dir on first use
    )


def _shard_spec(name: str, place: str) -> DatasetSpec:
    from mlkd_cli.data import shards

    return DatasetSpec(
        name=name,
        description=PREFIXES["wds"],
        num_classes=None,
        looks_in=lambda d: shards.looks_in(place, d),
        read=lambda d, dl: shards.load_shards(shards.folder_of(place, d)),
        splits=PREFIXED_SPLITS,
    )


def _prefixed_spec(name: str) -> DatasetSpec | None:
    """The spec of `hfds/NAME` or `wds/FOLDER`; None for any other name."""
    prefix, slash, place = name.partition("/")
    if not slash or prefix not in PREFIXES:
        return None
    if not place.strip() or len(place) > MAX_PLACE_CHARS or "\x00" in place:
        raise UserError(
            f"--dataset {prefix}/ needs a name after it ({prefix}/NAME), of at most "
            f"{MAX_PLACE_CHARS} characters"
        )
    return _hub_spec(name, place) if prefix == "hfds" else _shard_spec(name, place)


def run_label(dataset: str) -> str:
    """The dataset as a run's default file name holds it: a prefixed name's last part, without
    slashes (`wds/data/pets` -> `wds-pets`); any other name as it is."""
    prefix, slash, place = dataset.partition("/")
    if not slash or prefix not in PREFIXES:
        return dataset
    last = Path(place.rstrip("/\\")).name or "data"
    return f"{prefix}-{re.sub(r'[^A-Za-z0-9._-]', '_', last)[:60]}"


def get_dataset_spec(name: str) -> DatasetSpec:
    """The registered dataset called `name`, or a UserError listing the known names."""
    prefixed = _prefixed_spec(name)
    if prefixed is not None:
        return prefixed
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join([*DATASETS, "hfds/NAME", "wds/FOLDER"])
        shown = name if len(name) <= 60 else f"{name[:57]}..."
        close = difflib.get_close_matches(name.lower(), DATASETS, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"unknown dataset {shown!r}; {hint}choose one of: {known}") from None


@dataclass
class DataSplits:
    """The three splits of a dataset as untransformed sources plus index lists."""

    spec: DatasetSpec
    class_names: list[str]
    train: ImageSource
    train_indices: list[int]
    val: ImageSource
    val_indices: list[int]
    test: ImageSource | None

    @property
    def num_classes(self) -> int:
        """How many classes the dataset has."""
        return len(self.class_names)

    def counts(self) -> dict[str, int | None]:
        """Number of images in each split."""
        return {
            "train": len(self.train_indices),
            "val": len(self.val_indices),
            "test": None if self.test is None else len(self.test),
        }


def load_splits(
    name: str,
    data_dir: Path,
    download: bool = False,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> DataSplits:
    """Read a dataset's files and split off the validation set (stable across runs and ranks)."""
    spec = get_dataset_spec(name)
    if download and not spec.downloadable:
        raise UserError(f"{name} cannot be downloaded; drop --download")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    raw = spec.read(data_dir, download)
    if spec.num_classes is not None and len(raw.class_names) != spec.num_classes:
        raise UserError(
            f"{spec.looks_in(data_dir)} lists {len(raw.class_names)} classes, "
            f"{name} has {spec.num_classes}; re-download it"
        )
    if raw.val is not None:
        return DataSplits(
            spec,
            raw.class_names,
            raw.train,
            list(range(len(raw.train))),
            raw.val,
            list(range(len(raw.val))),
            raw.test,
        )
    train_idx, val_idx = sources.stratified_holdout(raw.train.targets, val_fraction, HOLDOUT_SEED)
    if not train_idx or not val_idx:
        raise UserError(
            f"{name} has too few training images ({len(raw.train)}) to hold out a validation split"
        )
    return DataSplits(spec, raw.class_names, raw.train, train_idx, raw.train, val_idx, raw.test)


def labelled_positions(splits: DataSplits, fraction: float) -> list[int]:
    """Positions in `splits.train_indices` whose labels a run with a label budget uses: `fraction`
    of each class's training images, the same for every run and rank; all of them at 1
    (`TrainConfig.validate` refuses a fraction outside (0, 1])."""
    if fraction >= 1.0:
        return list(range(len(splits.train_indices)))
    targets = [splits.train.targets[i] for i in splits.train_indices]
    _, labelled = sources.stratified_holdout(targets, fraction, LABELLED_SEED)
    missing = sorted(set(targets) - {targets[p] for p in labelled})
    if missing:
        raise UserError(
            f"--label-fraction {fraction:g} leaves class {splits.class_names[missing[0]]!r} "
            "without a labelled training image; raise it"
        )
    return labelled
