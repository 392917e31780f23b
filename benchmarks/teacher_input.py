"""`make bench`: live distillation with teachers whose checkpoints record no input size, before
and after issue 32 — at `--img-size 64`, two plain resnet18 state dicts (no mlkd card) teach a
resnet18 student on fake CIFAR-10.

  before   what mlkd did until issue 32: a teacher recording no input ran at 224 px, the
           student's 64 px batches upscaled to it (reproduced here with --teacher-img-size 224)
  after    today's default: such a teacher sees what the student sees (64 px), and the run says so

Each is the real command in its own process, two epochs, the second epoch's training images/s
(from the run's history) reported, with the after/before ratio. Not a test: run it alone.

    python benchmarks/teacher_input.py [--images-per-file 200] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from bench import write_fake_cifar10

TEACHER = STUDENT = "resnet18"
RUNS = (("before (teachers at 224 px)", ["--teacher-img-size", "224"]), ("after (default)", []))


def run(root: Path, label: str, extra: list[str]) -> dict[str, float]:
    """One `mlkd distill` in its own process: the last epoch's images/s and the wall time."""
    command = [
        sys.executable, "-m", "mlkd_cli", "distill", "--dataset", "cifar-10",
        "--data-dir", str(root / "data"), "--ensemble", str(root / "ensemble.json"),
        "--student", STUDENT, "--img-size", "64", "--batch-size", "32", "--epochs", "2",
        "--mixup-alpha", "0", "--cutmix-alpha", "0", "--name", f"run{len(label)}",
        "--output-dir", str(root / "models"), "--overwrite", "--json", *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"mlkd distill ({label}) failed:\n{done.stderr.strip()[-2000:]}")
    summary = json.loads(done.stdout)
    return {"images_per_s": summary["last"]["images_per_s"], "wall_s": wall}


def main() -> None:
    """Write the data and the two teachers, run before and after, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-file", type=int, default=200)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlkd-bench-") as scratch:
        root = Path(scratch)
        write_fake_cifar10(root / "data", args.images_per_file)
        torch.manual_seed(0)
        names = ["plain_a", "plain_b"]
        for name in names:
            model = timm.create_model(TEACHER, num_classes=10)
            torch.save(model.state_dict(), root / f"{name}.pth")  # a bare state dict: no card
        members = [{"checkpoint": f"{n}.pth", "model": TEACHER} for n in names]
        (root / "ensemble.json").write_text(json.dumps({"members": members}))
        results = {label: run(root, label, extra) for label, extra in RUNS}
    before, after = (results[label]["images_per_s"] for label, _ in RUNS)
    images = args.images_per_file * 5 * 9 // 10
    title = (
        f"mlkd distill, 2 plain {TEACHER} teachers -> {STUDENT}, --img-size 64, {images} images, "
        f"epoch 2 timed; {platform.processor() or platform.machine()}, torch {torch.__version__}"
    )
    print(title)
    header = "| run | img/s | vs before | wall s |"
    print(header)
    print("|---|---|---|---|")
    for label, _ in RUNS:
        rate, wall = results[label]["images_per_s"], results[label]["wall_s"]
        print(f"| {label} | {rate:.1f} | {rate / before:.2f}x | {wall:.0f} |")
    print(f"after/before: {after / before:.2f}x")


if __name__ == "__main__":
    main()
