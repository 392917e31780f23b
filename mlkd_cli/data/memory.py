"""Image files held decoded in memory, so that a small dataset of files trains as CIFAR does.

A folder (or CSV list) of small images that all share one size — digits or CIFAR exported as
PNG files, icons, scans — is decoded once into one uint8 array (an `ArraySource`) and trained
through the device pipeline: no image is decoded, resized or normalised one at a time in any
epoch. On a 2-core CPU that per-image work, not the model, set the pace of small students
(BENCHMARKS.md, "Issue 36"). Whether a source qualifies is read from a sample of file headers at
plan time (`why_not_held`); the decode itself runs in the training process (`hold_in_memory`)
and gives up, naming the file, where an image breaks the sample's promise.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from mlkd_cli.core.safeload import shown
from mlkd_cli.data.registry import DataSplits
from mlkd_cli.data.sources import MAX_IMAGE_PIXELS, ArraySource, ImageFiles, ImageSource

# The share of the machine's available memory the decoded copies of all of a run's local
# processes may take together: the rest stays for models, batches and the page cache.
MEMORY_SHARE = 0.25
HEADER_SAMPLE = 16  # image headers read at plan time, evenly spread over the source
# The device pipeline resamples without antialiasing; that changes nothing when images are
# enlarged or kept, and aliases when they are shrunk. Larger images keep timm's transforms.


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux's MemAvailable), else the total."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _header_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as image:  # reads the header only
            return image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def why_not_held(source: ImageSource, img_size: int, local_processes: int) -> str | None:
    """Why `source` cannot be held decoded in memory for the device pipeline, or None.

    A file source qualifies when a sample of its headers shows one size, no larger than the
    training size, and its decoded copies (one per local process) fit `MEMORY_SHARE` of the
    available memory.
    """
    if isinstance(source, ArraySource):
        return None
    if not isinstance(source, ImageFiles) or len(source) == 0:
        return "its images are not files mlkd can list"
    count = len(source)
    picks = sorted({int(i * count / HEADER_SAMPLE) for i in range(min(HEADER_SAMPLE, count))})
    sizes = {_header_size(source.paths[i]) for i in picks}
    if None in sizes:
        return "a sampled image cannot be read"
    if len(sizes) > 1:
        shown_sizes = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:3])  # type: ignore[misc]
        return f"its images differ in size ({shown_sizes})"
    width, height = sizes.pop()  # type: ignore[misc]
    if max(width, height) > img_size:
        return f"its {width}x{height} images are shrunk to {img_size} px (timm's antialiasing)"
    needed = count * width * height * 3 * max(1, local_processes)
    budget = int(available_memory() * MEMORY_SHARE)
    if needed > budget:
        return (
            f"decoded they would take {needed / 2**30:.1f} GiB, over {MEMORY_SHARE:.0%} of the "
            f"available memory ({budget / 2**30:.1f} GiB)"
        )
    return None


def _decode(path: Path, size: tuple[int, int] | None) -> np.ndarray | str:
    """The image as an (H, W, 3) uint8 array, or why not; one of another `size` is not decoded
    (a small file may declare a huge image)."""
    try:
        with Image.open(path) as image:  # reads the header only
            if size is not None and image.size != size:
                w, h = image.size
                return f"{shown(path)} is {w}x{h}, unlike the others ({size[0]}x{size[1]})"
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return f"{shown(path)} cannot be decoded"


def hold_in_memory(source: ImageSource, threads: int = 1) -> ArraySource | str:
    """`source` decoded into one uint8 array, or why it could not be (naming the file).

    Decoding runs on `threads` threads (PIL releases the GIL while it decodes).
    """
    if isinstance(source, ArraySource):
        return source
    assert isinstance(source, ImageFiles)
    size = _header_size(source.paths[0])
    if size is None or size[0] * size[1] > MAX_IMAGE_PIXELS:
        return f"{shown(source.paths[0])} cannot be decoded"
    images = np.empty((len(source), size[1], size[0], 3), dtype=np.uint8)
    pool = ThreadPoolExecutor(max(1, threads))
    try:
        for index, array in enumerate(pool.map(_decode, source.paths, [size] * len(source))):
            if isinstance(array, str):
                return array
            images[index] = array
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return ArraySource(images, source.targets)


def hold_splits(splits: DataSplits, threads: int = 1) -> DataSplits | str:
    """`splits` with the training images decoded into memory (the validation hold-out too, where
    it is drawn from them), or why they could not be."""
    held = hold_in_memory(splits.train, threads)
    if isinstance(held, str):
        return held
    val = held if splits.val is splits.train else splits.val
    return dataclasses.replace(splits, train=held, val=val)
