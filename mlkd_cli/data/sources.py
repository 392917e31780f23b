"""Readers for each dataset's on-disk format, returning untransformed (PIL image, label) sources."""

from __future__ import annotations

import csv
import gzip
import importlib.resources
import os
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, Protocol

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from mlkd_cli.core.errors import UserError
from mlkd_cli.core.safeload import clip, quote, shown

# The most pixels an image file may hold (a 45 MP camera photo fits): a small file can declare a
# huge image (a 194 KB PNG of 13000 x 13000 decodes to 1.9 GB), so the header is checked before
# decoding and a larger image is treated as unreadable: left out with a warning naming it, or
# the run stopped under --strict-data.
MAX_IMAGE_PIXELS = 50_000_000


# A dataset's class names, whatever file lists them (classes.txt, a Hub ClassLabel): a list past
# these is a mistake, and an error line quoting one stays short.
MAX_CLASSES = 100_000
MAX_CLASS_NAME_CHARS = 200
MAX_CLASS_LIST_BYTES = MAX_CLASSES * 64


def check_class_names(names: Sequence[str], origin: str) -> list[str]:
    """`names` as a dataset's class list: some, at most MAX_CLASSES, each a short line, no twice."""
    if not names:
        raise UserError(f"{origin} names no class; list one class name per line")
    if len(names) > MAX_CLASSES:
        raise UserError(f"{origin} names {len(names):,} classes, over {MAX_CLASSES:,}")
    seen: set[str] = set()
    for number, name in enumerate(names, start=1):
        if len(name) > MAX_CLASS_NAME_CHARS:
            raise UserError(
                f"{origin} class {number} is {len(name):,} characters long; "
                f"use at most {MAX_CLASS_NAME_CHARS}"
            )
        if name in seen:
            raise UserError(f"{origin} names class {clip(repr(name), 60)} twice")
        seen.add(name)
    return list(names)


def read_class_list(path: Path) -> list[str]:
    """Class names, one a line (blank lines skipped), read with the limits above."""
    with path.open("rb") as handle:
        data = handle.read(MAX_CLASS_LIST_BYTES + 1)
    if len(data) > MAX_CLASS_LIST_BYTES:
        raise UserError(
            f"{shown(path)} is over {MAX_CLASS_LIST_BYTES:,} bytes; list one short class "
            "name per line"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{shown(path)} is not UTF-8 text ({exc.reason}); save it as UTF-8"
        ) from exc
    names = [line.strip() for line in text.splitlines() if line.strip()]
    return check_class_names(names, shown(path))


class UnreadableImage(NamedTuple):
    """Stands in for an image file that could not be decoded (damaged, truncated, not an image)."""

    path: str
    reason: str
    position: int = -1  # the item's position in the dataset that asked for it


class ImageSource(Protocol):
    """A dataset of (PIL RGB image, int label) pairs with its labels known up front."""

    targets: Sequence[int]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Image.Image, int] | UnreadableImage: ...


class ArraySource(Dataset):
    """Images held in memory as a uint8 array (N, H, W, 3), as CIFAR and digits are."""

    def __init__(self, images: np.ndarray, targets: Sequence[int]) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.shape}")
        if len(images) != len(targets):
            raise ValueError("images and targets differ in length")
        self.images = images
        self.targets = [int(t) for t in targets]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), self.targets[index]


@dataclass
class RawSplits:
    """What a dataset's files hold: its training images, test images (if any), class names.

    `val` is set only where the dataset ships its own validation split (an image folder's val/).
    """

    train: ImageSource
    test: ImageSource | None
    class_names: list[str]
    val: ImageSource | None = None


# ----------------------------------------------------------------------------- CIFAR

# CIFAR's "python version" files are pickles. Unpickling can run code, so only the globals that
# numpy arrays need are let through; anything else in the file is refused.
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CIFAR_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def read_cifar_pickle(path: Path) -> dict[str, Any]:
    """Read one CIFAR batch or meta file, allowing nothing but plain data and numpy arrays."""
    try:
        with path.open("rb") as handle:
            # latin1: the official files were written by Python 2 (numpy's advice for such pickles)
            content = _ArrayOnlyUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise UserError(
            f"{path} is not a readable CIFAR batch ({exc}); delete it and re-download"
        ) from exc
    if not isinstance(content, dict):
        raise UserError(f"{path} is not a CIFAR batch (no dictionary inside); re-download it")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}


@dataclass(frozen=True)
class CifarLayout:
    """File names of one CIFAR variant, as torchvision downloads and extracts them."""

    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str


CIFAR10_LAYOUT = CifarLayout(
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
)
CIFAR100_LAYOUT = CifarLayout(
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
)


