"""Write the embedded UCI digits as an image folder of real 28 px grayscale PNGs (data a user might
bring, which no test tunes to): `<out>/{train,test}/<class>/<index>.png`.

    python benchmarks/digits_png.py [digits28]
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from mlkd_cli.data.sources import load_digits


def write_digits_png(out: Path) -> None:
    """Every train and test image of the embedded digits, upscaled to 28 px, as PNG files."""
    raw = load_digits()
    for split, source in (("train", raw.train), ("test", raw.test)):
        for index in range(len(source)):
            image, label = source[index]
            folder = out / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            image.convert("L").resize((28, 28), Image.BICUBIC).save(folder / f"{index}.png")


if __name__ == "__main__":
    write_digits_png(Path(sys.argv[1] if len(sys.argv) > 1 else "digits28"))
