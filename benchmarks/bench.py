"""`make bench`: distillation throughput of mlkd's defaults against the original's settings.

Not a test. For the CIFAR-100 recipe — the ResNet-50 student (`resnetv2_50x1_bit` with its
exits, 100 classes), teachers of three and five of the original ensemble's architectures
(random weights: speed does not depend on them), CIFAR-sized 32 px uint8 images upscaled to the
training size — it prints images/s of

  data      the training data pipeline alone (augmented, normalised batches on the device)
  teacher   the teacher's forward pass alone
  student   the student's training step alone (KD loss against fixed teacher outputs)
  full      the whole distillation step: data, teacher, student, optimiser (`train_one_epoch`)
  store     the step from a soft-label store (`distill --soft-labels`): the data pipeline
            replaying stored views, the stored outputs looked up on the device (and blended for
            Mixup/CutMix), student, optimiser — the same for any teacher, since none runs (and
            the "vs student" column: its share of the student step's rate). The student and
            store steps take turns over --rounds rounds, the fastest of each kept, so that the
            machine's drift within a run falls on both alike
  label     `mlkd teacher label`'s work per view: the pipeline drawing numbered views, the
            teacher under inference mode, its top-k taken (the "vs teacher" column: its share
            of the teacher forward's rate; at 1 or above, labelling K views costs no more teacher
            time than K live epochs)

in two modes, each in its own process so that global settings cannot leak:

  reference  the original project: fp32, torch.use_deterministic_algorithms(True), images
             decoded and augmented on 4 DataLoader workers
  default    mlkd: bf16 autocast and channels_last on CUDA, the data held and augmented on the
             device (`--data-pipeline device`), teacher under inference mode

with default/reference ratios and, from FLOPs counted by torch's FlopCounterMode, the model
TFLOP/s achieved (and its share of the device's dense bf16 peak on a known GPU). On a CPU it runs
at a small image size and batch and says so: those figures are not 224 px figures.

    python benchmarks/bench.py                   # 224 px, batch 128 on CUDA; 64 px, batch 16 on CPU
    python benchmarks/bench.py --modes reference,default,compiled --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from mlkd_cli.core.checkpoint import ModelCard, save_model
from mlkd_cli.core.dist import DistContext
from mlkd_cli.data.device import DeviceAugment, DeviceBatches
from mlkd_cli.data.loaders import (
    Batch,
    TransformedSubset,
    build_keyed_loader,
    build_train_batches,
)
from mlkd_cli.data.registry import get_dataset_spec
from mlkd_cli.data.replay import mixed_teacher_logits, stored_logits
from mlkd_cli.data.sources import ArraySource
from mlkd_cli.data.transforms import ImageConfig, build_train_transform
from mlkd_cli.data.views import ViewReplay, view_seed
from mlkd_cli.engine import loop
from mlkd_cli.engine.launch import resolve_device
from mlkd_cli.engine.precision import Precision, choose_layout
from mlkd_cli.losses.kd import MultiExitKDLoss
from mlkd_cli.models.student import build_student
from mlkd_cli.models.teacher import TeacherEnsemble

# The original project's five-member ensemble (its README's config.json); the first three form
# the smaller teacher.
ORIGINAL_ENSEMBLE = (
    "deit_small_distilled_patch16_224",
    "convnextv2_nano",
    "gmlp_s16_224",
    "hrnet_w18",
    "swinv2_cr_tiny_ns_224",
)
CLASSES = 100
# Dense bf16 tensor-core peaks from the vendors' data sheets (SXM parts), FLOP/s.
BF16_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
MODES = ("reference", "default", "compiled")
PREFETCH = 4  # batches each loader worker keeps ready (mlkd's DataLoader setting)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (timings must include it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def create(name: str, img_size: int) -> torch.nn.Module:
    """A teacher architecture at the benchmark's size (fixed-size models are told the size)."""
    try:
        return timm.create_model(name, num_classes=CLASSES, img_size=img_size)
    except TypeError:
        return timm.create_model(name, num_classes=CLASSES)


