"""Write the embedded UCI digits as an image folder of real grayscale PNGs (data a user might
bring, which no test tunes to): `<out>/{train,test}/<class>/<index>.png`.

    python benchmarks/digits_png.py [OUT [SIZE [CLASSES [PER_CLASS]]]]

SIZE: the side in px (default 28); CLASSES: a comma-separated subset (default all ten);
PER_CLASS: at most this many training images of each class (default all).
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from mlkd_cli.data.sources import load_digits


def write_digits_png(
    out: Path, size: int = 28, classes: set[int] | None = None, per_class: int | None = None
) -> None:
    """The train and test images of the embedded digits (of `classes`), upscaled to `size` px,
    as PNG files; at most `per_class` training images of each class."""
    raw = load_digits()
    for split, source in (("train", raw.train), ("test", raw.test)):
        kept: dict[int, int] = {}
        for index in range(len(source)):
            image, label = source[index]
            if classes is not None and label not in classes:
                continue
            if split == "train" and per_class is not None and kept.get(label, 0) >= per_class:
                continue
            kept[label] = kept.get(label, 0) + 1
            folder = out / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            image.convert("L").resize((size, size), Image.BICUBIC).save(folder / f"{index}.png")


if __name__ == "__main__":
    args = sys.argv[1:]
    write_digits_png(
        Path(args[0] if args else "digits28"),
        int(args[1]) if len(args) > 1 else 28,
        {int(c) for c in args[2].split(",")} if len(args) > 2 else None,
        int(args[3]) if len(args) > 3 else None,
    )