def _read_cifar_files(root: Path, files: Sequence[str], label_key: str) -> ArraySource:
    images, labels = [], []
    for name in files:
        batch = read_cifar_pickle(root / name)
        data = np.asarray(batch["data"], dtype=np.uint8)
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(int(v) for v in batch[label_key])
    return ArraySource(np.ascontiguousarray(np.concatenate(images)), labels)


def load_cifar(data_dir: Path, layout: CifarLayout, download: bool, download_fn: Any) -> RawSplits:
    """Read CIFAR-10/100 from torchvision's extracted layout under `data_dir`."""
    root = data_dir / layout.folder
    expected = [*layout.train_files, *layout.test_files, layout.meta_file]
    if download and not all((root / f).is_file() for f in expected):
        _download(download_fn, data_dir)
    missing = [f for f in expected if not (root / f).is_file()]
    if missing:
        raise UserError(
            f"CIFAR files missing in {root} ({', '.join(missing)}); "
            "pass --download, or point --data-dir at the folder holding "
            f"{layout.folder}/"
        )
    meta = read_cifar_pickle(root / layout.meta_file)
    return RawSplits(
        train=_read_cifar_files(root, layout.train_files, layout.label_key),
        test=_read_cifar_files(root, layout.test_files, layout.label_key),
        class_names=[str(n) for n in meta[layout.names_key]],
    )


def _download(download_fn: Any, data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        download_fn(data_dir)
    except (OSError, RuntimeError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"download into {data_dir} failed ({first_line}); check the network "
            "or place the files there by hand"
        ) from exc


# ----------------------------------------------------------------------------- Oxford-IIIT Pet

OXFORD_FOLDER = "oxford-iiit-pet"


class ImageFiles(Dataset):
    """Image files with labels, decoded on access."""

    def __init__(self, paths: Sequence[Path], targets: Sequence[int]) -> None:
        self.paths = list(paths)
        self.targets = [int(t) for t in targets]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int] | UnreadableImage:
        path = self.paths[index]
        image = decode_image(path, str(path))
        return image if isinstance(image, UnreadableImage) else (image, self.targets[index])


def decode_image(file: Path | BinaryIO, where: str) -> Image.Image | UnreadableImage:
    """The RGB image in `file` (a path or an open binary file), or an UnreadableImage naming
    `where` when it is damaged, not an image, or over MAX_IMAGE_PIXELS (checked from the header,
    before decoding)."""
    try:
        with warnings.catch_warnings():  # mlkd's own limit below replaces PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(file)  # reads the header only
        with image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                return UnreadableImage(
                    where,
                    f"{image.width}x{image.height} pixels, over the limit of "
                    f"{MAX_IMAGE_PIXELS:,}; shrink the image",
                )
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # PIL reports damaged files as OSError (truncated data, unidentified format) or
        # SyntaxError/ValueError (malformed headers); the loaders leave such images out.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return UnreadableImage(where, reason)


class ImageTraits(NamedTuple):
    """What a dataset's images look like, from a sample: the longest side, and whether grey."""

    side: int
    grayscale: bool


TRAIT_SAMPLE = 16  # images looked at, evenly spread over the source


def image_traits(source: ImageSource) -> ImageTraits:
    """The longest side and greyness of a sample of `source`'s images."""
    count = len(source)
    picks = sorted({int(i * count / TRAIT_SAMPLE) for i in range(min(TRAIT_SAMPLE, count))})
    if isinstance(source, ArraySource):
        sample = source.images[picks]
        grey = bool((sample == sample[..., :1]).all())
        return ImageTraits(max(sample.shape[1:3]), grey)
    side, grey = 0, True
    for index in picks:
        item = source[index]
        if isinstance(item, UnreadableImage):
            continue
        image = np.asarray(item[0])
        side = max(side, *image.shape[:2])
        grey = grey and bool((image == image[..., :1]).all())
    return ImageTraits(side, grey)


def load_oxford_pet(data_dir: Path, download: bool, download_fn: Any) -> RawSplits:
    """Read Oxford-IIIT Pet in torchvision's layout (images/ and annotations/ lists)."""
    root = data_dir / OXFORD_FOLDER
    lists = {split: root / "annotations" / f"{split}.txt" for split in ("trainval", "test")}
    if download and not all(p.is_file() for p in lists.values()):
        _download(download_fn, data_dir)
    missing = [str(p) for p in [root / "images", *lists.values()] if not p.exists()]
    if missing:
        raise UserError(
            f"Oxford-IIIT Pet files missing ({', '.join(missing)}); pass --download, or point "
            f"--data-dir at the folder holding {OXFORD_FOLDER}/"
        )
    parsed = {split: _read_pet_list(path) for split, path in lists.items()}
    # Class names come from the image names ("great_pyrenees_12" -> "Great Pyrenees"), as
    # torchvision names them; the list's class id (1-based) is authoritative for the label.
    names: dict[int, str] = {}
    for entries in parsed.values():
        for image_id, label in entries:
            breed = image_id.rsplit("_", 1)[0]
            names.setdefault(label, " ".join(part.title() for part in breed.split("_")))
    class_names = [names[i] for i in sorted(names)]
    if sorted(names) != list(range(len(names))):
        raise UserError(
            f"class ids in {root / 'annotations'} are not contiguous; re-download the dataset"
        )

    def source(entries: list[tuple[str, int]]) -> ImageFiles:
        return ImageFiles(
            [root / "images" / f"{image_id}.jpg" for image_id, _ in entries],
            [label for _, label in entries],
        )

    return RawSplits(source(parsed["trainval"]), source(parsed["test"]), class_names)


