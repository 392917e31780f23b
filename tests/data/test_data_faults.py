"""Damaged image files, resumable sampling and per-image augmentation seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_error_line, write_image_folder

from mlkd_cli.core.dist import DistContext
from mlkd_cli.data.loaders import (
    ResumableSampler,
    TransformedSubset,
    build_train_batches,
    collate_readable,
)
from mlkd_cli.data.sources import ArraySource, UnreadableImage, load_image_folder
from mlkd_cli.data.transforms import ImageConfig, build_train_transform


def _damage(path: Path) -> Path:
    """Cut a PNG short, as an interrupted copy leaves it."""
    path.write_bytes(path.read_bytes()[:60])
    return path


@pytest.fixture
def damaged_folder(tmp_path: Path) -> tuple[Path, Path]:
    """An image folder with train/ and val/, one training image truncated."""
    root = write_image_folder(tmp_path / "pets", {"train": 12, "val": 4})
    return root, _damage(root / "train" / "dog" / "3.png")


def test_unreadable_image_is_left_out_of_its_batch(damaged_folder: tuple[Path, Path]) -> None:
    root, bad = damaged_folder
    raw = load_image_folder(root)
    position = raw.train.paths.index(bad)
    assert isinstance(raw.train[position], UnreadableImage)
    subset = TransformedSubset(
        raw.train, range(len(raw.train)), build_train_transform(_image_config())
    )
    batch = collate_readable([subset[i] for i in range(position - 1, position + 2)])
    assert batch.images.shape == (2, 3, 16, 16)
    assert [s.path for s in batch.skipped] == [str(bad)]
    assert batch.kept.tolist() == [0, 2]


def _image_config() -> ImageConfig:
    return ImageConfig(img_size=16, crop_pct=1.0)


def _train_args(root: Path, out: Path, *extra: str) -> list[object]:
    return [
        "teacher",
        "train",
        "--dataset",
        "imagefolder",
        "--data-dir",
        root,
        "--model",
        "test_resnet",
        "--img-size",
        "16",
        "--batch-size",
        "4",
        "--epochs",
        "2",
        "--output-dir",
        out,
        "--name",
        "t",
        *extra,
    ]


def test_training_names_and_counts_unreadable_images(
    run_cli, damaged_folder: tuple[Path, Path], tmp_path: Path
) -> None:
    root, bad = damaged_folder
    result = run_cli(*_train_args(root, tmp_path / "out", "--json"))
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "unreadable image" in line]
    assert len(warnings) == 1 and str(bad) in warnings[0]  # named once, not every epoch
    rows = json.loads((tmp_path / "out" / "t_history.json").read_text())["epochs"]
    assert [row["unreadable_skipped"] for row in rows] == [1, 1]
    assert rows[-1]["val_images"] == 8


def test_strict_data_stops_at_the_unreadable_image(
    run_cli, damaged_folder: tuple[Path, Path], tmp_path: Path
) -> None:
    root, bad = damaged_folder
    result = run_cli(*_train_args(root, tmp_path / "out", "--strict-data", "-q"))
    assert result.exit_code == 2
    assert_error_line(result.stderr, str(bad), "not a readable image", "--strict-data")
    assert not (tmp_path / "out" / "t.pth").exists()


def test_eval_leaves_out_an_unreadable_test_image(run_cli, tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "pets", {"train": 8, "val": 2, "test": 3})
    out = tmp_path / "out"
    trained = run_cli(*_train_args(root, out, "-q"))
    assert trained.exit_code == 0, trained.stderr
    bad = _damage(root / "test" / "cat" / "1.png")
    result = run_cli("eval", out / "t.pth", "--data-dir", root, "--json")
    assert result.exit_code == 0, result.stderr
    assert str(bad) in result.stderr
    assert json.loads(result.stdout)["images"] == 5


def test_per_image_seeds_make_augmentation_independent_of_order() -> None:
    images = torch.randint(0, 256, (6, 20, 20, 3), dtype=torch.uint8).numpy()
    subset = TransformedSubset(
        ArraySource(images, [0, 1, 2, 0, 1, 2]), range(6), build_train_transform(_image_config())
    )
    forward = [subset[(i, 7)] for i in range(6)]
    torch.manual_seed(123)  # the process's generator plays no part
    backward = [subset[(i, 7)] for i in reversed(range(6))][::-1]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(forward, backward, strict=True))
    assert not torch.equal(subset[(0, 8)][0], forward[0][0])


def test_loader_workers_see_each_epochs_seed(damaged_folder: tuple[Path, Path]) -> None:
    root, _ = damaged_folder
    raw = load_image_folder(root)
    subset = TransformedSubset(raw.val, range(len(raw.val)), build_train_transform(_image_config()))
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    in_process = build_train_batches(subset, 4, ctx, seed=1, workers=0)
    with_workers = build_train_batches(subset, 4, ctx, seed=1, workers=2)  # persistent workers
    for epoch in (0, 1):
        a = torch.cat([b.images for b in in_process.epoch(epoch)])
        b = torch.cat([b.images for b in with_workers.epoch(epoch)])
        assert torch.equal(a, b)
    assert not torch.equal(a, torch.cat([b.images for b in in_process.epoch(0)]))


def test_resumable_sampler_continues_where_it_stopped() -> None:
    data = list(range(23))
    whole = ResumableSampler(data, rank=1, world_size=2, seed=3)
    whole.set_epoch(4)
    rest = ResumableSampler(data, rank=1, world_size=2, seed=3)
    rest.set_epoch(4)
    rest.skip = 5
    assert list(rest) == list(whole)[5:] and len(rest) == len(whole) - 5
