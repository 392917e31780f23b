"""`--dataset hfds/...` (the Hub's parquet layout, read through `datasets`) and `wds/...`
(WebDataset tar shards): splits, class names, the hold-out, hostile files, and training from them
at --world-size 2. The files are real: parquet written by `datasets`, shards by webdataset."""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import (
    HUB_CLASSES,
    HUB_TEST,
    HUB_TRAIN,
    SHARD_TEST,
    SHARD_TRAIN,
    SHARD_VAL,
    assert_error_line,
    tiny_png,
    write_hub_split,
    write_shards,
)

from mlkd_cli.data import sources
from mlkd_cli.data.registry import HOLDOUT_SEED, load_splits, run_label
from mlkd_cli.engine.config import TeacherTrainConfig


def _info(run_cli, dataset: str, *args: object) -> dict:
    result = run_cli("data", "info", dataset, "--json", *args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _colour_matches_label(source, count: int = 12) -> None:
    """Each image read back is the one written for its label (its dominant channel)."""
    for index in np.linspace(0, len(source) - 1, count).astype(int):
        image, label = source[int(index)]
        assert int(np.asarray(image).reshape(-1, 3).mean(0).argmax()) == label % 3


def test_data_info_reads_a_hub_folder(run_cli, hub_folder: Path, tmp_path: Path) -> None:
    info = _info(run_cli, f"hfds/{hub_folder}", "--data-dir", tmp_path / "cache")
    held = round(0.1 * HUB_TRAIN)
    assert info["counts"] == {"train": HUB_TRAIN - held, "val": held, "test": HUB_TEST}
    assert info["class_names"] == list(HUB_CLASSES)
    splits = load_splits(f"hfds/{hub_folder}", tmp_path / "cache")
    _colour_matches_label(splits.train)
    _colour_matches_label(splits.test)


def test_a_hub_folder_is_found_under_data_dir(run_cli, hub_folder: Path) -> None:
    info = _info(run_cli, "hfds/pets", "--data-dir", hub_folder.parent)
    assert info["classes"] == len(HUB_CLASSES) and info["counts"]["test"] == HUB_TEST


def test_data_info_reads_shards_with_their_val_split(run_cli, shard_folder: Path) -> None:
    info = _info(run_cli, f"wds/{shard_folder}")
    assert info["counts"] == {"train": SHARD_TRAIN, "val": SHARD_VAL, "test": SHARD_TEST}
    assert info["class_names"] == list(HUB_CLASSES)
    splits = load_splits(f"wds/{shard_folder}", Path("unused"))
    assert len(splits.train.shards) == 3
    _colour_matches_label(splits.train)
    _colour_matches_label(splits.val)


def test_shards_without_val_hold_it_out_by_class_as_every_dataset(tmp_path: Path) -> None:
    labels = [0] * 50 + [1] * 30 + [2] * 20
    write_shards(tmp_path / "s", "train", len(labels), 40, labels=labels)
    (tmp_path / "s" / "classes.txt").write_text("ant\nbee\ncat\n")
    splits = load_splits("wds/s", tmp_path, val_fraction=0.2)
    kept, held = sources.stratified_holdout(labels, 0.2, HOLDOUT_SEED)
    assert (splits.train_indices, splits.val_indices) == (kept, held)
    assert [splits.train.targets[i] for i in held].count(0) == 10  # a fifth of each class


def test_a_prefixed_dataset_names_runs_by_its_last_part() -> None:
    assert run_label("wds/data/my pets/") == "wds-my_pets"
    assert run_label("hfds/timm/oxford-iiit-pet") == "hfds-oxford-iiit-pet"
    assert run_label("digits") == "digits"
    config = TeacherTrainConfig(dataset="wds//srv/shards", model="resnet18")
    assert config.run_name == "wds-shards_resnet18"


# ----------------------------------------------------------------------------- hostile files


def _hub(tmp_path: Path, count: int = 12, **kwargs) -> Path:
    write_hub_split(tmp_path / "h" / "data" / "train-00000-of-00001.parquet", count, **kwargs)
    return tmp_path / "h" / "data" / "train-00000-of-00001.parquet"


def _rewrite_column(path: Path, name: str, values: list) -> None:
    table = pq.read_table(path)
    field = table.schema.field(name)
    table = table.set_column(
        table.schema.get_field_index(name), field, pa.array(values, type=field.type)
    )
    pq.write_table(table, path)  # the Hub's feature metadata kept


def _refused(run_cli, dataset: str, *fragments: str, data_dir: Path) -> None:
    result = run_cli("data", "info", dataset, "--data-dir", data_dir)
    assert result.exit_code == 2, result.stdout
    assert_error_line(result.stderr, *fragments)


def test_hub_folder_without_a_label_column_is_refused(run_cli, tmp_path: Path) -> None:
    path = _hub(tmp_path)
    table = pq.read_table(path)
    pq.write_table(table.rename_columns(["image", "labels"]), path)
    _refused(run_cli, "hfds/h", "no 'label' column", "labels", data_dir=tmp_path)


def test_hub_label_outside_the_class_list_is_refused(run_cli, tmp_path: Path) -> None:
    path = _hub(tmp_path)
    labels = pq.read_table(path).column("label").to_pylist()
    _rewrite_column(path, "label", labels[:5] + [7] + labels[6:])
    _refused(run_cli, "hfds/h", "train row 5", "label 7", "3 classes", data_dir=tmp_path)


def test_hub_folder_without_train_files_is_refused(run_cli, tmp_path: Path) -> None:
    (tmp_path / "h" / "data").mkdir(parents=True)
    _refused(run_cli, "hfds/h", "train-*.parquet", data_dir=tmp_path)


def test_hub_unreadable_image_is_named_by_its_row(tmp_path: Path) -> None:
    path = _hub(tmp_path)
    cells = pq.read_table(path).column("image").to_pylist()
    cells[4] = {"bytes": b"\x89PNG not really", "path": None}
    _rewrite_column(path, "image", cells)
    train = load_splits("hfds/h", tmp_path).train
    item = train[4]
    assert isinstance(item, sources.UnreadableImage) and item.path.endswith("train row 4")
    assert train[3][1] == 0  # the rows around it still read


def _classes(folder: Path, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classes.txt").write_text(text)


def test_shard_folder_without_shards_is_refused(run_cli, tmp_path: Path) -> None:
    _classes(tmp_path / "s", "ant\nbee\n")
    _refused(run_cli, f"wds/{tmp_path / 's'}", "no train-*.tar", data_dir=tmp_path)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("x\n" * 100_001, "over 100,000"),
        ("ant\n" + "b" * 201 + "\n", "class 2 is 201 characters"),
        ("ant\nant\n", "names class 'ant' twice"),
    ],
)
def test_bad_classes_txt_is_refused(run_cli, tmp_path: Path, text: str, fragment: str) -> None:
    write_shards(tmp_path / "s", "train", 4, 4, labels=[0, 0, 0, 0])
    _classes(tmp_path / "s", text)
    _refused(run_cli, "wds/s", fragment, data_dir=tmp_path)