class Worker:
    """Everything one mode measures, in the process that runs that mode."""

    def __init__(self, mode: str, args: argparse.Namespace) -> None:
        self.mode, self.args = mode, args
        self.device = torch.device(resolve_device(args.device))
        self.ctx = DistContext(0, 1, 0, self.device)
        reference = mode == "reference"
        if reference:
            torch.use_deterministic_algorithms(True)
        self.image_config = ImageConfig(img_size=args.img_size, crop_pct=1.0)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, size=(args.images, 32, 32, 3), dtype=np.uint8)
        self.source = ArraySource(images, rng.integers(0, CLASSES, size=args.images).tolist())
        torch.manual_seed(0)
        student = build_student(args.student, CLASSES, None, args.img_size)
        if reference:  # the original: fp32, NCHW, on any device
            self.precision = Precision(self.device, why="the original's settings")
        else:  # mlkd: --precision auto, the layout chosen as a run chooses it
            self.precision = choose_layout(
                Precision.resolve("auto", self.device),
                student,
                (3, args.img_size, args.img_size),
                self.ctx,
                train=True,
            )
        self.student = self._place(student)
        self.teachers = {}
        for size in (3, 5):
            members = [create(name, args.img_size) for name in ORIGINAL_ENSEMBLE[:size]]
            teacher = self._place(TeacherEnsemble(members, [1.0] * size))
            teacher.bf16 = self.precision.bf16
            self.teachers[size] = teacher
        if mode == "compiled":
            for module in [self.student, *self.teachers[3].members, *self.teachers[5].members]:
                failed = loop.compile_module(module, self.device)
                if failed:
                    raise SystemExit(f"--compile is not available here: {failed}")
        self.loss = MultiExitKDLoss(10.0, 1.0, [1.0] * len(self.student.exits))
        # One AdamW for the whole run (its state is part of the step's cost).
        self.optimizer = loop.build_optimizer(self.student, 1e-3, 1e-4)
        self.mixer = loop.BatchMixer(CLASSES, 1.0, 1.0, 0.0)

    def _place(self, module: torch.nn.Module) -> torch.nn.Module:
        module.to(self.device)
        if self.precision.channels_last:
            module.to(memory_format=torch.channels_last)
        return module

    def batches(self) -> Iterator[Batch]:
        """The mode's training pipeline, endlessly."""
        batch = self.args.batch_size
        if self.mode == "reference":
            transform = build_train_transform(self.image_config)
            subset = TransformedSubset(self.source, range(len(self.source)), transform)
            workers = 4  # as the original, whatever the core count
            source = build_train_batches(subset, batch, self.ctx, seed=0, workers=workers)
        else:
            indices = range(len(self.source))
            source = DeviceBatches(self.source, indices, self.image_config, batch, self.ctx, seed=0)
        epoch = 0
        while True:
            yield from source.epoch(epoch)
            epoch += 1

    def rate(self, work: Callable[[int], None], steps: int | None = None) -> float:
        """Images/s of `work(steps)` after `work(warmup)`, device work included."""
        steps = steps or self.args.steps
        work(self.args.warmup)
        synchronize(self.device)
        start = time.perf_counter()
        work(steps)
        synchronize(self.device)
        return steps * self.args.batch_size / (time.perf_counter() - start)

    def data(self) -> float:
        """The pipeline alone: batches made and put on the device.

        Loader workers keep batches ready ahead (4 workers x 4 prefetched); timing ten times as
        many batches as they can hold measures their steady rate, not their queue.
        """
        stream = self.batches()

        def work(steps: int) -> None:
            for _ in range(steps):
                self.precision.to_device(next(stream).images)

        return self.rate(work, steps=max(self.args.steps, 10 * 4 * PREFETCH))

    def teacher(self, size: int) -> float:
        """One teacher forward on a ready batch."""
        images = self._random_images()

        def work(steps: int) -> None:
            for _ in range(steps):
                self.teachers[size](images)

        return self.rate(work)

    def _random_images(self) -> torch.Tensor:
        shape = (self.args.batch_size, 3, self.args.img_size, self.args.img_size)
        return self.precision.to_device(torch.randn(shape))

    def _train(self, batches: Iterator[Batch], step: loop.StepFn, steps: int) -> None:
        scheduler = loop.build_scheduler(self.optimizer, max(steps, 1), 0, 1.0)
        taken = (next(batches) for _ in range(steps))
        loop.train_one_epoch(
            self.student, taken, steps, step, self.optimizer, scheduler, self.mixer, self.ctx,
            self.precision, 1,
        )  # fmt: skip

    def student_step(self) -> float:
        """The student's step on a ready batch, against fixed teacher logits."""
        batch = Batch(self._random_images(), torch.randint(0, CLASSES, (self.args.batch_size,)))
        fixed = torch.randn(self.args.batch_size, CLASSES, device=self.device)

        def step(model, images, targets, indices, mix):
            return self.loss(model(images), fixed[: images.shape[0]], targets)

        def endless() -> Iterator[Batch]:
            while True:
                yield batch

        stream = endless()
        return self.rate(lambda steps: self._train(stream, step, steps))

    def full_step(self, size: int) -> float:
        """Data pipeline, teacher, student and optimiser: `mlkd distill`'s step."""
        teacher = self.teachers[size]

        def step(model, images, targets, indices, mix):
            return self.loss(model(images), teacher(images), targets)

        stream = self.batches()
        return self.rate(lambda steps: self._train(stream, step, steps))

    def label(self, size: int) -> float:
        """`mlkd teacher label`'s work per view: numbered views drawn by the device pipeline
        (the CPU pipeline's loader in reference mode), the teacher, its top-k kept."""
        views, count, batch = STORE_VIEWS, len(self.source), self.args.batch_size
        replay = ViewReplay(0, views, count)
        teacher = self.teachers[size]
        if self.mode == "reference":
            transform = build_train_transform(self.image_config)
            subset = TransformedSubset(self.source, range(count), transform)
            seeds = [view_seed(0, v) for v in range(views)]
            keys = [(p, seeds[v]) for v in range(views) for p in range(count)]
            loader = build_keyed_loader(subset, keys, batch, self.ctx, 4)
            made = (b.images for b in loader)
        else:
            images = torch.from_numpy(self.source.images).permute(0, 3, 1, 2).to(self.device)
            draws = replay.draw_table().to(self.device)
            augment = DeviceAugment(self.image_config, self.device)
            made = (
                augment(images[first : first + batch], None, draws[v, first : first + batch])
                for v in range(views)
                for first in range(0, count - batch + 1, batch)
            )

        def work(steps: int) -> None:
            for _ in range(steps):
                with torch.inference_mode():
                    teacher(self.precision.to_device(next(made))).float().topk(CLASSES, dim=1)

        return self.rate(work)

    def store_step(self) -> float:
        """`distill --soft-labels`'s step: the pipeline replays stored views (8 per image), the
        stored outputs (every class, as the store keeps 100 classes) come from tables on the
        device; no teacher runs, whatever its size."""
        views, count = STORE_VIEWS, len(self.source)
        replay = ViewReplay(0, views, count)
        # Every class stored, so the task holds them in class order (no class table).
        logits = torch.randn(count, views, CLASSES).half().to(self.device)
        epoch_views = replay.epoch_views(0).to(self.device)
        batch = self.args.batch_size
        if self.mode == "reference":
            transform = build_train_transform(self.image_config)
            subset = TransformedSubset(self.source, range(count), transform)
            source = build_train_batches(subset, batch, self.ctx, 0, 4, replay)
        else:
            source = DeviceBatches(
                self.source, range(count), self.image_config, batch, self.ctx, 0, replay=replay
            )

        def step(model, images, targets, indices, mix):
            teacher = stored_logits(logits, None, epoch_views, indices, CLASSES)
            teacher = mixed_teacher_logits(teacher, mix, self.loss.teacher_temperature)
            return self.loss(model(images), teacher, targets)

        def endless() -> Iterator[Batch]:
            while True:
                yield from source.epoch(0)

        stream = endless()
        return self.rate(lambda steps: self._train(stream, step, steps))

    def measure(self) -> dict[str, float]:
        """Every row of the table, in images/s."""
        rows = {
            "data": self.data(),
            "teacher3": self.teacher(3),
            "teacher5": self.teacher(5),
            "label3": self.label(3),
            "label5": self.label(5),
            "full3": self.full_step(3),
            "full5": self.full_step(5),
        }
        # The student and store steps in turns, the fastest of each: their ratio is the figure.
        student, store = [], []
        for _ in range(self.args.rounds):
            student.append(self.student_step())
            store.append(self.store_step())
        return {**rows, "student": max(student), "store": max(store)}


