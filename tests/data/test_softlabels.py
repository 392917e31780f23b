"""The soft-label store's format: written shard by shard, read back exactly, and refused with one
line when it does not fit the run, is incomplete or damaged."""

from __future__ import annotations

import json
import tracemalloc
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

IMAGE_CONFIG = {"pipeline": "cpu", "crop_scale": [0.5, 1.0], "hflip": 0.0, "color_jitter": 0.0}
MANIFEST_OF = StoreManifest(
    dataset="digits",
    split="train",
    images=2_500,  # three shards of 1,000, the last one short
    classes=tuple(str(c) for c in range(10)),
    img_size=32,
    recipe=IMAGE_CONFIG,
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
    "recipe": IMAGE_CONFIG,
}


def _arrays(manifest: StoreManifest, shard: int) -> tuple[np.ndarray, np.ndarray]:
    start, stop = manifest.shard_range(shard)
    rng = np.random.default_rng(shard)
    logits = rng.normal(size=(stop - start, manifest.views, manifest.top_k)).astype(np.float16)
    # Each view's top k: k different classes of the 10.
    ranks = rng.random(size=(*logits.shape[:2], 10)).argsort(axis=-1)
    classes = ranks[..., : manifest.top_k].astype(np.int32)
    return logits, classes


def _store(folder: Path, shards=None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    start_store(folder, MANIFEST_OF)
    written = {}
    for shard in range(MANIFEST_OF.shard_count) if shards is None else shards:
        written[shard] = _arrays(MANIFEST_OF, shard)
        write_shard(folder, MANIFEST_OF, shard, *written[shard])
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
        ("recipe", {**IMAGE_CONFIG, "hflip": 0.5}, "labelled for recipe"),
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


def _edit_manifest(folder: Path, **changes: object) -> None:
    record = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**record, **changes}, indent=2))


def _swap(folder: Path, a: int, b: int) -> None:
    """Swap every file of shards a and b, as a careless copy or rename would."""
    for suffix in (".logits.npy", ".classes.npy", ".json"):
        one, two = folder / f"shard-{a:05d}{suffix}", folder / f"shard-{b:05d}{suffix}"
        held = one.read_bytes()
        one.write_bytes(two.read_bytes())
        two.write_bytes(held)


