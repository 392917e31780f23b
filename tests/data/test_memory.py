"""Image files held decoded in memory: which folders qualify (one small size, within the memory
budget), that the held pixels are the decoded files', that a file breaking the sample's promise
is named without being decoded, and that a run says which pipeline it took and why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import assert_error_line, write_image_folder
from PIL import Image

from mlkd_cli.data import memory
from mlkd_cli.data.memory import hold_in_memory, hold_splits, why_not_held
from mlkd_cli.data.registry import load_splits
from mlkd_cli.data.sources import ArraySource, load_image_folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """train/ (12 images a class) and test/ of 24x24 PNGs; the validation split is held out."""
    return write_image_folder(tmp_path / "pets", {"train": 12, "test": 3})


def test_a_folder_of_small_images_of_one_size_qualifies(folder: Path) -> None:
    source = load_image_folder(folder).train
    assert why_not_held(source, img_size=32, local_processes=2) is None
    assert why_not_held(source, img_size=24, local_processes=1) is None  # kept as they are
    # Shrunk images keep timm's antialiased resize.
    assert "shrunk to 16 px" in why_not_held(source, img_size=16, local_processes=1)


def test_images_of_several_sizes_or_beyond_the_budget_do_not_qualify(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = load_image_folder(folder).train
    Image.new("RGB", (30, 24)).save(source.paths[0])  # a sampled image of another size
    assert "differ in size (24x24, 30x24)" in why_not_held(source, 32, 1)
    Image.new("RGB", (24, 24)).save(source.paths[0])
    # 24 images of 24x24x3 bytes, one copy a process: 41,472 bytes for one process
    monkeypatch.setattr(memory, "available_memory", lambda: int(41_472 / memory.MEMORY_SHARE))
    assert why_not_held(source, 32, 1) is None
    assert "over 25% of the available memory" in why_not_held(source, 32, 2)


def test_held_images_are_the_decoded_files(folder: Path) -> None:
    splits = load_splits("imagefolder", folder)
    held = hold_splits(splits, threads=2)
    assert not isinstance(held, str)
    assert isinstance(held.train, ArraySource) and held.val is held.train  # hold-out from train
    assert held.train.images.shape == (24, 24, 24, 3)
    assert held.train.targets == list(splits.train.targets)
    for index in (0, 13, 23):
        image, label = splits.train[index]
        assert np.array_equal(held.train.images[index], np.asarray(image))
        assert label == held.train.targets[index]
    assert held.test is splits.test  # evaluated from its files, as before


def test_a_file_that_breaks_the_sample_is_named_and_not_decoded(folder: Path) -> None:
    source = load_image_folder(folder).train
    odd, damaged = source.paths[5], source.paths[7]
    Image.new("RGB", (4000, 3000)).save(odd)  # would be 36 MB decoded
    assert hold_in_memory(source) == f"{odd} is 4000x3000, unlike the others (24x24)"
    Image.new("RGB", (24, 24)).save(odd)
    damaged.write_bytes(damaged.read_bytes()[:60])  # its header still reads
    assert hold_in_memory(source, threads=2) == f"{damaged} cannot be decoded"


def _train(folder: Path, out: Path, *extra: str) -> list[object]:
    return [
        *("teacher", "train", "-d", "imagefolder", "--data-dir", folder, "-m", "test_resnet"),
        *("--img-size", "32", "--batch-size", "8", "--epochs", "1", "--output-dir", out),
        *("--name", "t", *extra),
    ]


def test_a_run_says_it_holds_the_files_and_falls_back_when_one_breaks_the_sample(
    run_cli, folder: Path, tmp_path: Path
) -> None:
    held = run_cli(*_train(folder, tmp_path / "a"))
    assert held.exit_code == 0, held.stderr
    assert "data pipeline device (batched augmentation, image files held in memory)" in (
        held.stderr
    )
    # A damaged file outside the headers sampled at plan time: the run trains on timm's
    # transforms instead, says why, which leaves the
    # image out.
    source = load_image_folder(folder).train
    damaged = source.paths[1]
    damaged.write_bytes(damaged.read_bytes()[:60])
    fallback = run_cli(*_train(folder, tmp_path / "b"))
    assert fallback.exit_code == 0, fallback.stderr
    assert f"data pipeline cpu (timm's transforms: {damaged} cannot be decoded)" in (
        fallback.stderr.replace("\n", " ")
    )
    # Asked for by name, the device pipeline stops with the reason instead.
    refused = run_cli(*_train(folder, tmp_path / "c", "--data-pipeline", "device"))
    assert refused.exit_code == 2
    assert_error_line(refused.stderr, str(damaged), "--data-pipeline cpu")
