"""The soft-label store: a teacher's outputs for numbered augmented views of every training image
(`mlkd_cli/data/views.py`), paid once and replayed by every student trained from it.

A store is a folder:
- `manifest.json`: what the store is for (dataset, split, image count, class names, image size,
  augmentation recipe and pipeline, teacher identity, views per image, top-k, seed) and how it is
  cut into shards (`shard_size` images each, in training-split order);
- per shard `shard-NNNNN.logits.npy` (float16, images x views x k: the teacher's k largest
  logits), `shard-NNNNN.classes.npy` (their classes: int16, or int32 past 32,767 classes; -1
  for an unreadable image) and `shard-NNNNN.json` (the two
  arrays' SHA-256), written last and atomically: a shard without it is not done.
Logits rather than probabilities, so the distillation temperature stays the student's choice;
with k equal to the class count they are the whole output. Arrays are read memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlkd_cli.core.atomic import atomic_write, atomic_write_text
from mlkd_cli.core.errors import UserError
from mlkd_cli.data.transforms import ImageRecipe

STORE_FORMAT = "mlkd-soft-labels/1"
MANIFEST = "manifest.json"
# What a run must share with the store it trains from; named in the refusal when one differs.
MATCHED = ("dataset", "split", "images", "classes", "img_size", "recipe")


@dataclass(frozen=True)
class StoreManifest:
    """What a soft-label store holds and for what."""

    dataset: str
    split: str
    images: int
    classes: tuple[str, ...]
    img_size: int
    recipe: dict[str, Any]  # the augmentation recipe and pipeline the views were drawn with
    teacher: dict[str, Any]  # architectures, checkpoint hashes, weights, temperature
    views: int
    top_k: int
    seed: int
    shard_size: int
    format: str = STORE_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shard_count(self) -> int:
        """Shards the whole store takes."""
        return -(-self.images // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """The training positions [start, stop) shard `shard` holds."""
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.images)

    def to_json(self) -> str:
        """The manifest file's text."""
        record = asdict(self)
        record["classes"] = list(self.classes)
        return json.dumps(record, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> StoreManifest:
        """A manifest read back (ValueError/KeyError/TypeError when it is not one)."""
        record = json.loads(text)
        record["classes"] = tuple(record["classes"])
        return cls(**record)


def manifest_difference(found: StoreManifest, wanted: StoreManifest) -> str | None:
    """The first setting in which two manifests differ, as "key found, not wanted" (None: the
    same store). Compared as written, so a tuple and the list it is read back as agree."""
    a, b = _recorded(asdict(found)), _recorded(asdict(wanted))
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key} {_show(a.get(key))}, not {_show(b.get(key))}"
    return None


def store_recipe(recipe: ImageRecipe, pipeline: str, augment: bool) -> dict[str, Any]:
    """The augmentation a store's views were drawn with, as its manifest records it (and as a
    distillation run's must match)."""
    return {**asdict(recipe), "pipeline": pipeline, "augment": augment}


def _shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB pieces."""
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def _save_npy(array: np.ndarray, path: Path) -> None:
    def write(handle: Any) -> None:
        np.save(handle, array, allow_pickle=False)

    atomic_write(path, write)


def start_store(folder: Path, manifest: StoreManifest) -> None:
    """Create the store folder with its manifest; an existing store must have the same one."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST
    if path.is_file():
        check_same_store(folder, manifest)
        return
    atomic_write_text(path, manifest.to_json())


def check_same_store(folder: Path, manifest: StoreManifest) -> None:
    """Refuse to add to a store at `folder` made with other settings than `manifest`."""
    difference = manifest_difference(read_manifest(folder), manifest)
    if difference:
        raise UserError(
            f"{folder} holds a soft-label store made with other settings ({difference}); "
            "choose another --output or delete it"
        )


def class_index_dtype(num_classes: int) -> type[np.signedinteger]:
    """The narrowest signed type a store's class indices fit (-1 marks an unreadable image)."""
    return np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32


def write_shard(
    folder: Path, shard: int, logits: np.ndarray, classes: np.ndarray, num_classes: int
) -> None:
    """Write one shard's arrays, then its checksum file (the mark that it is done)."""
    name = _shard_name(shard)
    logits_path, classes_path = folder / f"{name}.logits.npy", folder / f"{name}.classes.npy"
    _save_npy(np.ascontiguousarray(logits, dtype=np.float16), logits_path)
    _save_npy(np.ascontiguousarray(classes, dtype=class_index_dtype(num_classes)), classes_path)
    sums = {"logits": file_sha256(logits_path), "classes": file_sha256(classes_path)}
    atomic_write_text(folder / f"{name}.json", json.dumps(sums) + "\n")


