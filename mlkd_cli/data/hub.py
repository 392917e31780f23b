"""Hugging Face datasets (`--dataset hfds/NAME`), read through the `datasets` library.

NAME is a local folder in the Hub's layout — `data/train-*.parquet` (or `.arrow`), optional
`data/validation-*`, `data/test-*` — looked for as given, then under --data-dir; anything else is
a Hub dataset name, downloaded by `datasets` into --data-dir (its cache) on first use. Each split
needs an `image` column (the Hub's image: a struct of PNG/JPEG bytes) and a `label` column (a
ClassLabel, whose names are the class names; plain integers or strings are accepted too); a split
without them uses its only Image column and its ClassLabel of the most classes. A
validation or test split labelled -1 throughout (the Hub's "no label") is left out.

`datasets` keeps the rows in memory-mapped Arrow files in its cache: only the label column is
read whole; an image's bytes are read and decoded when a loader asks for that row. The set has a
fixed order, so the validation hold-out (held out of train as for any dataset when there is no
validation split), the soft-label store and `--resume` are exact.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from mlkd_cli.core.errors import UserError
from mlkd_cli.core.safeload import clip, shown
from mlkd_cli.data.sources import RawSplits, UnreadableImage, check_class_names, decode_image

IMAGE_COLUMN, LABEL_COLUMN = "image", "label"
# mlkd's split -> the names a Hub dataset gives it, first found wins.
SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}
FORMATS = ("parquet", "arrow")
# An image cell larger than this is left out as unreadable (named in a warning), never decoded.
MAX_IMAGE_BYTES = 64 << 20
# owner/name or name, as the Hub spells dataset ids.
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


def local_folder(name: str, data_dir: Path) -> Path | None:
    """The local folder `hfds/NAME` means (one holding data/), or None for a Hub name."""
    for candidate in (Path(name).expanduser(), data_dir / name):
        if (candidate / "data").is_dir():
            return candidate
    return None


def looks_in(name: str, data_dir: Path) -> str:
    """Where `hfds/NAME` reads from."""
    folder = local_folder(name, data_dir)
    if folder is not None:
        return f"{folder}/data/{{train,validation,test}}-*.parquet (or .arrow)"
    return f"the Hub's {clip(name, 60)}, cached in {data_dir}"


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise UserError(
            "hfds/ datasets are read with Hugging Face `datasets`; pip install 'mlkd[hf]'"
        ) from None
    # Its progress bars and log lines (an unreadable file is logged, then raised) would break the
    # one-line error and the output of every command: what it raises is said once, by mlkd.
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    # huggingface_hub (a dependency of datasets) logs each retry of an unreachable Hub.
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity(hub_logging.CRITICAL)
    return datasets


def _folder_files(folder: Path) -> tuple[str, dict[str, list[str]]]:
    """The builder ("parquet" or "arrow") and each split's files in a Hub-layout folder."""
    files: dict[str, list[str]] = {}
    kinds: set[str] = set()
    for split, names in SPLIT_NAMES.items():
        for alias in names:
            found = {
                kind: sorted(str(p) for p in (folder / "data").glob(f"{alias}-*.{kind}"))
                for kind in FORMATS
            }
            chosen = [(kind, paths) for kind, paths in found.items() if paths]
            if chosen:
                kinds.update(kind for kind, _ in chosen)
                files[split] = [p for _, paths in chosen for p in paths]
                break
    if "train" not in files:
        raise UserError(
            f"no {shown(folder / 'data')}/train-*.parquet (or .arrow); an hfds/ folder holds "
            "data/train-*.parquet and optionally data/validation-*, data/test-*"
        )
    if len(kinds) > 1:
        raise UserError(f"{shown(folder / 'data')} mixes .parquet and .arrow files; keep one kind")
    return kinds.pop(), files


