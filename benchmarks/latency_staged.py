"""The staged early-exit cascade in onnxruntime against the plain model, as `mlkd eval --latency`
times them: images/s and p50/p95 per request of plain fp32 and int8, the one-graph cascade (every
head computed) and the staged cascade (segment by segment, only the images still in going on),
fp32 and int8, and PyTorch's plain model and cascade, at 1 and 64 images a request, all rows of a
student side by side in one run with their rounds interleaved (`anytime.timing.measure_latency`).

Two students, each exported as `mlkd export --format onnx --int8` exports it (plain and with
exits, one-graph and staged):
- the demo student (`runs/demo/models/student_exits.pth` after `make demo`, or --demo PATH) at
  its chosen thresholds, timed on the digits test split; without a demo run, the full mode
  trains one as `make demo` does (`mlkd pipeline --preset digits`, about 2 minutes) and --quick
  takes an untrained student of the demo's shape;
- a ResNet-50 with light exits after layer1-3 (`--exit-head light`), random weights (speed does
  not depend on them), 10 classes, at 64, 128 and 224 px, its max_softmax thresholds chosen on
  random images so that the cascade runs about --share of the plain model's MACs, timed on
  other random images. Random weights make int8 disagree with fp32, so its export bar
  (--min-agreement) is set to 1 %: these files are for speed only.

The table gives, per row, the MACs share its images used (measured on the timed images) and its
images/s against the plain model's in the same runtime and request size.

    python benchmarks/latency_staged.py [--quick] [--demo PATH] [--sizes 64,128,224]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import onnxruntime
import timm
import torch

from mlkd_cli import api
from mlkd_cli.anytime import timing
from mlkd_cli.anytime.costs import ExitCosts
from mlkd_cli.anytime.rules import exit_confidence
from mlkd_cli.anytime.staged import StagedStudent
from mlkd_cli.core.checkpoint import ModelCard, save_exits_model, save_model
from mlkd_cli.data.registry import load_splits
from mlkd_cli.engine.precision import Precision
from mlkd_cli.models.exits import exits_record, load_exits_checkpoint
from mlkd_cli.models.student import MultiExitStudent
from mlkd_cli.passes.logits import card_image_config, split_dataset

DEMO = Path("runs/demo/models/student_exits.pth")
CLASSES = 10
BATCH = 64


def machine() -> str:
    """The CPU, its cores and the software, for the table's heading."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"{name}, {os.cpu_count()} cores (load average {load}), torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}"
    )


def _card(arch: str, size: int) -> ModelCard:
    digits = [str(d) for d in range(CLASSES)]
    return ModelCard(arch, CLASSES, digits, "digits", size, 1.0, [0.5] * 3, [0.5] * 3)


def thresholds_for_share(
    student: MultiExitStudent, costs: ExitCosts, images: torch.Tensor, share: float
) -> list[float]:
    """max_softmax thresholds under which about `share` of the plain model's MACs are spent on
    `images`: the same fraction f of the images still in leaves at each exit (each threshold a
    quantile of their confidences), f found by bisection."""
    with torch.no_grad():
        heads = student(images)
    confidence = exit_confidence(torch.stack(list(heads[1:])), "max_softmax")
    per_head = torch.tensor(costs.cascade, dtype=torch.float64) / costs.plain

    def run(fraction: float) -> tuple[list[float], float]:
        remaining = torch.ones(images.shape[0], dtype=torch.bool)
        values, taken = [], torch.full((images.shape[0],), len(costs.branches))
        for k, c in enumerate(confidence):
            value = float(torch.quantile(c[remaining], 1 - fraction)) if remaining.any() else 1.0
            values.append(min(max(value, 1e-6), 1.0))
            leave = remaining & (c >= values[-1])
            taken[leave], remaining = k, remaining & ~leave
        return values, float(per_head[taken].mean())

    low, high = 0.0, 1.0
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (middle, high) if run(middle)[1] > share else (low, middle)
    return run(high)[0]


