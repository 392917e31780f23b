"""Two mlkd runs sharing one machine: images/s of each beside the same run alone.

Not a test. Writes a CIFAR-10-format dataset of random images (3,600 by default) into a
temporary folder, then runs `mlkd teacher train` (resnet18 at 32 px by default) alone, twice at
once, and alone again, for each OpenMP setting asked for, and prints each run's images/s in the
last epoch and the pair's share of the single run's rate (the mean of the two alone). `default`
is what mlkd does by itself; the other settings are VARIABLE=VALUE (several joined with commas;
settings apart with ';'), e.g. `GOMP_SPINCOUNT=300000` for libgomp's own default spin (what mlkd
ran before it set its own).

    python benchmarks/sharing.py                                      # mlkd's default only
    python benchmarks/sharing.py --settings 'default;GOMP_SPINCOUNT=300000;OMP_WAIT_POLICY=PASSIVE'
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

MLKD = [sys.executable, "-m", "mlkd_cli"]


def write_cifar10(root: Path, images: int, seed: int = 0) -> None:
    """A CIFAR-10 in torchvision's python-pickle layout: five training batches and a test batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    per_file = -(-images // 5)
    names = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    for name in names:
        count = per_file if name != "test_batch" else max(10, images // 10)
        content = {
            "batch_label": name,
            "labels": [int(v) for v in rng.integers(0, 10, size=count)],
            "data": rng.integers(0, 256, size=(count, 3 * 32 * 32), dtype=np.uint8),
            "filenames": [f"{name}_{i}.png" for i in range(count)],
        }
        with (folder / name).open("wb") as handle:
            pickle.dump(content, handle, protocol=2)
    meta = {"label_names": [f"class_{i}" for i in range(10)], "num_cases_per_batch": per_file}
    with (folder / "batches.meta").open("wb") as handle:
        pickle.dump(meta, handle, protocol=2)


def parse_setting(text: str) -> dict[str, str]:
    """`default` (no variables) or VARIABLE=VALUE[,VARIABLE=VALUE...]."""
    if text == "default":
        return {}
    pairs = [part.split("=", 1) for part in text.split(",")]
    return {key: value for key, value in pairs}


def start(args: argparse.Namespace, data: Path, out: Path, name: str, extra: dict[str, str]):
    """One `mlkd teacher train` in the background, printing its JSON result."""
    env = {**os.environ, **extra}
    command = [
        *MLKD, "teacher", "train", "-d", "cifar-10", "--data-dir", str(data), "-m", args.model,
        "--img-size", str(args.img_size), "-b", str(args.batch_size), "-e", str(args.epochs),
        "-n", name, "--output-dir", str(out), "--overwrite", "--json", "-q",
    ]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def rate(process: subprocess.Popen) -> float:
    """The finished run's images/s in its last epoch (the first one warms up)."""
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"a run failed:\n{stderr.decode()[-2000:]}")
    return float(json.loads(stdout)["last"]["images_per_s"])


def main() -> None:
    """Measure each setting alone and in pairs, then print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=3600)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--settings", default="default")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every measurement")
    args = parser.parse_args()
    settings = [s.strip() for s in args.settings.split(";") if s.strip()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mlkd-sharing-") as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "models"
        write_cifar10(data, args.images)
        for _ in range(args.rounds):
            for setting in settings:
                extra = parse_setting(setting)
                # Alone before and after the pair: this VM's speed drifts by tens of percent
                # within minutes, so the pair is held against the mean of the two.
                before = rate(start(args, data, out, "alone", extra))
                pair = [start(args, data, out, f"pair{i}", extra) for i in range(2)]
                both = [rate(p) for p in pair]
                after = rate(start(args, data, out, "alone", extra))
                share = 100 * min(both) / ((before + after) / 2)
                rows.append((setting, before, after, both, share))
                print(
                    f"{setting}: alone {before:.0f} then {after:.0f} img/s; two at once "
                    f"{both[0]:.0f} and {both[1]:.0f} img/s ({share:.0f} % of alone, the slower)",
                    flush=True,
                )
    print()
    print(
        "| OpenMP setting | alone img/s (before, after) | two at once, img/s each | slower/alone |"
    )
    print("|---|---|---|---|")
    for setting, before, after, both, share in rows:
        each = " and ".join(f"{b:.0f}" for b in both)
        print(f"| {setting} | {before:.0f}, {after:.0f} | {each} | {share:.0f} % |")


if __name__ == "__main__":
    main()