def _load(name: str, data_dir: Path) -> tuple[dict[str, Any], str, bool]:
    """Each split's `datasets.Dataset`, where they came from, and whether image paths are
    trusted (only in a Hub download: `datasets` wrote them into its own cache)."""
    datasets = _datasets()
    folder = local_folder(name, data_dir)
    errors: tuple[type[BaseException], ...] = (
        datasets.exceptions.DatasetGenerationError,
        datasets.exceptions.DatasetNotFoundError,
        OSError,
        ValueError,  # pyarrow's ArrowInvalid among them: a file that is not parquet/arrow
    )
    try:
        if folder is not None:
            kind, files = _folder_files(folder)
            loaded = datasets.load_dataset(kind, data_files=files, cache_dir=str(data_dir))
            return dict(loaded), str(folder), False
        if not HUB_NAME.match(name):
            raise UserError(
                f"hfds/{clip(name, 80)}: no folder holding data/ there or under {shown(data_dir)}, "
                "and not a Hub dataset name (owner/name)"
            )
        loaded = datasets.load_dataset(name, cache_dir=str(data_dir))
    except errors as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"hfds/{clip(name, 60)} could not be read ({clip(reason, 100)}); check the name, "
            "the network or the files"
        ) from exc
    by_split = {}
    for split, aliases in SPLIT_NAMES.items():
        found = [alias for alias in aliases if alias in loaded]
        if found:
            by_split[split] = loaded[found[0]]
    if "train" not in by_split:
        raise UserError(f"the Hub's {clip(name, 60)} has no train split ({', '.join(loaded)})")
    return by_split, f"the Hub's {clip(name, 60)}", True


def _class_names(table: Any, origin: str, splits: dict[str, Any]) -> list[str] | None:
    """The ClassLabel's names; None where the label is a plain value (names come from it)."""
    feature = table.features[LABEL_COLUMN]
    names = getattr(feature, "names", None)
    for split, other in splits.items():
        if getattr(other.features[LABEL_COLUMN], "names", None) != names:
            raise UserError(
                f"{origin}'s {split} split labels its classes differently from train; "
                "give every split the same ClassLabel"
            )
    if names is not None:
        return check_class_names([str(n) for n in names], f"{origin}'s label ClassLabel")
    dtype = getattr(feature, "dtype", None)
    if dtype is None or not (dtype.startswith("int") or dtype in ("string", "large_string")):
        raise UserError(
            f"{origin}'s label column is {clip(feature, 60)}; it must be a ClassLabel, integers "
            "or strings"
        )
    return None


def _labels(table: Any, where: str) -> np.ndarray | list[str]:
    """A split's label column: integers as an array, strings as a list; an empty cell refused."""
    column = table.data.column(LABEL_COLUMN)
    if column.null_count:
        row = next(i for i, v in enumerate(column.is_null().to_pylist()) if v)
        raise UserError(f"{where} row {row} has no label; label it or drop the row")
    if table.features[LABEL_COLUMN].dtype.startswith("int"):
        return column.to_numpy()
    return column.to_pylist()


def _unlabelled(labels: np.ndarray | list[str]) -> bool:
    """Every label is -1, the Hub's "no label"."""
    return isinstance(labels, np.ndarray) and len(labels) > 0 and bool((labels == -1).all())


def _targets(values: Any, names: list[str], where: str) -> list[int]:
    """Labels as class numbers; a value outside the class list is refused with its row."""
    if isinstance(values, np.ndarray) and values.dtype.kind == "i":
        bad = np.flatnonzero((values < 0) | (values >= len(names)))
        if len(bad):
            row = int(bad[0])
            raise UserError(
                f"{where} row {row}: label {int(values[row])} is outside the {len(names)} "
                "classes; fix the row or the ClassLabel's names"
            )
        return values.astype(np.int64).tolist()
    number = {name: i for i, name in enumerate(names)}
    targets = []
    for row, value in enumerate(values):
        if value is None or str(value) not in number:
            raise UserError(
                f"{where} row {row}: label {clip(repr(value), 40)} is not one of the "
                f"{len(names)} classes; fix the row"
            )
        targets.append(number[str(value)])
    return targets


def _plain_names(tables: dict[str, Any]) -> list[str]:
    """Class names of a plain label column: the values seen, sorted (integers as numbers)."""
    seen: set = set()
    for table in tables.values():
        column = table.data.column(LABEL_COLUMN)
        seen.update(v for v in column.unique().to_pylist() if v is not None)
    if all(isinstance(v, int) for v in seen):
        return [str(v) for v in range(max(seen) + 1)] if seen else []
    return sorted(str(v) for v in seen)