def count_flops(args: argparse.Namespace) -> dict[str, float]:
    """FLOPs per image of each row's models (student: forward and backward), on the CPU."""
    size = args.img_size
    images = torch.randn(2, 3, size, size)
    student = build_student(args.student, CLASSES, None, size)
    with FlopCounterMode(display=False) as counter:
        sum(head.sum() for head in student(images)).backward()
    flops = {"student": counter.get_total_flops() / 2}
    for n in (3, 5):
        teacher = TeacherEnsemble([create(m, size) for m in ORIGINAL_ENSEMBLE[:n]], [1.0] * n)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            teacher(images)
        flops[f"teacher{n}"] = counter.get_total_flops() / 2
    flops["full3"] = flops["student"] + flops["teacher3"]
    flops["full5"] = flops["student"] + flops["teacher5"]
    flops["store"] = flops["student"]
    flops["label3"], flops["label5"] = flops["teacher3"], flops["teacher5"]
    return flops


ROWS = {
    "data": "data pipeline alone",
    "teacher3": "teacher forward, 3 models",
    "teacher5": "teacher forward, 5 models",
    "label3": "labelling a view, 3 models",
    "label5": "labelling a view, 5 models",
    "student": "student step alone",
    "full3": "full step, 3-model teacher",
    "full5": "full step, 5-model teacher",
    "store": "full step from a store (3 or 5 models)",
}
STORE_VIEWS = 8