def resnet50_student(folder: Path, size: int, share: float, seed: int) -> Path:
    """A random ResNet-50 with light exits (and its plain backbone beside it), its thresholds
    set for `share`; the exits checkpoint's path."""
    torch.manual_seed(seed)
    backbone = timm.create_model("resnet50", num_classes=CLASSES)
    student = MultiExitStudent(backbone, "resnet50", [0, 1, 2], CLASSES, size, "light").eval()
    record = exits_record(student, [0, 1, 2], size)
    costs = ExitCosts.from_record(record["macs"])
    choose = torch.randn(256, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    values = thresholds_for_share(student, costs, choose, share)
    record["thresholds"] = {"rule": "max_softmax", "values": values}
    path = folder / "r50_exits.pth"
    save_exits_model(path, student, _card("resnet50", size), record, 0, {})
    save_model(folder / "r50.pth", backbone, _card("resnet50", size), 0, {})
    return path


def demo_student(folder: Path, demo: Path, quick: bool) -> tuple[Path, str]:
    """The demo student copied into `folder` (its plain student too), else one trained as `make
    demo` trains it, else (--quick) an untrained one of its shape; its path and what it is."""
    if not demo.is_file() and not quick:
        print("no demo run: training one as make demo does (mlkd pipeline --preset digits)")
        api.pipeline("digits", run_dir=folder / "run")
        demo = folder / "run" / "models" / "student_exits.pth"
    if demo.is_file():
        plain = demo.name.replace("_exits", "").removesuffix(".pth")
        for name in (demo.name, f"{plain}.pth", *exported_names(demo)):
            source = demo.with_name(name)
            if source.is_dir():
                shutil.copytree(source, folder / name)
            elif source.is_file():
                shutil.copy(source, folder / name)
        return folder / demo.name, f"demo student ({demo})"
    torch.manual_seed(0)
    backbone = timm.create_model("test_convnext", num_classes=CLASSES)
    student = MultiExitStudent(backbone, "test_convnext", [0, 1, 2], CLASSES, 32).eval()
    record = exits_record(student, [0, 1, 2], 32)
    images = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    values = thresholds_for_share(student, ExitCosts.from_record(record["macs"]), images, 0.45)
    record["thresholds"] = {"rule": "max_softmax", "values": values}
    save_exits_model(
        folder / "student_exits.pth", student, _card("test_convnext", 32), record, 0, {}
    )
    save_model(folder / "student.pth", backbone, _card("test_convnext", 32), 0, {})
    return folder / "student_exits.pth", "untrained student of the demo's shape (no demo run)"


def exported_names(exits: Path) -> list[str]:
    """What `mlkd export --format onnx --int8` writes for `<name>_exits.pth` and `<name>.pth`."""
    stem, plain = exits.stem, exits.stem.removesuffix("_exits")
    return [f"{plain}.onnx", f"{plain}.int8.onnx", f"{stem}.onnx", f"{stem}.int8.onnx",
            f"{stem}_staged", f"{stem}.int8_staged"]  # fmt: skip


def export_all(exits: Path, calibration: int | None, min_agreement: float) -> None:
    """`mlkd export --format onnx --int8` of the student with exits and of its plain student,
    unless already there (a demo run's exports); `calibration` None: mlkd's default."""
    if all(exits.with_name(name).exists() for name in exported_names(exits)):
        return
    plain = exits.with_name(exits.name.replace("_exits", ""))
    more = {} if calibration is None else {"calibration_images": calibration}
    for path in (exits, plain):
        if path.is_file():
            api.export(path, format="onnx", int8=True, min_agreement=min_agreement, **more)


def timing_images(exits: Path, count: int, random: bool) -> list[torch.Tensor]:
    """`count` images in batches of BATCH: the digits test split as the student sees it, or
    random ones (seeded apart from those the thresholds were chosen on)."""
    card = load_exits_checkpoint(exits).card
    if random:
        size = card.img_size
        images = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(99))
    else:
        dataset = split_dataset(load_splits("digits", Path("data"), False, 0.1), "test",
                                card_image_config(card))  # fmt: skip
        images = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])
    return list(images.split(BATCH))


