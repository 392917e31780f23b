"""The soft-label store: a teacher's outputs for numbered augmented views of every training image
(`mlkd_cli/data/views.py`), paid once and replayed by every student trained from it.

A store is a folder:
- `manifest.json`: what the store is for (dataset, split, image count, class names, image size,
  image config and pipeline, teacher identity, views per image, top-k, seed) and how it is cut
  into shards (`shard_size` images each, in training-split order);
- per shard `shard-NNNNN.logits.npy` (float16, images x views x k: the teacher's k largest
  logits), `shard-NNNNN.classes.npy` (their classes: int16, or int32 past 32,767 classes; -1
  for an unreadable image) and `shard-NNNNN.json`, its record: the shard's number and training
  positions [start, stop), the SHA-256 of the manifest's identity (every manifest field) and the
  two arrays' SHA-256. The record is written last and atomically: a shard without it is not done.
Logits rather than probabilities, so the distillation temperature stays the student's choice;
with k equal to the class count they are the whole output. Arrays are read memory-mapped.

What a store cannot say wrongly, checked before a run uses it (one line each, naming the shard
and the fix): a shard whose files were swapped with another's or copied from another store (its
record names other positions or another manifest), a manifest edited after labelling (a `seed`
edited 0 -> 7 would replay views other than the labelled ones), a damaged array, a non-finite
logit, a class index outside [-1, classes), and manifest numbers out of range. Shapes are read
from the arrays' headers and matched against the manifest before anything is loaded, and every
scan goes piece by piece, so memory stays bounded whatever the files say. The checksums guard
against accidents and careless edits, not against someone who rewrites the records to match:
they carry no secret.

Format 2 (these records) replaced format 1, whose shard files held only the arrays' checksums.
A format-1 store is refused with a line saying to label it again, not read: nothing in it says
which positions a shard holds or under which manifest it was labelled, so a swapped shard or an
edited seed cannot be told from a sound one, and reading it would keep open exactly the gap
format 2 closes. Labelling again costs one teacher pass; training from wrong targets costs a run
and gives no sign.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlkd_cli.core.atomic import atomic_write, atomic_write_text
from mlkd_cli.core.constants import MAX_CLASSES, MAX_IMG_SIZE
from mlkd_cli.core.errors import UserError
from mlkd_cli.core.safeload import clip
from mlkd_cli.data.transforms import ImageConfig

# Format 2: shard records bind positions and manifest (format 1 is refused: see above).
STORE_FORMAT = "mlkd-soft-labels/2"
OLD_FORMATS = ("mlkd-soft-labels/1",)
MANIFEST = "manifest.json"
# Bounds on what a manifest or a shard record may claim (memory and time stay bounded).
MAX_MANIFEST_BYTES = 64 << 20  # a manifest of a million class names is ~20 MB
MAX_RECORD_BYTES = 64 << 10
MAX_SHARDS = 1_000_000
MAX_VIEWS = 1_000
MAX_DEPTH = 32  # lists and objects in a manifest's recipe/teacher/extra (mlkd writes 2)
SCAN_ROWS = 1 << 20  # array entries (images x views x k) checked at a time
# What a run must share with the store it trains from; named in the refusal when one differs
# ("recipe": the stored key of the image config, see `StoreManifest`).
MATCHED = ("dataset", "split", "images", "classes", "img_size", "recipe")


@dataclass(frozen=True)
class StoreManifest:
    """What a soft-label store holds and for what."""

    dataset: str
    split: str
    images: int
    classes: tuple[str, ...]
    img_size: int
    # The image config (`ImageConfig`) and pipeline the views were drawn with. Stored under the
    # key "recipe", the name every store so far was written with: kept so they still open.
    recipe: dict[str, Any]
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


def manifest_difference(found: StoreManifest, wanted: StoreManifest) -> str | None:
    """The first setting in which two manifests differ, as "key found, not wanted" (None: the
    same store). Compared as written, so a tuple and the list it is read back as agree."""
    a, b = _recorded(asdict(found)), _recorded(asdict(wanted))
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key} {_show(a.get(key))}, not {_show(b.get(key))}"
    return None


def store_image_config(image_config: ImageConfig, pipeline: str, augment: bool) -> dict[str, Any]:
    """The augmentation a store's views were drawn with, as its manifest records it under the key
    "recipe" (and as a distillation run's must match).

    The device pipeline's unaugmented view is marked with how it resizes: it became PIL's
    antialiased resize (it was grid_sample's), so a store labelled on the older views is told
    apart instead of replayed on images its teacher never saw.
    """
    recipe = {**asdict(image_config), "pipeline": pipeline, "augment": augment}
    if pipeline == "device" and not augment:
        recipe["view"] = "antialiased resize"
    return recipe


def _shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB pieces; a file unchanged since it was last
    hashed in this process (same size and modification time) is not read again (a study plans
    every arm against the same teachers)."""
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
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
            f"{clip(folder)} holds a soft-label store made with other settings ({difference}); "
            "choose another --output or delete it"
        )


def class_index_dtype(num_classes: int) -> type[np.signedinteger]:
    """The narrowest signed type a store's class indices fit (-1 marks an unreadable image)."""
    return np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32


def manifest_digest(manifest: StoreManifest) -> str:
    """The SHA-256 of a manifest's identity: every field, as its canonical JSON (so a file
    re-indented by hand keeps it, and any edited value changes it)."""
    return hashlib.sha256(manifest.to_json().encode()).hexdigest()


def write_shard(folder: Path, manifest: StoreManifest, shard: int, logits: np.ndarray,
                classes: np.ndarray) -> None:  # fmt: skip
    """Write one shard's arrays, then its record (the mark that it is done): the shard's
    number, positions and manifest digest, and the arrays' SHA-256."""
    name = _shard_name(shard)
    logits_path, classes_path = folder / f"{name}.logits.npy", folder / f"{name}.classes.npy"
    index_type = class_index_dtype(len(manifest.classes))
    _save_npy(np.ascontiguousarray(logits, dtype=np.float16), logits_path)
    _save_npy(np.ascontiguousarray(classes, dtype=index_type), classes_path)
    start, stop = manifest.shard_range(shard)
    record = {
        "shard": shard,
        "start": start,
        "stop": stop,
        "manifest": manifest_digest(manifest),
        "logits": file_sha256(logits_path),
        "classes": file_sha256(classes_path),
    }
    atomic_write_text(folder / f"{name}.json", json.dumps(record) + "\n")


def done_shards(folder: Path, manifest: StoreManifest) -> set[int]:
    """The shards whose checksum file is written (not verified: `open_store` does that)."""
    return {s for s in range(manifest.shard_count) if (folder / f"{_shard_name(s)}.json").is_file()}


def read_manifest(folder: Path) -> StoreManifest:
    """The store's manifest, checked (types, ranges, format), or a UserError saying what is
    wrong with it and to label the store again."""
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{clip(folder)} is not a soft-label store (no {MANIFEST}); make one with mlkd "
            "teacher label"
        )
    relabel = "label the store again (mlkd teacher label)"
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise UserError(
                f"{clip(path)} is larger than {MAX_MANIFEST_BYTES >> 20} MiB, not a manifest "
                f"mlkd writes: {relabel}"
            )
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise TypeError("not a JSON object")
        found = record.get("format")
        if found in OLD_FORMATS:
            raise UserError(
                f"{clip(folder)} is a store of format {found}, whose shards do not record their "
                f"positions and manifest, so it cannot be checked: {relabel} into a new folder, "
                "or delete this one"
            )
        if found != STORE_FORMAT:
            raise UserError(
                f"{clip(folder)} is a store of format {clip(found)}, not {STORE_FORMAT}: {relabel}"
            )
        record["classes"] = tuple(record["classes"])
        manifest = StoreManifest(**record)
    except (ValueError, KeyError, TypeError, RecursionError, OSError) as exc:
        raise UserError(f"{clip(path)} is damaged ({type(exc).__name__}): {relabel}") from None
    _check_manifest(manifest, path, relabel)
    return manifest