def _read_pet_list(path: Path) -> list[tuple[str, int]]:
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split()
        try:
            entries.append((fields[0], int(fields[1]) - 1))
        except (IndexError, ValueError):
            raise UserError(
                f"{path}:{number} is not '<image> <class id> ...'; re-download the dataset"
            ) from None
    return entries


# ----------------------------------------------------------------------------- image folders

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _scan_folder(folder: Path) -> tuple[list[str], list[Path], list[int]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{folder} has no class subfolders; expected {folder}/<class>/<image>")
    paths, targets = [], []
    for label, name in enumerate(classes):
        files = sorted(
            p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise UserError(
                f"class folder {folder / name} holds no images; add images or remove it"
            )
        paths.extend(files)
        targets.extend([label] * len(files))
    return classes, paths, targets


def load_image_folder(data_dir: Path) -> RawSplits:
    """Read `data_dir/train/<class>/...` with optional `val/` and `test/` of the same classes."""
    train_dir = data_dir / "train"
    if not train_dir.is_dir():
        raise UserError(
            f"no {train_dir} folder; an image folder dataset needs --data-dir with "
            "train/<class>/<image> (and optionally val/ and test/)"
        )
    classes, paths, targets = _scan_folder(train_dir)
    extra: dict[str, ImageFiles | None] = {}
    for split in ("val", "test"):
        folder = data_dir / split
        if not folder.is_dir():
            extra[split] = None
            continue
        split_classes, split_paths, split_targets = _scan_folder(folder)
        if split_classes != classes:
            raise UserError(
                f"{folder} has classes {split_classes[:5]}... but train/ has {classes[:5]}...; "
                "the split folders must hold the same class subfolders"
            )
        extra[split] = ImageFiles(split_paths, split_targets)
    return RawSplits(ImageFiles(paths, targets), extra["test"], classes, val=extra["val"])


# ----------------------------------------------------------------------------- CSV lists

CSV_COLUMNS = ("path", "label")
# Set to 1 to let CSV rows name images outside the CSV's folder (absolute or ../ paths). An
# environment variable rather than a flag: every command that reads data, and every worker
# process it starts, sees it. Off, a list handed over with the data cannot make mlkd open
# /etc/passwd or ../../secrets.
ALLOW_OUTSIDE_PATHS = "MLKD_ALLOW_OUTSIDE_PATHS"


def _check_inside(csv_path: Path, row: int, path: str) -> None:
    """A row's image path stays inside the CSV's folder (read lexically: a symlink the folder
    holds may point elsewhere), unless MLKD_ALLOW_OUTSIDE_PATHS=1."""
    if os.environ.get(ALLOW_OUTSIDE_PATHS) == "1":
        return
    normal = os.path.normpath(path)
    if os.path.isabs(normal) or normal == ".." or normal.startswith(f"..{os.sep}"):
        raise UserError(
            f"{shown(csv_path)} row {row}: image {shown(path)} lies outside "
            f"{shown(csv_path.parent)}; list paths inside it (a symlink there may point "
            f"elsewhere) or set {ALLOW_OUTSIDE_PATHS}=1"
        )


def load_csv_dataset(data_dir: Path) -> RawSplits:
    """`data_dir/train.csv` (and optionally `test.csv`): `path,label` rows, paths relative to
    the CSV, labels as class names or integers; class names from `classes.txt` if present, else
    the labels seen, sorted (integers numerically)."""
    train_csv = data_dir / "train.csv"
    if not train_csv.is_file():
        raise UserError(
            f"no {train_csv}; a csv dataset needs --data-dir holding train.csv (and optionally "
            "test.csv, classes.txt) with path,label rows"
        )
    tables = {"train": _read_csv_rows(train_csv)}
    test_csv = data_dir / "test.csv"
    if test_csv.is_file():
        tables["test"] = _read_csv_rows(test_csv)
    classes = _csv_classes(data_dir, [label for rows in tables.values() for *_, label in rows])
    index = {name: i for i, name in enumerate(classes)}
    if (data_dir / "classes.txt").is_file():  # integer labels index classes.txt
        index = {**{str(i): i for i in range(len(classes))}, **index}
    sources: dict[str, ImageFiles] = {}
    for split, rows in tables.items():
        csv_path = data_dir / f"{split}.csv"
        paths, targets = [], []
        for row, path, label in rows:
            if label not in index:
                raise UserError(
                    f"{csv_path} row {row}: label {quote(label, 40)} is not a class of "
                    f"{_classes_origin(data_dir)}; fix the row or add the class"
                )
            _check_inside(csv_path, row, path)
            image = (csv_path.parent / path).resolve()
            if not image.is_file():
                raise UserError(
                    f"{csv_path} row {row}: image {clip(path, 60)} does not exist"
                    f" ({clip(str(image), 80)})"
                )
            paths.append(image)
            targets.append(index[label])
        sources[split] = ImageFiles(paths, targets)
    return RawSplits(sources["train"], sources.get("test"), classes)


def _read_csv_rows(path: Path) -> list[tuple[int, str, str]]:
    """(row number, path, label) of each data row; the header must name path and label."""
    try:
        return _csv_rows(path)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason}); save it as UTF-8") from exc
    except csv.Error as exc:  # a NUL byte, a field past csv's size limit, a broken quote
        raise UserError(f"{path} is not a readable CSV ({clip(str(exc), 80)})") from exc


