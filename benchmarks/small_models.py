"""Small models at small sizes: training images/s of this tree against an earlier revision.

Not a test. Runs the same commands with the code of `--before` (a git revision, default the one
before issue 23's speed work) and with this working tree, alternating them round by round in one
run, and prints each command's images/s in its last epoch (the first warms up) with the ratio:

  teacher resnet10t      `mlkd teacher train -d digits -m resnet10t --img-size 32 -b 64`
  teacher test_convnext  the same with test_convnext
  demo student           `mlkd distill` of the demo's student (test_convnext with its exits,
                         --no-augment --teacher-cache, batch 64) from a resnet10t teacher

Both trees run with their own defaults (data pipeline, precision, layout, threads).

    python benchmarks/small_models.py                  # about 3 minutes on 2 cores
    python benchmarks/small_models.py --before 5dccdc9 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "5dccdc9"  # main before issue 23
EPOCHS = "3"


def source_tree(revision: str | None, into: Path) -> Path:
    """A tree importable with PYTHONPATH: `revision` from git (None: this working tree), with
    commands/ and presets/ placed inside the package as an install places them."""
    into.mkdir(parents=True)
    if revision is None:
        for part in ("mlkd_cli", "commands", "presets"):
            shutil.copytree(ROOT / part, into / part, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", revision, "mlkd_cli", "commands", "presets"],
            capture_output=True,
            check=True,
        ).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(into, filter="data")
    shutil.copytree(into / "commands", into / "mlkd_cli" / "commands", dirs_exist_ok=True)
    shutil.copytree(into / "presets", into / "mlkd_cli" / "shipped_presets", dirs_exist_ok=True)
    return into


def mlkd(tree: Path, work: Path, *args: str) -> dict:
    """Run `mlkd ARGS --json -q` with the code of `tree`; its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-m", "mlkd_cli", *args, "--json", "-q", "--overwrite"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed with {tree}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


COMMANDS = {
    "teacher resnet10t, 32 px, batch 64": [
        "teacher", "train", "-d", "digits", "-m", "resnet10t", "--img-size", "32", "-b", "64",
        "-e", EPOCHS, "-n", "bench_r",
    ],
    "teacher test_convnext, 32 px, batch 64": [
        "teacher", "train", "-d", "digits", "-m", "test_convnext", "--img-size", "32", "-b", "64",
        "-e", EPOCHS, "-n", "bench_c",
    ],
    "demo student's distill step (test_convnext + exits)": [
        "distill", "-d", "digits", "--student", "test_convnext", "-m", "resnet10t", "-c",
        "models/teacher.pth", "--img-size", "32", "-b", "64", "-e", EPOCHS, "--no-augment",
        "--teacher-cache", "--alpha", "1", "--temperature", "4", "-n", "bench_s",
    ],
}  # fmt: skip


def main() -> None:
    """Time every command with both trees, alternating, and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help="the git revision to compare against")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlkd-small-") as tmp:
        trees = {
            "before": source_tree(args.before, Path(tmp) / "before"),
            "now": source_tree(None, Path(tmp) / "now"),
        }
        work = Path(tmp) / "work"
        work.mkdir()
        mlkd(trees["now"], work, "teacher", "train", "-d", "digits", "-m", "resnet10t",
             "-e", "2", "-n", "teacher")  # fmt: skip
        rates: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for label, command in COMMANDS.items():
                for version, tree in trees.items():
                    result = mlkd(tree, work, *command)
                    rates.setdefault((label, version), []).append(result["last"]["images_per_s"])
                    print(
                        f"{label} [{version}]: {rates[(label, version)][-1]:.0f} img/s", flush=True
                    )
    print()
    print(
        f"| run (digits, the last of 3 epochs) | before ({args.before}) img/s | now img/s "
        "| now / before |"
    )
    print("|---|---|---|---|")
    for label in COMMANDS:
        before = statistics.median(rates[(label, "before")])
        now = statistics.median(rates[(label, "now")])
        print(f"| {label} | {before:.0f} | {now:.0f} | {now / before:.2f}x |")


if __name__ == "__main__":
    main()