def _depth(value: Any) -> int:
    """How deeply JSON lists and objects nest in `value` (walked without recursion)."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        item, level = todo.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            todo.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            todo.extend((v, level + 1) for v in item)
    return deepest


def _check_manifest(manifest: StoreManifest, path: Path, relabel: str) -> None:
    """Refuse a manifest whose fields have the wrong types or numbers out of range."""
    texts = {"dataset": manifest.dataset, "split": manifest.split}
    for key, value in texts.items():
        if not isinstance(value, str):
            raise UserError(f"{clip(path)} records {key} {clip(value)}, not a name: {relabel}")
    for key in ("recipe", "teacher", "extra"):  # "recipe": the image config's stored key
        if not isinstance(getattr(manifest, key), dict):
            raise UserError(f"{clip(path)} records {key} that is not a JSON object: {relabel}")
        if _depth(getattr(manifest, key)) > MAX_DEPTH:
            raise UserError(
                f"{clip(path)} records {key} nested deeper than {MAX_DEPTH} levels: {relabel}"
            )
    if not 1 <= len(manifest.classes) <= MAX_CLASSES or not all(
        isinstance(c, str) for c in manifest.classes
    ):
        raise UserError(f"{clip(path)} records classes that are not a list of names: {relabel}")
    bounds = {
        "images": (1, np.iinfo(np.int64).max),
        "img_size": (1, MAX_IMG_SIZE),
        "views": (1, MAX_VIEWS),
        "top_k": (1, len(manifest.classes)),
        "seed": (0, np.iinfo(np.uint64).max),
        "shard_size": (1, np.iinfo(np.int64).max),
    }
    for key, (low, high) in bounds.items():
        value = getattr(manifest, key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            span = (
                f"of at least {low}" if high == np.iinfo(np.int64).max else f"from {low} to {high}"
            )
            raise UserError(
                f"{clip(path)} records {key} {clip(value)}, not a whole number {span}: {relabel}"
            )
    if manifest.shard_count > MAX_SHARDS:
        raise UserError(
            f"{clip(path)} cuts {manifest.images} images into {manifest.shard_count} shards, "
            f"more than {MAX_SHARDS:,}: {relabel} with a larger --shard-size"
        )


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
                f"{clip(folder)} was labelled for {key} {_show(getattr(manifest, key))}, and this "
                f"run has {key} {_show(expected[key])}: label a store for this run (mlkd teacher "
                "label) or pass the store made for it"
            )
    missing = sorted(set(range(manifest.shard_count)) - done_shards(folder, manifest))
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise UserError(
            f"{clip(folder)} is incomplete: {len(missing)} of {manifest.shard_count} shards "
            f"missing ({shown}); finish it by running the same mlkd teacher label command again"
        )
    for shard in range(manifest.shard_count):
        _check_shard(folder, manifest, shard)
    return SoftLabelStore(folder, manifest)


def _check_shard(folder: Path, manifest: StoreManifest, shard: int) -> None:
    """Refuse shard `shard` unless its record is this manifest's and names its positions, its
    arrays have the manifest's shape and types and their checksums, its logits are finite and
    its classes in [-1, classes), none twice in a view."""
    name = _shard_name(shard)
    where, fix = _where(folder, shard), _fix(folder, shard)
    try:
        record = _read_record(folder, manifest, shard)
        arrays = _mapped_arrays(folder, manifest, shard, where, fix)
        for part in ("logits", "classes"):
            if file_sha256(folder / f"{name}.{part}.npy") != record[part]:
                raise UserError(f"{where} is damaged ({part} checksum differs): {fix}")
        _check_values(*arrays, manifest, shard, where, fix)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise UserError(f"{where} is damaged ({type(exc).__name__}): {fix}") from None


def check_records(folder: Path, manifest: StoreManifest) -> None:
    """Refuse, before a labelling resumes, a done shard whose record is not this manifest's or
    names other positions (the arrays are checked when a run opens the store)."""
    for shard in sorted(done_shards(folder, manifest)):
        try:
            _read_record(folder, manifest, shard)
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise UserError(
                f"{_where(folder, shard)} is damaged ({type(exc).__name__}): {_fix(folder, shard)}"
            ) from None


def _where(folder: Path, shard: int) -> str:
    return f"{clip(folder)} shard {shard}"


def _fix(folder: Path, shard: int) -> str:
    name = clip(folder / _shard_name(shard))
    return f"delete {name}.* and run the same mlkd teacher label command to relabel it"


def _read_record(folder: Path, manifest: StoreManifest, shard: int) -> dict[str, Any]:
    """The shard's record, checked to name this shard, its positions and this manifest
    (OSError/ValueError/KeyError/TypeError when it is unreadable)."""
    path = folder / f"{_shard_name(shard)}.json"
    if path.stat().st_size > MAX_RECORD_BYTES:
        raise ValueError("record too large")
    record = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(record, dict):
        raise TypeError("not a JSON object")
    where, fix = _where(folder, shard), _fix(folder, shard)
    start, stop = manifest.shard_range(shard)
    held = (record["shard"], record["start"], record["stop"])
    if held != (shard, start, stop):
        raise UserError(
            f"{where} (positions {start}:{stop}) holds shard {clip(held[0])}'s labels "
            f"(positions {clip(held[1])}:{clip(held[2])}; files swapped or renamed?): {fix}"
        )
    if record["manifest"] != manifest_digest(manifest):
        raise UserError(
            f"{where} was labelled under another {MANIFEST} (the manifest was edited after "
            f"labelling, or the shard comes from another store): restore the manifest, or {fix}"
        )
    return record


def _mapped_arrays(
    folder: Path, manifest: StoreManifest, shard: int, where: str, fix: str
) -> tuple[np.ndarray, np.ndarray]:
    """The shard's two arrays memory-mapped, their shapes and types matched to the manifest
    (read from the headers: nothing is allocated for a size the files claim)."""
    name = _shard_name(shard)
    start, stop = manifest.shard_range(shard)
    shape = (stop - start, manifest.views, manifest.top_k)
    wanted = {
        "logits": np.dtype(np.float16),
        "classes": np.dtype(class_index_dtype(len(manifest.classes))),
    }
    arrays = []
    for part, dtype in wanted.items():
        array = np.load(folder / f"{name}.{part}.npy", mmap_mode="r", allow_pickle=False)
        if array.shape != shape:
            raise UserError(
                f"{where} holds {part} of shape {clip(array.shape)}, not {shape}: {fix}"
            )
        if array.dtype != dtype:
            raise UserError(f"{where} holds {part} of type {array.dtype}, not {dtype}: {fix}")
        arrays.append(array)
    return arrays[0], arrays[1]


def _check_values(
    logits: np.ndarray,
    classes: np.ndarray,
    manifest: StoreManifest,
    shard: int,
    where: str,
    fix: str,
) -> None:
    """Every logit finite and every class index in [-1, classes) and at most once in a view's
    top k (a class stored twice would be scattered over another's logit), scanned piece by
    piece."""
    num_classes, start = len(manifest.classes), manifest.shard_range(shard)[0]
    rows = max(1, SCAN_ROWS // max(1, logits.shape[1] * logits.shape[2]))
    for first in range(0, len(logits), rows):
        part = np.asarray(logits[first : first + rows])
        if not np.isfinite(part).all():
            bad = start + first + int(np.argwhere(~np.isfinite(part))[0][0])
            raise UserError(
                f"{where} holds a non-finite logit (the image at training position {bad}): "
                f"{fix} with a teacher whose outputs are finite"
            )
        indices = np.asarray(classes[first : first + rows])
        if indices.size and (indices.min() < -1 or indices.max() >= num_classes):
            wrong = indices[(indices < -1) | (indices >= num_classes)].flat[0]
            raise UserError(
                f"{where} holds class index {int(wrong)}, outside 0 to {num_classes - 1} "
                f"(-1: an unreadable image): {fix}"
            )
        ranked = np.sort(indices, axis=-1)
        twice = (ranked[..., 1:] == ranked[..., :-1]) & (ranked[..., 1:] >= 0)
        if twice.any():
            raise UserError(
                f"{where} holds class {int(ranked[..., 1:][twice][0])} twice in one view's top "
                f"{manifest.top_k}: {fix}"
            )


def _recorded(value: Any) -> Any:
    """A value as a manifest file holds it (a JSON round trip: tuples become lists)."""
    return json.loads(json.dumps(value))


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)) and len(value) > 4:
        return f"[{len(value)} entries]"
    return clip(json.dumps(value) if isinstance(value, dict) else value)


def shards_of_rank(manifest: StoreManifest, rank: int, world_size: int) -> Iterable[int]:
    """The shards rank `rank` of `world_size` labels: rank, rank + W, ..."""
    return range(rank, manifest.shard_count, world_size)
