"""WebDataset shards (`--dataset wds/FOLDER`): tar files whose samples are an image and its class.

FOLDER holds `train-*.tar` (and optionally `val-*.tar`, `test-*.tar`; timm's names, such as
`imagenet1k-validation-0000.tar`, are read too) and `classes.txt`, one class name a line; each
sample is an image (`.png`, `.jpg`, ...) and a `.cls` file holding its class number, grouped by key
as webdataset groups them (its own `base_plus_ext`).

The shards are indexed, not streamed: each process scans their tar headers once (the image data
is seeked over, only the small `.cls` members are read) and keeps four numbers a sample (shard,
offset, size, class); an image is read from its shard when a loader asks for it. Nothing holds
a shard in memory, the set has a fixed order, so the validation hold-out, the soft-label store
and `--resume` are exact as for any other dataset, and ranks split the samples (not the shards)
as the loaders split every dataset: any number of ranks works with any number of shards, every
rank reading the folder (a local or shared disk).
"""

from __future__ import annotations

import array
import functools
import io
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from mlkd_cli.core.errors import UserError
from mlkd_cli.core.safeload import clip, shown
from mlkd_cli.data.sources import RawSplits, UnreadableImage, decode_image, read_class_list

SPLIT_PATTERNS = {"train": "train-*.tar", "val": "val-*.tar", "test": "test-*.tar"}
# Also read: shards named as timm's ImageNet shards are (`imagenet1k-validation-0000.tar`).
_ALSO = {"train": ("*-train-*.tar",), "val": ("validation-*.tar", "*-validation-*.tar",
         "*-val-*.tar"), "test": ("*-test-*.tar",)}  # fmt: skip
CLASSES_FILE = "classes.txt"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm")
CLASS_EXTENSION = "cls"
MAX_CLS_BYTES = 32  # a class number, with room for whitespace
# An image member larger than this is left out as unreadable (named in a warning), never read.
MAX_IMAGE_BYTES = 64 << 20
MAX_SHARDS = 100_000  # a split's shards: a folder of more is a mistake, not a dataset


def folder_of(name: str, data_dir: Path) -> Path:
    """The folder `wds/NAME` means: NAME itself where it is a folder, else under --data-dir."""
    given = Path(name).expanduser()
    return given if given.is_dir() or given.is_absolute() else data_dir / name


def looks_in(name: str, data_dir: Path) -> str:
    """Where `wds/NAME` reads its shards and class names."""
    folder = folder_of(name, data_dir)
    return f"{folder}/train-*.tar (val-*, test-* optional), {folder}/{CLASSES_FILE}"


def shard_paths(folder: Path, split: str) -> list[Path]:
    """A split's shards in name order (empty when it has none)."""
    patterns = (SPLIT_PATTERNS[split], *_ALSO[split])
    paths = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    if len(paths) > MAX_SHARDS:
        raise UserError(
            f"{shown(folder)} holds {len(paths):,} {SPLIT_PATTERNS[split]} shards, over "
            f"{MAX_SHARDS:,}; write larger shards"
        )
    return paths


class ShardImages(Dataset):
    """A split's samples, indexed across its shards; each image is read from its shard on access
    (opened, seeked, read and closed: nothing is held open, so loader workers may fork)."""

    def __init__(
        self,
        shards: Sequence[Path],
        shard: Sequence[int],
        offset: Sequence[int],
        size: Sequence[int],
        targets: Sequence[int],
    ) -> None:
        self.shards = list(shards)
        self.shard, self.offset, self.size = shard, offset, size
        self.targets = list(targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int] | UnreadableImage:
        path, offset, size = self.shards[self.shard[index]], self.offset[index], self.size[index]
        where = f"{path} (sample {index}, byte {offset})"
        if size > MAX_IMAGE_BYTES:
            return UnreadableImage(
                where, f"{size:,} bytes, over the limit of {MAX_IMAGE_BYTES:,}; shrink the image"
            )
        try:
            with path.open("rb") as handle:
                handle.seek(offset)
                data = handle.read(size)
        except OSError as exc:
            return UnreadableImage(where, clip(exc, 80))
        if len(data) != size:
            return UnreadableImage(where, "the shard ends inside the image; rewrite the shard")
        image = decode_image(io.BytesIO(data), where)
        return image if isinstance(image, UnreadableImage) else (image, self.targets[index])


MAX_HEADER_BYTES = 64 << 10  # a pax or GNU long-name header: names and a few attributes
_EXTENDED_HEADERS = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


class _BoundedTarInfo(tarfile.TarInfo):
    """A member header that refuses an extended header (pax, GNU long name) over
    MAX_HEADER_BYTES: tarfile would read it whole into memory, whatever size it declares."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED_HEADERS and self.size > MAX_HEADER_BYTES:
            raise tarfile.TarError(
                f"an extended header of {self.size:,} bytes, over {MAX_HEADER_BYTES:,}"
            )
        return super()._proc_member(tarfile_)  # type: ignore[misc]


class _Index:
    """What a split's scan keeps: four numbers a sample."""

    def __init__(self) -> None:
        self.shard, self.size, self.target = array.array("l"), array.array("q"), array.array("l")
        self.offset = array.array("q")


