"""The soft-label store's format: written shard by shard, read back exactly, and refused with one
line when it does not fit the run, is incomplete or damaged."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mlkd_cli.core.errors import UserError
from mlkd_cli.data.softlabels import (
    MANIFEST,
    StoreManifest,
    class_index_dtype,
    done_shards,
    open_store,
    shards_of_rank,
    start_store,
    write_shard,
)

RECIPE = {"pipeline": "cpu", "crop_scale": [0.5, 1.0], "hflip": 0.0, "color_jitter": 0.0}
MANIFEST_OF = StoreManifest(
    dataset="digits",
    split="train",
    images=2_500,  # three shards of 1,000, the last one short
    classes=tuple(str(c) for c in range(10)),
    img_size=32,
    recipe=RECIPE,
    teacher={"archs": ["resnet10t"], "sha256": ["ab12"], "weights": [1.0], "temperature": 1.0},
    views=4,
    top_k=5,
    seed=11,
    shard_size=1_000,
)
EXPECTED = {
    "dataset": "digits",
    "split": "train",
    "images": 2_500,
    "classes": [str(c) for c in range(10)],
    "img_size": 32,
    "recipe": RECIPE,
}


def _arrays(manifest: StoreManifest, shard: int) -> tuple[np.ndarray, np.ndarray]:
    start, stop = manifest.shard_range(shard)
    rng = np.random.default_rng(shard)
    logits = rng.normal(size=(stop - start, manifest.views, manifest.top_k)).astype(np.float16)
    classes = rng.integers(0, 10, size=logits.shape).astype(np.int32)
    return logits, classes


def _store(folder: Path, shards=None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    start_store(folder, MANIFEST_OF)
    written = {}
    for shard in range(MANIFEST_OF.shard_count) if shards is None else shards:
        written[shard] = _arrays(MANIFEST_OF, shard)
        write_shard(folder, shard, *written[shard], num_classes=10)
    return written


def test_what_is_written_reads_back_view_by_view(tmp_path: Path) -> None:
    written = _store(tmp_path / "store")
    store = open_store(tmp_path / "store", EXPECTED)
    positions = torch.tensor([0, 999, 1000, 2499, 1500])
    views = torch.tensor([0, 3, 1, 2, 3])
    all_logits, all_classes = store.tables()
    # Class indices in int16 (a third of the store) below 32,768 classes, int32 past them.
    assert all_logits.dtype == torch.float16 and all_classes.dtype == torch.int16
    assert class_index_dtype(32_767) is np.int16 and class_index_dtype(32_768) is np.int32
    assert all_logits.shape == all_classes.shape == (2_500, 4, 5)
    logits, classes = all_logits[positions, views], all_classes[positions, views]
    for j, (p, v) in enumerate(zip(positions.tolist(), views.tolist(), strict=True)):
        shard, row = divmod(p, 1_000)
        assert np.array_equal(logits[j].numpy(), written[shard][0][row, v])
        assert np.array_equal(classes[j].numpy(), written[shard][1][row, v])
    assert [list(shards_of_rank(MANIFEST_OF, r, 2)) for r in (0, 1)] == [[0, 2], [1]]


def test_an_incomplete_store_names_its_missing_shards_and_how_to_finish(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    _store(folder, shards=[1])
    assert done_shards(folder, MANIFEST_OF) == {1}
    with pytest.raises(UserError, match=r"2 of 3 shards missing \(0, 2\); finish it by running"):
        open_store(folder, EXPECTED)
    # Resuming the labelling: the manifest is kept, the missing shards written.
    _store(folder, shards=[0, 2])
    assert open_store(folder, EXPECTED).manifest == MANIFEST_OF


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [
        ("dataset", "cifar-10", "labelled for dataset digits, and this run has dataset cifar-10"),
        ("img_size", 64, "img_size 32, and this run has img_size 64"),
        ("images", 2_400, "images 2500"),
        ("classes", [str(c) for c in range(9)], "classes [10 entries]"),
        ("recipe", {**RECIPE, "hflip": 0.5}, "labelled for recipe"),
    ],
)
def test_a_store_for_another_run_is_refused_naming_what_differs(
    tmp_path: Path, key: str, value: object, said: str
) -> None:
    _store(tmp_path / "store")
    with pytest.raises(UserError, match="mlkd teacher label") as refused:
        open_store(tmp_path / "store", {**EXPECTED, key: value})
    assert said in str(refused.value) and "\n" not in str(refused.value)


def test_a_damaged_shard_is_refused_naming_it_and_the_fix(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    _store(folder)
    path = folder / "shard-00001.logits.npy"
    original = path.read_bytes()
    content = bytearray(original)
    content[-3] ^= 0xFF  # one flipped byte in the data
    path.write_bytes(bytes(content))
    with pytest.raises(UserError, match=r"shard 1 is damaged \(logits checksum differs\): delete"):
        open_store(folder, EXPECTED)
    path.write_bytes(original)
    (folder / "shard-00002.classes.npy").unlink()  # an array lost, its checksum file kept
    with pytest.raises(UserError, match=r"shard 2 is damaged \(FileNotFoundError\)"):
        open_store(folder, EXPECTED)


def test_not_a_store_a_damaged_manifest_and_other_settings_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is not a soft-label store"):
        open_store(tmp_path, EXPECTED)
    _store(tmp_path / "store", shards=[])
    with pytest.raises(UserError, match="made with other settings"):
        start_store(tmp_path / "store", replace(MANIFEST_OF, views=8))
    (tmp_path / "store" / MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match="is damaged"):
        open_store(tmp_path / "store", EXPECTED)
