"""The data layer reads each real on-disk format and splits it stably."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import write_cifar, write_image_folder

from mlkd_cli.core.errors import UserError
from mlkd_cli.data import sources
from mlkd_cli.data.registry import load_splits


def test_cifar10_reads_official_layout(tmp_path: Path) -> None:
    written = write_cifar(tmp_path, classes=10, per_file=20, fine=False)
    splits = load_splits("cifar-10", tmp_path)
    assert splits.class_names == [f"class_{i}" for i in range(10)]
    assert splits.counts() == {"train": 90, "val": 10, "test": 20}
    # The first training image is row 0 of data_batch_1: channel-planar 3x1024 -> HWC.
    image, label = splits.train[0]
    row = written["data_batch_1"]["data"][0]
    expected = row.reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(np.asarray(image), expected)
    assert label == written["data_batch_1"]["labels"][0]


def test_cifar100_uses_fine_labels(cifar100_dir: Path) -> None:
    splits = load_splits("cifar-100", cifar100_dir)
    assert splits.num_classes == 100
    assert sorted(set(splits.test.targets)) == list(range(100))
    assert splits.counts()["test"] == 200


def test_cifar_pickle_that_would_run_code_is_refused(cifar10_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    batch = cifar10_dir / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({"data": Exploit(), "labels": []}, protocol=2))
    with pytest.raises(UserError, match="data_batch_3"):
        load_splits("cifar-10", cifar10_dir)
    assert not marker.exists()


def test_missing_cifar_names_folder_and_download(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cifar-10-batches-py.*--download"):
        load_splits("cifar-10", tmp_path / "nowhere")


def test_oxford_pet_lists_and_class_names(oxford_dir: Path) -> None:
    splits = load_splits("oxford-iiit", oxford_dir)
    assert splits.class_names[:3] == ["Abyssinian", "American Bulldog", "Great Pyrenees"]
    assert splits.num_classes == 37
    assert splits.counts() == {"train": 100, "val": 11, "test": 37}
    image, label = splits.test[0]
    assert image.size == (48, 40) and image.mode == "RGB"
    assert label == 0


def test_image_folder_with_its_own_val_and_test(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": 6, "val": 2, "test": 3})
    splits = load_splits("imagefolder", tmp_path)
    assert splits.class_names == ["cat", "dog"]
    assert splits.counts() == {"train": 12, "val": 4, "test": 6}


def test_image_folder_without_val_holds_one_out(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": 10})
    splits = load_splits("imagefolder", tmp_path)
    assert splits.counts() == {"train": 18, "val": 2, "test": None}
    assert not set(splits.train_indices) & set(splits.val_indices)


def test_image_folder_problems_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="train"):
        load_splits("imagefolder", tmp_path / "absent")
    write_image_folder(tmp_path, {"train": 3, "val": 1})
    (tmp_path / "train" / "empty_class").mkdir()
    with pytest.raises(UserError, match="empty_class"):
        load_splits("imagefolder", tmp_path)


def test_image_folder_split_class_mismatch(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": 3})
    write_image_folder(tmp_path, {"val": 1}, classes=("cat", "cow"))
    with pytest.raises(UserError, match="same class subfolders"):
        load_splits("imagefolder", tmp_path)


def test_digits_embedded_splits_are_fixed_and_disjoint() -> None:
    first = load_splits("digits", Path("unused"))
    again = load_splits("digits", Path("unused"))
    counts = first.counts()
    assert counts["train"] + counts["val"] + counts["test"] == 1797
    assert first.val_indices == again.val_indices
    assert not set(first.train_indices) & set(first.val_indices)
    test_images = {np.asarray(first.test[i][0]).tobytes() for i in range(len(first.test))}
    assert np.asarray(first.test[0][0]).shape == (8, 8, 3)
    assert first.test.targets == again.test.targets
    # Every digit is present in every split.
    assert set(first.test.targets) == set(range(10))
    assert {first.val.targets[i] for i in first.val_indices} == set(range(10))
    assert len(test_images) > 300


def test_stratified_holdout_is_a_stable_partition() -> None:
    labels = [i % 4 for i in range(100)]
    kept, held = sources.stratified_holdout(labels, 0.2, seed=7)
    assert sorted(kept + held) == list(range(100))
    assert (kept, held) == sources.stratified_holdout(labels, 0.2, seed=7)
    assert kept != sources.stratified_holdout(labels, 0.2, seed=8)[0]
    assert sorted(labels[i] for i in held) == sorted([0] * 5 + [1] * 5 + [2] * 5 + [3] * 5)
    # Classes too small for their own share still give a validation split of the right size.
    tiny = list(range(50)) * 2
    assert len(sources.stratified_holdout(tiny, 0.1, seed=7)[1]) == 10


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(UserError, match="choose one of: cifar-10, cifar-100"):
        load_splits("mnist", Path("data"))


def test_failed_download_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from urllib.error import URLError

    from mlkd_cli.data import registry

    calls = []

    def offline(kind: str):
        def download(root: Path) -> None:
            calls.append((kind, root))
            raise URLError("[Errno -3] Temporary failure in name resolution")

        return download

    monkeypatch.setattr(registry, "_torchvision_download", offline)
    with pytest.raises(UserError, match=r"download into .* failed .*name resolution"):
        load_splits("oxford-iiit", tmp_path / "d", download=True)
    assert calls == [("oxford-iiit", tmp_path / "d")]


def test_download_of_embedded_dataset_is_refused() -> None:
    with pytest.raises(UserError, match="drop --download"):
        load_splits("digits", Path("data"), download=True)
