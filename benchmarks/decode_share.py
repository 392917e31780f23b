"""What share of the CPU pipeline's time per image is JPEG decoding: the most that FKD's
several-views-per-decoded-image batches could save (decoding once for m views saves
(1 - 1/m) of it). Photo-sized JPEGs (500x375, quality 90, smooth content with grain) made here,
one thread, the training transform at 224 px.

    python benchmarks/decode_share.py
"""

from __future__ import annotations

import io
import time

import numpy as np
import torch
from PIL import Image

from mlkd_cli.data.transforms import ImageConfig, build_train_transform

IMAGES = 100


def jpegs(count: int) -> list[bytes]:
    """`count` photo-like JPEG files' bytes."""
    rng = np.random.default_rng(0)
    files = []
    for _ in range(count):
        base = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(base).resize((500, 375), Image.BICUBIC))
        grain = rng.integers(-12, 12, size=smooth.shape)
        image = Image.fromarray((smooth.astype(np.int16) + grain).clip(0, 255).astype(np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        files.append(buffer.getvalue())
    return files


def main() -> None:
    """Print decode and transform time per image, and the decode share, three times."""
    torch.set_num_threads(1)
    files = jpegs(IMAGES)
    transform = build_train_transform(ImageConfig(img_size=224))
    print(f"{IMAGES} JPEGs of 500x375, {sum(map(len, files)) / IMAGES / 1024:.0f} KB on average")
    for _ in range(3):
        start = time.perf_counter()
        images = [Image.open(io.BytesIO(f)).convert("RGB") for f in files]
        decode = time.perf_counter() - start
        start = time.perf_counter()
        for image in images:
            transform(image)
        rest = time.perf_counter() - start
        share = decode / (decode + rest)
        print(
            f"decode {1e3 * decode / IMAGES:.2f} ms, transform {1e3 * rest / IMAGES:.2f} ms per "
            f"image: decoding is {share:.0%}; 2 views a decode save {share / 2:.0%}, "
            f"4 save {share * 3 / 4:.0%}"
        )


if __name__ == "__main__":
    main()