class HubImages(Dataset):
    """One split's rows; an image's bytes are read and decoded on access."""

    def __init__(self, table: Any, targets: list[int], where: str, trust_paths: bool) -> None:
        self.table = table  # the image column only, memory-mapped, undecoded
        self.targets = targets
        self.where = where
        self.trust_paths = trust_paths

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int] | UnreadableImage:
        where = f"{self.where} row {index}"
        cell = self.table[index][IMAGE_COLUMN]
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if data is None and isinstance(cell, dict) and cell.get("path") and self.trust_paths:
            image = decode_image(Path(cell["path"]), where)
        elif not isinstance(data, bytes):
            return UnreadableImage(where, "the image cell holds no bytes; store the image in it")
        elif len(data) > MAX_IMAGE_BYTES:
            return UnreadableImage(
                where, f"{len(data):,} bytes, over the limit of {MAX_IMAGE_BYTES:,}"
            )
        else:
            image = decode_image(io.BytesIO(data), where)
        return image if isinstance(image, UnreadableImage) else (image, self.targets[index])


def _image_table(table: Any, where: str) -> Any:
    """The split's image column, cast so that `datasets` hands over bytes, not decoded images."""
    datasets = _datasets()
    feature = table.features[IMAGE_COLUMN]
    table = table.select_columns([IMAGE_COLUMN])
    if isinstance(feature, datasets.Image):
        return table.cast_column(IMAGE_COLUMN, datasets.Image(decode=False))
    if isinstance(feature, dict) and "bytes" in feature:
        return table  # the Hub's image struct written without its feature metadata
    if getattr(feature, "dtype", None) in ("binary", "large_binary"):
        return table
    raise UserError(
        f"{where}'s image column is {clip(feature, 60)}; it must hold the image bytes "
        "(the Hub's Image feature)"
    )


def _standard_columns(table: Any) -> Any:
    """The split with its image and label columns named `image` and `label`: where it has no
    such column, its only Image column, and its ClassLabel column of the most classes (the
    finest labelling: `fine_label` of the Hub's CIFAR-100, not `coarse_label`)."""
    datasets = _datasets()
    features = table.features
    renames = {}
    if IMAGE_COLUMN not in features:
        images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        if len(images) == 1:
            renames[images[0]] = IMAGE_COLUMN
    if LABEL_COLUMN not in features:
        labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
        sizes = sorted((features[c].num_classes for c in labels), reverse=True)
        if labels and (len(sizes) == 1 or sizes[0] > sizes[1]):
            renames[max(labels, key=lambda c: features[c].num_classes)] = LABEL_COLUMN
    return table.rename_columns(renames) if renames else table


def load_hub_dataset(name: str, data_dir: Path) -> RawSplits:
    """Read `hfds/NAME`: its splits, class names and labels (images stay in the Arrow files)."""
    tables, origin, trust_paths = _load(name, data_dir)
    tables = {split: _standard_columns(table) for split, table in tables.items()}
    for split, table in tables.items():
        missing = [c for c in (IMAGE_COLUMN, LABEL_COLUMN) if c not in table.column_names]
        if missing:
            raise UserError(
                f"{origin} {split} split has no {' or '.join(repr(c) for c in missing)} column "
                f"(it has {clip(', '.join(table.column_names), 60)}); rename its columns"
            )
    names = _class_names(tables["train"], origin, tables)
    if names is None:
        names = check_class_names(_plain_names(tables), f"{origin}'s labels")
    sources: dict[str, HubImages] = {}
    for split, table in tables.items():
        where = f"{origin} {split}"
        labels = _labels(table, where)
        if split != "train" and _unlabelled(labels):
            continue  # the Hub's -1, "no label" (ImageNet's test split): there is nothing to score
        targets = _targets(labels, names, where)
        sources[split] = HubImages(_image_table(table, where), targets, where, trust_paths)
    return RawSplits(sources["train"], sources.get("test"), names, val=sources.get("val"))