def test_shard_class_outside_the_list_is_refused(run_cli, tmp_path: Path) -> None:
    write_shards(tmp_path / "s", "train", 6, 6, labels=[0, 1, 2, 1, 0, 5])
    _classes(tmp_path / "s", "ant\nbee\ncat\n")
    _refused(run_cli, "wds/s", "train000005", "class 5 is outside the 3", data_dir=tmp_path)


def test_shard_sample_without_a_class_is_refused(run_cli, tmp_path: Path) -> None:
    _classes(tmp_path / "s", "ant\n")
    with tarfile.open(tmp_path / "s" / "train-000000.tar", "w") as tar:
        tar.add(_png_file(tmp_path), arcname="k1.png")
    _refused(run_cli, "wds/s", "'k1'", "no .cls class number", data_dir=tmp_path)


def test_a_shard_that_is_not_a_tar_is_refused(run_cli, tmp_path: Path) -> None:
    _classes(tmp_path / "s", "ant\n")
    (tmp_path / "s" / "train-000000.tar").write_bytes(b"\x00\x01 not a tar" * 100)
    _refused(run_cli, "wds/s", "train-000000.tar", "not a readable tar shard", data_dir=tmp_path)


def test_shard_unreadable_image_is_named_by_its_shard(tmp_path: Path) -> None:
    _classes(tmp_path / "s", "ant\n")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG not really")
    with tarfile.open(tmp_path / "s" / "train-000000.tar", "w") as tar:
        for key, image in (("a", _png_file(tmp_path)), ("b", junk)):
            tar.add(image, arcname=f"{key}.png")
            cls = tmp_path / "cls"
            cls.write_text("0")
            tar.add(cls, arcname=f"{key}.cls")
    train = load_splits("wds/s", tmp_path, val_fraction=0.5).train
    assert train[0][1] == 0
    item = train[1]
    assert isinstance(item, sources.UnreadableImage) and "train-000000.tar" in item.path