def done_shards(folder: Path, manifest: StoreManifest) -> set[int]:
    """The shards whose checksum file is written (not verified: `open_store` does that)."""
    return {s for s in range(manifest.shard_count) if (folder / f"{_shard_name(s)}.json").is_file()}


def read_manifest(folder: Path) -> StoreManifest:
    """The store's manifest, or a UserError saying the folder is not a store."""
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{folder} is not a soft-label store (no {MANIFEST}); make one with mlkd teacher label"
        )
    try:
        manifest = StoreManifest.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"{path} is damaged ({type(exc).__name__}); label the store again"
        ) from None
    if manifest.format != STORE_FORMAT:
        raise UserError(f"{folder} is a store of format {manifest.format}, not {STORE_FORMAT}")
    return manifest


class SoftLabelStore:
    """A complete, checked store, its shards memory-mapped."""

    def __init__(self, folder: Path, manifest: StoreManifest) -> None:
        self.folder, self.manifest = folder, manifest
        self.logits: list[np.ndarray] = []
        self.classes: list[np.ndarray] = []
        for shard in range(manifest.shard_count):
            name = _shard_name(shard)
            self.logits.append(np.load(folder / f"{name}.logits.npy", mmap_mode="r"))
            self.classes.append(np.load(folder / f"{name}.classes.npy", mmap_mode="r"))

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole store in memory: top-k logits (images, views, k) as float16 and their
        classes as stored (int16 or int32), for lookups on the training device without the
        host."""
        logits = np.concatenate([np.asarray(a) for a in self.logits])
        classes = np.concatenate([np.asarray(a) for a in self.classes])
        return torch.from_numpy(logits), torch.from_numpy(classes)


def open_store(folder: Path, expected: dict[str, Any]) -> SoftLabelStore:
    """The store at `folder`, refused with one line when it does not fit the run (`expected`:
    MATCHED keys with the run's values), is incomplete or has a damaged shard."""
    manifest = read_manifest(folder)
    for key in MATCHED:
        if key in expected and _recorded(getattr(manifest, key)) != _recorded(expected[key]):
            raise UserError(
                f"{folder} was labelled for {key} {_show(getattr(manifest, key))}, and this run "
                f"has {key} {_show(expected[key])}: label a store for this run (mlkd teacher "
                "label) or pass the store made for it"
            )
    missing = sorted(set(range(manifest.shard_count)) - done_shards(folder, manifest))
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise UserError(
            f"{folder} is incomplete: {len(missing)} of {manifest.shard_count} shards missing "
            f"({shown}); finish it by running the same mlkd teacher label command again"
        )
    for shard in range(manifest.shard_count):
        _check_shard(folder, manifest, shard)
    return SoftLabelStore(folder, manifest)


def _check_shard(folder: Path, manifest: StoreManifest, shard: int) -> None:
    name = _shard_name(shard)
    fix = f"delete {folder / name}.* and run the same mlkd teacher label command to relabel it"
    try:
        sums = json.loads((folder / f"{name}.json").read_text())
        for part in ("logits", "classes"):
            if file_sha256(folder / f"{name}.{part}.npy") != sums[part]:
                raise UserError(
                    f"{folder} shard {shard} is damaged ({part} checksum differs): {fix}"
                )
        start, stop = manifest.shard_range(shard)
        shape = (stop - start, manifest.views, manifest.top_k)
        for part in ("logits", "classes"):
            found = np.load(folder / f"{name}.{part}.npy", mmap_mode="r").shape
            if found != shape:
                raise UserError(f"{folder} shard {shard} holds {found}, not {shape}: {fix}")
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"{folder} shard {shard} is damaged ({type(exc).__name__}): {fix}"
        ) from None


def _recorded(value: Any) -> Any:
    """A value as a manifest file holds it (a JSON round trip: tuples become lists)."""
    return json.loads(json.dumps(value))


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)) and len(value) > 4:
        return f"[{len(value)} entries]"
    return json.dumps(value) if isinstance(value, dict) else str(value)


def shards_of_rank(manifest: StoreManifest, rank: int, world_size: int) -> Iterable[int]:
    """The shards rank `rank` of `world_size` labels: rank, rank + W, ..."""
    return range(rank, manifest.shard_count, world_size)