def _key_splitter() -> Callable[[str], tuple[str | None, str | None]]:
    """webdataset's own split of a member name into (key, extensions), so that samples group
    here as they do in its readers."""
    try:
        from webdataset.tariterators import base_plus_ext
    except ImportError:
        raise UserError("wds/ shards are read with `webdataset`; pip install 'mlkd[wds]'") from None
    return base_plus_ext


def _cls_value(tar: tarfile.TarFile, member: tarfile.TarInfo, where: str, classes: int) -> int:
    if member.size > MAX_CLS_BYTES:
        raise UserError(f"{where}: its .cls holds {member.size:,} bytes, not a class number")
    handle = tar.extractfile(member)
    text = handle.read(MAX_CLS_BYTES).decode("utf-8", "replace").strip() if handle else ""
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{where}: .cls holds {clip(repr(text), 40)}, not a class number") from None
    if not 0 <= value < classes:
        raise UserError(
            f"{where}: class {value} is outside the {classes} classes of {CLASSES_FILE}; "
            "fix the sample or add the class"
        )
    return value


def _index_shard(path: Path, number: int, classes: int, index: _Index) -> None:
    """Add the samples of one shard to `index` (a sample: consecutive members sharing a key)."""
    key: str | None = None
    image: tuple[int, int] | None = None
    label: int | None = None

    def close_sample() -> None:
        if key is None:
            return
        where = f"{shown(path, 70)} sample {clip(repr(key), 40)}"
        if image is None or label is None:
            missing = "image (.png, .jpg, ...)" if image is None else ".cls class number"
            raise UserError(f"{where} has no {missing}; every sample needs an image and a .cls")
        index.shard.append(number)
        index.offset.append(image[0])
        index.size.append(image[1])
        index.target.append(label)

    split_key = _key_splitter()
    with (
        path.open("rb") as raw,
        tarfile.open(fileobj=raw, mode="r:", tarinfo=_BoundedTarInfo) as tar,
    ):
        while (member := tar.next()) is not None:
            tar.members.clear()  # the index keeps what it needs: memory stays per sample
            if not member.isfile():
                continue
            name, ext = split_key(member.name)
            if name is None or ext is None:
                continue  # a file without an extension belongs to no sample (as in webdataset)
            if name != key:
                close_sample()
                key, image, label = name, None, None
            ext = ext.lower()
            if ext in IMAGE_EXTENSIONS:
                image = (member.offset_data, member.size)
            elif ext == CLASS_EXTENSION:
                where = f"{shown(path, 70)} sample {clip(repr(name), 40)}"
                label = _cls_value(tar, member, where, classes)
        close_sample()


def index_split(paths: Sequence[Path], classes: int) -> ShardImages:
    """Index a split's shards into a source (images read on access).

    A process reads a dataset more than once (a run's plan, then its training): the index of
    shards whose names, sizes and modification times are unchanged is kept, not scanned again.
    """
    stamps = tuple((str(p), st.st_size, st.st_mtime_ns) for p in paths for st in [p.stat()])
    return _indexed(stamps, classes)


@functools.lru_cache(maxsize=8)
def _indexed(stamps: tuple[tuple[str, int, int], ...], classes: int) -> ShardImages:
    paths = [Path(name) for name, _, _ in stamps]
    index = _Index()
    for number, path in enumerate(paths):
        try:
            _index_shard(path, number, classes, index)
        except (tarfile.TarError, EOFError) as exc:
            raise UserError(
                f"{shown(path)} is not a readable tar shard ({clip(exc, 60)}); rewrite it"
            ) from exc
    return ShardImages(paths, index.shard, index.offset, index.size, index.target)


def load_shards(folder: Path) -> RawSplits:
    """Read a WebDataset folder: class names from classes.txt, each split's shards indexed."""
    if not folder.is_dir():
        raise UserError(
            f"no shard folder {shown(folder)}; --dataset wds/FOLDER needs a folder of "
            "train-*.tar shards and classes.txt (FOLDER itself, or under --data-dir)"
        )
    train_paths = shard_paths(folder, "train")
    if not train_paths:
        raise UserError(
            f"{shown(folder)} holds no train-*.tar shards; write the training samples as "
            "train-000000.tar, ... (an image and a .cls each)"
        )
    names_file = folder / CLASSES_FILE
    if not names_file.is_file():
        raise UserError(f"no {shown(names_file)}; list the class names there, one a line")
    class_names = read_class_list(names_file)
    splits: dict[str, ShardImages | None] = {}
    for split in SPLIT_PATTERNS:
        paths = train_paths if split == "train" else shard_paths(folder, split)
        splits[split] = index_split(paths, len(class_names)) if paths else None
        source = splits[split]
        if source is not None and len(source) == 0:
            raise UserError(
                f"the {SPLIT_PATTERNS[split]} shards in {shown(folder)} hold no samples; "
                "write an image and a .cls per sample"
            )
    assert splits["train"] is not None
    return RawSplits(splits["train"], splits["test"], class_names, val=splits["val"])