def _csv_rows(path: Path) -> list[tuple[int, str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not set(CSV_COLUMNS) <= {
            f.strip() for f in reader.fieldnames
        }:
            raise UserError(f"{path} row 1: the header must name the columns path,label")
        rows = []
        for row_number, row in enumerate(reader, start=2):
            values = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            if not values.get("path") or not values.get("label"):
                raise UserError(f"{path} row {row_number}: needs both a path and a label")
            rows.append((row_number, values["path"], values["label"]))
    if not rows:
        raise UserError(f"{path} has no rows after its header; list path,label per image")
    return rows


def _csv_classes(data_dir: Path, labels: list[str]) -> list[str]:
    listed = data_dir / "classes.txt"
    if listed.is_file():
        try:
            text = listed.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise UserError(f"{listed} is not UTF-8 text ({exc.reason}); save it as UTF-8") from exc
        names = [line.strip() for line in text.splitlines() if line.strip()]
        if not names:
            raise UserError(f"{listed} is empty; list one class name per line or remove it")
        return names
    unique = set(labels)
    if all(label.lstrip("-").isdigit() for label in unique):
        return [str(n) for n in sorted(int(label) for label in unique)]
    return sorted(unique)


def _classes_origin(data_dir: Path) -> str:
    return str(data_dir / "classes.txt") if (data_dir / "classes.txt").is_file() else "the CSVs"


# ----------------------------------------------------------------------------- digits

DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 20_260_101  # fixed forever: the digits test split must never move


def load_digits() -> RawSplits:
    """The embedded UCI optical handwritten digits (1,797 8x8 images) with a fixed test split."""
    resource = importlib.resources.files("mlkd_cli.data").joinpath("digits.csv.gz")
    with resource.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :64], table[:, 64]
    # 0..16 counts of "on" pixels in 4x4 blocks -> 0..255 grey, repeated to three channels.
    grey = np.round(pixels.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(grey[..., None], 3, axis=-1)
    train_idx, test_idx = stratified_holdout(
        labels.tolist(), DIGITS_TEST_FRACTION, DIGITS_TEST_SEED
    )
    return RawSplits(
        train=ArraySource(images[train_idx], labels[train_idx].tolist()),
        test=ArraySource(images[test_idx], labels[test_idx].tolist()),
        class_names=[str(d) for d in range(10)],
    )


def stratified_holdout(
    targets: Sequence[int], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split indices into (kept, held out), holding out `fraction` of the images, per class.

    Each class gives its share, rounded so that the total is `round(fraction * n)` (largest
    remainders first). Depends only on the labels, the fraction and the seed, so every run and
    every rank computes the same split.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(targets)
    classes = np.unique(labels)
    members = {c: np.flatnonzero(labels == c) for c in classes}
    members = {c: m[rng.permutation(len(m))] for c, m in members.items()}
    shares = {c: fraction * len(m) for c, m in members.items()}
    quota = {c: int(np.floor(v)) for c, v in shares.items()}
    spare = int(round(fraction * len(labels))) - sum(quota.values())
    by_remainder = sorted(classes, key=lambda c: (-(shares[c] - quota[c]), int(c)))
    for c in by_remainder[: max(0, spare)]:
        quota[c] += 1
    kept, held = [], []
    for c in classes:
        held.extend(members[c][: quota[c]].tolist())
        kept.extend(members[c][quota[c] :].tolist())
    return sorted(kept), sorted(held)