# The 224 px CPU comparison (`distill_cli`): the real command, the original's recipe sizes.
CLI_TEACHER = "resnet18"
CLI_BATCH, CLI_STEP_IMAGES = 32, 128  # per forward pass; per optimiser step (the original's)
CLI_IMAGES_PER_FILE = 28  # 5 CIFAR-10 training files: 126 training images after the 10 % val
CLI_EPOCHS = 2  # the second epoch's rate is the one reported: start-up costs are behind it
# The runs side by side: mlkd's defaults, the same in fp32 (issue 15's baseline), and mlkd with
# the original's settings (fp32, deterministic algorithms, its loss, optimiser and schedule).
CLI_RUNS = (
    ("defaults", []),
    ("--precision fp32", ["--precision", "fp32"]),
    ("--recipe original", ["--recipe", "original"]),
)


def write_fake_cifar10(root: Path, per_file: int) -> None:
    """Random 32 px images in CIFAR-10's python-pickle layout (what `--dataset cifar-10` reads)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        content = {
            "batch_label": name,
            "labels": [i % 10 for i in range(per_file)],
            "data": rng.integers(0, 256, size=(per_file, 3 * 32 * 32), dtype=np.uint8),
            "filenames": [f"{name}_{i}.png" for i in range(per_file)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(content, handle)
    meta = {"label_names": [f"class_{i}" for i in range(10)], "num_cases_per_batch": per_file}
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump(meta, handle)


def distill_cli(args: argparse.Namespace, console: Console) -> dict[str, dict[str, Any]]:
    """`mlkd distill` at 224 px on fake CIFAR-10: defaults, --precision fp32, --recipe original.

    The real command in its own process, each run two epochs of 126 images (128 images a step,
    as the original accumulates); images/s is the second epoch's training rate from its history,
    so that one-time costs (allocation, oneDNN's kernel generation) are behind it.
    """
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="mlkd-bench-") as scratch:
        root = Path(scratch)
        write_fake_cifar10(root / "data", CLI_IMAGES_PER_FILE)
        torch.manual_seed(0)
        spec = get_dataset_spec("cifar-10")
        image_config = ImageConfig(img_size=224, crop_pct=spec.crop_pct)
        card = ModelCard(
            arch=CLI_TEACHER, num_classes=10, class_names=[f"class_{i}" for i in range(10)],
            dataset="cifar-10", img_size=224, crop_pct=image_config.crop_pct,
            mean=list(image_config.mean), std=list(image_config.std),
        )  # fmt: skip
        teacher = root / "teacher.pth"
        save_model(teacher, timm.create_model(CLI_TEACHER, num_classes=10), card, 0, {})
        for label, extra in CLI_RUNS:
            console.print(f"running mlkd distill ({label}) at 224 px ...")
            command = [
                sys.executable, "-m", "mlkd_cli", "distill", "--dataset", "cifar-10",
                "--data-dir", str(root / "data"), "--model", CLI_TEACHER,
                "--checkpoint", str(teacher), "--student", args.student, "--img-size", "224",
                "--batch-size", str(CLI_BATCH), "--effective-batch-size", str(CLI_STEP_IMAGES),
                "--epochs", str(CLI_EPOCHS), "--name", f"run{len(runs)}",
                "--output-dir", str(root / "models"), "--device", args.device, "--json", *extra,
            ]  # fmt: skip
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                console.print(f"mlkd distill ({label}) failed:\n{done.stderr.strip()[-2000:]}")
                continue
            summary = json.loads(done.stdout)
            history = json.loads(Path(summary["files"]["history_json"]).read_text())
            first = f"precision: {history['precision']}"  # the run's first line (--json hides it)
            runs[label] = {
                "images_per_s": summary["last"]["images_per_s"],
                "wall_s": wall,
                "first_line": first,
            }
    return runs


def print_cli_table(runs: dict[str, dict[str, Any]], markdown: bool) -> None:
    """The 224 px comparison: images/s of each run, its ratio to fp32 and to the original's."""
    bases = {
        "vs fp32": runs.get("--precision fp32", {}).get("images_per_s"),
        "vs original": runs.get("--recipe original", {}).get("images_per_s"),
    }
    header = ["mlkd distill, 224 px, batch 32, 128 images/step", "img/s", *bases, "wall s"]
    rows = []
    for label, run in runs.items():
        rate = run["images_per_s"]
        ratios = [f"{rate / base:.2f}x" if base else "-" for base in bases.values()]
        rows.append([label, f"{rate:.2f}", *ratios, f"{run['wall_s']:.0f}"])
    images = CLI_IMAGES_PER_FILE * 5 * 9 // 10
    title = (
        f"{args_title()}: the real command, {CLI_EPOCHS} epochs of {images} images, the last timed"
    )
    notes = [f"{label}: {run['first_line']}" for label, run in runs.items()]
    show_table(title, header, rows, notes, markdown)


def show_table(
    title: str, header: list[str], rows: list[list[str]], notes: list[str], markdown: bool
) -> None:
    """A rich table on stdout, lines of notes under it, and the table in Markdown if asked."""
    table = Table(title=title)
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    for note in notes:
        console.print(note, soft_wrap=True, markup=False)
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")


def args_title() -> str:
    """The machine and torch version, for table titles."""
    return f"{device_description(torch.device('cpu'))[0]} | torch {torch.__version__}"


def device_description(device: torch.device) -> tuple[str, float | None]:
    """The machine in words, and its dense bf16 peak in FLOP/s where known."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in BF16_PEAKS.items() if k in name), None)
        return name, peak
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores", None


def main() -> None:
    """Run each mode in its own process, then print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--student", default="resnetv2_50x1_bit")
    parser.add_argument("--img-size", type=int, help="default 224 on CUDA, 64 on a CPU")
    parser.add_argument("--batch-size", type=int, help="default 128 on CUDA, 16 on a CPU")
    parser.add_argument("--steps", type=int, help="measured steps (default 20 on CUDA, 6 on CPU)")
    parser.add_argument(
        "--warmup", type=int, help="unmeasured steps first (default 5 on CUDA, 1 on CPU)"
    )
    parser.add_argument("--images", type=int, default=4096, help="synthetic CIFAR-sized images")
    parser.add_argument(
        "--rounds", type=int, default=3, help="turns of the student and store steps (fastest kept)"
    )
    parser.add_argument("--modes", default="reference,default")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table too")
    parser.add_argument(
        "--cli",
        action=argparse.BooleanOptionalAction,
        help="also time `mlkd distill` at 224 px, defaults vs --precision fp32 (default: on CPU)",
    )
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(resolve_device(args.device))
    cuda = device.type == "cuda"
    args.img_size = args.img_size or (224 if cuda else 64)
    args.batch_size = args.batch_size or (128 if cuda else 16)
    args.steps = args.steps or (20 if cuda else 6)
    args.warmup = args.warmup or (5 if cuda else 1)
    if args.worker:
        print(json.dumps(Worker(args.worker, args).measure()))
        return

    modes = [m.strip() for m in args.modes.split(",")]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(sorted(unknown))}; choose from {MODES}")
    console = Console(stderr=True)
    results: dict[str, dict[str, float]] = {}
    for mode in modes:
        console.print(f"measuring {mode} ...")
        env = dict(os.environ)
        if mode == "reference":
            env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # deterministic cuBLAS needs it
        passed = [
            "--device", args.device, "--student", args.student, "--img-size", str(args.img_size),
            "--batch-size", str(args.batch_size), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--images", str(args.images),
            "--rounds", str(args.rounds),
        ]  # fmt: skip
        done = subprocess.run(
            [sys.executable, __file__, "--worker", mode, *passed],
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            console.print(f"{mode} failed:\n{done.stderr.strip()[-2000:]}")
            continue
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    flops = count_flops(args)
    name, peak = device_description(device)
    print_table(args, results, flops, name, peak)
    if args.cli if args.cli is not None else not cuda:
        print_cli_table(distill_cli(args, console), args.markdown)


def print_table(
    args: argparse.Namespace,
    results: dict[str, dict[str, float]],
    flops: dict[str, float],
    name: str,
    peak: float | None,
) -> None:
    """The table on stdout (rich), and in Markdown with --markdown."""
    modes = list(results)
    fastest = next((m for m in ("compiled", "default") if m in results), None)
    header = ["measurement", *(f"{m} img/s" for m in modes)]
    if "reference" in results and fastest:
        header.append(f"{fastest} / reference")
    header.append(f"{fastest or modes[0]} model TFLOP/s")
    header.append(f"{fastest or modes[0]} vs student")
    if peak:
        header.append("% of bf16 peak")
    rows: list[list[str]] = []
    for key, label in ROWS.items():
        row = [label, *(f"{results[m][key]:.1f}" for m in modes)]
        if "reference" in results and fastest:
            row.append(f"{results[fastest][key] / results['reference'][key]:.2f}x")
        best = results[fastest or modes[0]][key]
        tflops = best * flops[key] / 1e12 if key in flops else None
        row.append(f"{tflops:.3f}" if tflops is not None else "-")
        shown = results[fastest or modes[0]]
        if key.startswith(("full", "store")):
            row.append(f"{best / shown['student']:.2f}")
        elif key.startswith("label"):
            row.append(f"{best / shown['teacher' + key[-1]]:.2f} of teacher")
        else:
            row.append("")
        if peak:
            row.append(f"{100 * tflops * 1e12 / peak:.1f}" if tflops is not None else "-")
        rows.append(row)
    title = (
        f"{name} | torch {torch.__version__} | {args.student} student, {CLASSES} classes | "
        f"{args.img_size} px, batch {args.batch_size}, {args.steps} steps after {args.warmup}"
    )
    notes = []
    if args.img_size < 224:
        notes.append(
            f"note: {args.img_size} px on this machine, not the recipe's 224 px: compare the "
            "modes with each other, not with GPU figures."
        )
    show_table(title, header, rows, notes, args.markdown)


if __name__ == "__main__":
    main()