def _png_file(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "ok.png"
    Image.new("RGB", (4, 4), (200, 10, 10)).save(path)
    return path


# ----------------------------------------------------------------------------- training


def _train_and_eval(
    run_cli, dataset: str, tmp_path: Path, *args: object
) -> tuple[dict, dict, dict]:
    out = tmp_path / "models"
    trained = run_cli(
        "teacher", "train", "-d", dataset, "-m", "test_resnet", "--img-size", "16",
        "--epochs", "1", "--world-size", "2", "--output-dir", out, "--json", *args,
    )  # fmt: skip
    assert trained.exit_code == 0, trained.stderr
    summary = json.loads(trained.stdout)
    evaluated = run_cli(
        "eval", summary["files"]["best"], "--split", "test", "--world-size", "2", "--json", *args
    )
    assert evaluated.exit_code == 0, evaluated.stderr
    card = torch.load(summary["files"]["best"], weights_only=True)
    assert card["class_names"] == list(HUB_CLASSES) and card["num_classes"] == len(HUB_CLASSES)
    return summary, json.loads(evaluated.stdout), card["extra"]["provenance"]["data"]


@pytest.mark.slow
def test_teacher_trains_at_world_size_2_from_a_hub_folder(
    run_cli, hub_folder: Path, tmp_path: Path
) -> None:
    summary, test, data = _train_and_eval(
        run_cli, f"hfds/{hub_folder}", tmp_path, "--data-dir", tmp_path / "cache"
    )
    held = round(0.1 * HUB_TRAIN)
    assert (data["train"], data["val"], data["test"]) == (HUB_TRAIN - held, held, HUB_TEST)
    assert summary["name"] == "hfds-pets_test_resnet" and summary["world_size"] == 2
    assert summary["last"]["val_images"] == round(0.1 * HUB_TRAIN)
    assert test["images"] == HUB_TEST and test["dataset"] == f"hfds/{hub_folder}"
    assert {row["class"] for row in test["worst_classes"]} <= set(HUB_CLASSES)


@pytest.mark.slow
def test_teacher_trains_at_world_size_2_from_shards(
    run_cli, shard_folder: Path, tmp_path: Path
) -> None:
    summary, test, data = _train_and_eval(run_cli, f"wds/{shard_folder}", tmp_path)
    assert (data["train"], data["val"], data["test"]) == (SHARD_TRAIN, SHARD_VAL, SHARD_TEST)
    assert summary["name"] == "wds-shards_test_resnet" and summary["world_size"] == 2
    assert summary["last"]["val_images"] == SHARD_VAL
    assert test["images"] == SHARD_TEST
    assert {row["class"] for row in test["worst_classes"]} <= set(HUB_CLASSES)


def test_a_hub_test_split_without_labels_is_left_out(run_cli, tmp_path: Path) -> None:
    _hub(tmp_path, count=20)
    test = tmp_path / "h" / "data" / "test-00000-of-00001.parquet"
    write_hub_split(test, 6)
    _rewrite_column(test, "label", [-1] * 6)  # the Hub's "no label", as ImageNet's test split
    info = _info(run_cli, "hfds/h", "--data-dir", tmp_path)
    assert info["counts"] == {"train": 18, "val": 2, "test": None}


@pytest.mark.parametrize(
    ("module", "dataset", "extra"),
    [("datasets", "hfds/h", "mlkd[hf]"), ("webdataset", "wds/s", "mlkd[wds]")],
)
def test_a_missing_reader_names_its_extra(
    run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, dataset: str, extra: str
) -> None:
    _hub(tmp_path)
    write_shards(tmp_path / "s", "train", 4, 4, labels=[0, 0, 0, 0])
    _classes(tmp_path / "s", "ant\n")
    for name in [m for m in sys.modules if m == module or m.startswith(f"{module}.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import fails as when it is not installed
    _refused(run_cli, dataset, extra, data_dir=tmp_path)


def test_a_shard_header_past_its_limit_is_refused_unread(run_cli, tmp_path: Path) -> None:
    _classes(tmp_path / "s", "ant\n")
    with tarfile.open(tmp_path / "s" / "train-000000.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(_png_file(tmp_path), arcname="k" * 70_000 + ".png")  # a 70 KB pax header
    _refused(run_cli, "wds/s", "not a readable tar shard", "over 65,536", data_dir=tmp_path)


def test_shards_are_indexed_once_until_they_change(tmp_path: Path) -> None:
    write_shards(tmp_path / "s", "train", 30, 10, labels=[0, 1, 2] * 10)
    _classes(tmp_path / "s", "ant\nbee\ncat\n")
    first = load_splits("wds/s", tmp_path).train
    assert load_splits("wds/s", tmp_path).train is first  # the scan is kept
    shutil.rmtree(tmp_path / "s")
    write_shards(tmp_path / "s", "train", 20, 10, labels=[2, 1] * 10)
    _classes(tmp_path / "s", "ant\nbee\ncat\n")
    again = load_splits("wds/s", tmp_path).train
    assert len(again) == 20 and again.targets[:2] == [2, 1]


def test_hub_columns_named_otherwise_take_the_image_and_the_finest_labels(tmp_path: Path) -> None:
    import datasets  # the Hub's CIFAR-100 shape: img, fine_label (100), coarse_label (20)

    rng = np.random.default_rng(0)
    fine, coarse = [f"f{i}" for i in range(6)], ["c0", "c1"]
    labels = [i % 6 for i in range(24)]
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(names=fine),
            "coarse_label": datasets.ClassLabel(names=coarse),
        }
    )
    rows = {
        "img": [{"bytes": tiny_png(label, rng), "path": None} for label in labels],
        "fine_label": labels,
        "coarse_label": [label // 3 for label in labels],
    }
    path = tmp_path / "c" / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    splits = load_splits("hfds/c", tmp_path, val_fraction=0.25)
    assert splits.class_names == fine
    assert [splits.train.targets[i] for i in range(6)] == labels[:6]
    _colour_matches_label(splits.train)


def test_shards_named_as_timms_are_read(run_cli, tmp_path: Path) -> None:
    write_shards(tmp_path / "s", "imagenet1k-train", 12, 6)
    write_shards(tmp_path / "s", "imagenet1k-validation", 6, 6)
    _classes(tmp_path / "s", "ant\nbee\ncat\n")
    info = _info(run_cli, "wds/s", "--data-dir", tmp_path)
    assert info["counts"] == {"train": 12, "val": 6, "test": None}


def test_a_hub_file_that_is_not_parquet_is_refused(run_cli, tmp_path: Path) -> None:
    (tmp_path / "h" / "data").mkdir(parents=True)
    (tmp_path / "h" / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1 junk" * 300)
    _refused(run_cli, "hfds/h", "could not be read", "not a parquet file", data_dir=tmp_path)