def measure(exits: Path, images: list[torch.Tensor]) -> list[timing.LatencyRow]:
    """Every row of `mlkd eval --latency` for this student, on CPU fp32."""
    loaded = load_exits_checkpoint(exits)
    assert loaded.costs is not None
    staged = StagedStudent(loaded.student.eval(), loaded.card.img_size)
    chosen = loaded.exits.get("thresholds")
    if not chosen:
        raise SystemExit(f"{exits} has no thresholds: mlkd eval {exits} --split val --early-exit")
    precision = Precision.resolve("fp32", torch.device("cpu"), "the benchmark")
    result = timing.measure_latency(
        staged, precision, images, chosen["values"], chosen["rule"], exits, loaded.costs
    )
    for line in result.missing:
        print(f"  {line}")
    return result.rows


def table(label: str, size: int, rows: list[timing.LatencyRow]) -> list[str]:
    """Markdown rows: each configuration, and its images/s over the plain model's in the same
    runtime and request size (PyTorch's cascade against PyTorch's plain model)."""
    plain = {(r.runtime, r.batch): r.images_per_s for r in rows if r.model == timing.PLAIN}
    lines = []
    for r in rows:
        base = plain.get((r.runtime, r.batch))
        ratio = f"{r.images_per_s / base:.2f}x" if base else "-"
        lines.append(
            f"| {label} | {size} | {r.runtime} | {r.model} | {r.batch} | {r.images_per_s:,.0f} "
            f"| {r.p50_ms:.2f} | {r.p95_ms:.2f} | {r.macs_pct:.1f} | {ratio} |"
        )
    return lines


def main() -> None:
    """Export and time each student; print one markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="64 px only, 16 single requests, one round"
    )
    parser.add_argument("--demo", type=Path, default=DEMO)
    parser.add_argument("--sizes", default="64,128,224", help="ResNet-50 image sizes")
    parser.add_argument("--share", type=float, default=0.45,
                        help="MACs share the ResNet-50 cascade's thresholds aim at")  # fmt: skip
    parser.add_argument("--images", type=int, default=256, help="timed images per student")
    args = parser.parse_args()
    sizes = [64] if args.quick else [int(s) for s in args.sizes.split(",")]
    count = BATCH if args.quick else args.images
    calibration = 16 if args.quick else 64
    if args.quick:
        timing.ROUNDS, timing.SINGLE_IMAGES = 1, 16
    start = time.perf_counter()
    lines = []
    with tempfile.TemporaryDirectory(prefix="latency_staged.") as scratch:
        folder = Path(scratch) / "demo"
        folder.mkdir()
        exits, label = demo_student(folder, args.demo, args.quick)
        print(f"{label}: exporting")
        # A trained student is held to mlkd's default bar, on mlkd's default calibration.
        export_all(exits, None, 99.0 if "untrained" not in label else 1.0)
        size = load_exits_checkpoint(exits).card.img_size
        lines += table("demo student", size, measure(exits, timing_images(exits, count, False)))
        for size in sizes:
            folder = Path(scratch) / f"r50_{size}"
            folder.mkdir()
            print(f"ResNet-50 with light exits at {size} px: thresholds, exports")
            exits = resnet50_student(folder, size, args.share, seed=size)
            export_all(exits, calibration, 1.0)
            rows = measure(exits, timing_images(exits, count, True))
            lines += table("ResNet-50, light exits", size, rows)
    print()
    print(
        f"{machine()}; {time.perf_counter() - start:.0f} s in all"
        + (", --quick" if args.quick else "")
    )
    print()
    print(
        "| student | px | runtime | model | batch | img/s | p50 ms | p95 ms | MACs % | vs plain |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