def test_swapped_shards_and_an_edited_seed_are_refused_naming_the_shard(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    manifest = replace(MANIFEST_OF, images=2_000)  # two whole shards of the same shape
    start_store(folder, manifest)
    for shard in range(2):
        write_shard(folder, manifest, shard, *_arrays(manifest, shard))
    expected = {**EXPECTED, "images": 2_000}
    assert open_store(folder, expected).manifest == manifest
    _swap(folder, 0, 1)
    with pytest.raises(UserError) as swapped:
        open_store(folder, expected)
    said = str(swapped.value)
    assert "shard 0 (positions 0:1000) holds shard 1's labels (positions 1000:2000" in said
    assert "relabel it" in said and "\n" not in said
    _swap(folder, 0, 1)
    # The replayed views follow the seed: edited, they would not be the labelled ones.
    _edit_manifest(folder, seed=7)
    with pytest.raises(UserError, match=r"shard 0 was labelled under another manifest.json"):
        open_store(folder, expected)
    _edit_manifest(folder, seed=11)  # restored: sound again (re-indented: same identity)
    assert open_store(folder, expected).manifest == manifest


def test_a_store_of_the_previous_format_is_refused_saying_relabel(tmp_path: Path) -> None:
    _store(tmp_path / "store")
    _edit_manifest(tmp_path / "store", format="mlkd-soft-labels/1")
    with pytest.raises(UserError, match="cannot be checked: label the store again"):
        open_store(tmp_path / "store", EXPECTED)


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        (np.nan, "holds a non-finite logit (the image at training position 1007)"),
        (np.inf, "holds a non-finite logit (the image at training position 1007)"),
        (-5, "holds class index -5, outside 0 to 9 (-1: an unreadable image)"),
        (30_000, "holds class index 30000, outside 0 to 9"),
        ("twice", "twice in one view's top 5"),
    ],
)
def test_non_finite_logits_and_class_indices_out_of_range_are_refused(
    tmp_path: Path, bad: float | str, said: str
) -> None:
    """Written with valid checksums (an older labeller, or a hand-made store): still refused."""
    folder = tmp_path / "store"
    start_store(folder, MANIFEST_OF)
    for shard in range(MANIFEST_OF.shard_count):
        logits, classes = _arrays(MANIFEST_OF, shard)
        if shard == 1 and bad == "twice":
            classes[7, 2, 3] = classes[7, 2, 0]
        elif shard == 1:
            (logits if isinstance(bad, float) else classes)[7, 2, 3] = bad
        write_shard(folder, MANIFEST_OF, shard, logits, classes)
    with pytest.raises(UserError) as refused:
        open_store(folder, EXPECTED)
    line = str(refused.value)
    assert "shard 1 holds" in line and said in line and "\n" not in line


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"shard_size": 0}, "records shard_size 0, not a whole number of at least 1"),
        ({"images": -3}, "records images -3, not a whole number of at least 1"),
        ({"views": 10**9}, "records views 1000000000, not a whole number from 1 to 1000"),
        ({"top_k": 11}, "records top_k 11, not a whole number from 1 to 10"),
        ({"top_k": "5"}, "records top_k 5, not a whole number"),
        ({"seed": -1}, "records seed -1"),
        ({"seed": True}, "records seed True"),
        ({"img_size": 1.5}, "records img_size 1.5"),
        ({"classes": []}, "records classes that are not a list of names"),
        ({"dataset": "x" * 5_000}, "was labelled for dataset xxx"),
        ({"images": 10**12, "shard_size": 1}, "into 1000000000000 shards, more than 1,000,000"),
        ({"teacher": [1]}, "records teacher that is not a JSON object"),
        ({"recipe": json.loads('{"a": ' * 900 + "1" + "}" * 900)}, "nested deeper than 32"),
        ({"unknown": 1}, "is damaged (TypeError): label the store again"),
    ],
)
def test_manifest_numbers_out_of_range_are_one_line(
    tmp_path: Path, changes: dict, said: str
) -> None:
    _store(tmp_path / "store", shards=[])
    _edit_manifest(tmp_path / "store", **changes)
    with pytest.raises(UserError) as refused:
        open_store(tmp_path / "store", EXPECTED)
    line = str(refused.value)
    assert said in line and "\n" not in line and len(line) < 400


def test_deep_huge_or_non_utf8_manifests_are_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    folder.mkdir()
    for content in ("[" * 100_000 + "]" * 100_000, b"\xff\xfe{}"):
        path = folder / MANIFEST
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        with pytest.raises(UserError, match="is damaged"):
            open_store(folder, EXPECTED)


def test_what_a_forged_manifest_claims_is_checked_against_the_files_before_loading(
    tmp_path: Path,
) -> None:
    """A manifest (and records made to match) claiming 10**12 images: refused from the arrays'
    headers, nothing allocated for what the files claim."""
    folder = tmp_path / "store"
    forged = replace(MANIFEST_OF, images=10**12, shard_size=10**12)
    start_store(folder, forged)
    write_shard(folder, forged, 0, *_arrays(MANIFEST_OF, 0))
    tracemalloc.start()
    try:
        with pytest.raises(UserError) as refused:
            open_store(folder, {"dataset": "digits"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "shard 0 holds logits of shape (1000, 4, 5), not (1000000000000, 4, 5)" in str(
        refused.value
    )
    assert peak < 16 << 20
    # An array of another type than the manifest's is refused the same way.
    one = replace(MANIFEST_OF, images=1_000)
    (folder / MANIFEST).write_text(one.to_json())
    write_shard(folder, one, 0, *_arrays(one, 0))
    np.save(folder / "shard-00000.logits.npy", _arrays(MANIFEST_OF, 0)[0].astype(np.float32))
    with pytest.raises(UserError, match=r"shard 0 holds logits of type float32, not float16"):
        open_store(folder, {"dataset": "digits"})
