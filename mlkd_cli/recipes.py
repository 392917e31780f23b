"""A pipeline recipe sized to the user's data and machine, for `mlkd pipeline -d NAME` without
a preset: image size, teachers, student and epochs chosen from the number of training images,
classes, image size and the machine, written out as a preset YAML the user can edit and rerun.

It sits beside `presets.py` because what it makes *is* a preset (the same keys, read back by
`resolve_preset`), so a chosen plan and a hand-written one run through one path. The choices
follow what the benchmarks showed on small data (docs/data.md, "Short schedules on small
data"; BENCHMARKS.md, "Your own data"): teachers and students without random crops on short
schedules, the student at batch 32, teacher outputs cached, the baseline trained alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlkd_cli.core.atomic import atomic_write_text
from mlkd_cli.core.errors import UserError

RECIPE_FILE = "recipe.yaml"  # beside the run: `mlkd pipeline --preset RUN_DIR/recipe.yaml`
LINE_WIDTH = 80

# Per-image cost of one training epoch (steps and the validation pass; batch 32, 32 px, images
# decoded in memory), in milliseconds: the best epoch of each model in `mlkd pipeline -d
# imagefolder` on the 28 px digits folder, on the 2-core AMD EPYC of BENCHMARKS.md ("Your own
# data: one command") while other jobs shared it (load 5); resnet26d and resnet50 scaled from
# resnet18 by their MACs. The time a recipe expects scales these by pixels and cores; on a GPU
# by GPU_SPEEDUP, a rough guess.
STEP_MS_2_CORES = {
    "resnet10t": 4.0,
    "resnet18": 4.0,
    "resnet26d": 9.0,
    "resnet50": 13.0,
    "test_efficientnet": 4.0,
    "test_convnext": 3.0,
}
GPU_SPEEDUP = 40.0
# Seconds a pipeline spends beyond training epochs (measured in the same run: 80 s): process and
# model start-up for every stage, the ensemble fit, the test evaluations, the early-exit timing
# and the export.
OVERHEAD_S = 80.0
# Images each model trains on in all (epochs x training images), before the epoch bounds: about
# the benchmarked short schedule on 1,294 digits (teachers 8 epochs at batch 64, the student 4
# at batch 32: BENCHMARKS.md, "Your own data"), sized so that a few thousand small images
# finish in minutes on 2 cores.
TEACHER_IMAGES = 8_000
STUDENT_IMAGES = 5_000
TEACHER_EPOCHS = (3, 12)
STUDENT_EPOCHS = (3, 8)
# A GPU affords this many times the CPU's schedule (and larger models).
GPU_SCHEDULE = 8
GPU_EPOCHS = ((10, 100), (6, 60))  # teachers, student
# Above this many classes the 0.2 M-parameter test_* students are too narrow.
NARROW_CLASSES = 20
# Above this many training images a CPU recipe keeps the cheapest models.
CPU_LARGE_IMAGES = 20_000


@dataclass(frozen=True)
class DataShape:
    """What the recipe needs to know of the data."""

    dataset: str
    data_dir: Path | None
    train_images: int
    classes: int
    side: int  # the longest side of a sample of the training images, in px
    grayscale: bool


@dataclass(frozen=True)
class Machine:
    """Where the pipeline will run: CPU cores, or a GPU's name."""

    cores: int
    gpu: str | None = None

    def describe(self) -> str:
        """`GPU NAME` or `N CPU cores`."""
        return f"GPU {self.gpu[:24]}" if self.gpu else f"{self.cores} CPU cores"


@dataclass(frozen=True)
class Recipe:
    """The chosen plan: every value, and one reason for each choice."""

    shape: DataShape
    machine: Machine
    img_size: int
    teachers: tuple[str, ...]
    teacher_epochs: int
    student: str
    student_epochs: int
    expected_s: float
    # Short schedules (a CPU's) train without random crops and cache the teachers' outputs;
    # long ones (a GPU's) keep the augmentation chosen from the images.
    augment: bool = False
    reasons: dict[str, str] = field(default_factory=dict)

    def preset(self) -> dict[str, Any]:
        """The recipe as a preset's contents (what `recipe.yaml` holds)."""
        return {
            "description": (
                f"Chosen by mlkd pipeline for {self.shape.train_images} training images of "
                f"{self.shape.classes} classes ({self.shape.side} px) on "
                f"{self.machine.describe()}."
            ),
            "dataset": self.shape.dataset,
            **({} if self.shape.data_dir is None else {"data_dir": str(self.shape.data_dir)}),
            "img_size": self.img_size,
            # the cross-entropy student trains as the distilled one does: only the loss differs
            "baseline": {"augment": self.augment},
            "teacher": {
                "model": self.teachers[0],
                "epochs": self.teacher_epochs,
                "batch_size": 32,
                "augment": self.augment,
            },
            "teachers": [{"name": f"t_{m}", "model": m} for m in self.teachers],
            "ensemble": {"fit_temperature": True},
            "distill": {
                "name": "student",
                "student": self.student,
                "epochs": self.student_epochs,
                "batch_size": 32,
                "augment": self.augment,
                "teacher_cache": not self.augment,
                "mixup_alpha": 0.0,
                "cutmix_alpha": 0.0,
            },
        }

    def lines(self) -> list[str]:
        """The plan in a few lines of at most 80 columns: what, why, how long."""
        s = self.shape
        out = [
            f"recipe for {_clip(s.dataset, 20)}: {s.train_images} train images, {s.classes} "
            f"classes, {s.side} px, on {self.machine.describe()}",
            f"  image size {self.img_size} px: {self.reasons['img_size']}",
            f"  teachers {', '.join(self.teachers)}, {self.teacher_epochs} epochs: "
            f"{self.reasons['teachers']}",
            f"  student {self.student}, {self.student_epochs} epochs: {self.reasons['student']}",
            f"  {'augmentation from the images' if self.augment else 'no random crops'}, "
            f"batch 32, baseline alike: {self.reasons['schedule']}",
            f"  expect about {_minutes(self.expected_s)} ({self.reasons['time']})",
        ]
        return [_fit(line) for line in out]


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _fit(line: str) -> str:
    """A line cut to LINE_WIDTH columns (a long model or GPU name must not wrap the plan)."""
    return _clip(line, LINE_WIDTH)


def _thousands(count: int) -> str:
    return f"{count / 1000:.0f}k" if count >= 10_000 else f"{count / 1000:.1f}k"


def _minutes(seconds: float) -> str:
    if seconds < 90:
        return f"{max(10, round(seconds, -1)):.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _image_size(side: int, gpu: bool) -> tuple[int, str]:
    """The training size from the images' longest side: never upscale much, and on a CPU
    never beyond 64 px."""
    if side <= 40:
        return 32, "small images: every pixel kept, the models cheap"
    if side <= 80 or not gpu:
        reason = "the images' own scale" if side <= 80 else "a CPU's affordable size"
        return 64, reason
    if side <= 160:
        return 128, "the images' own scale"
    return 224, "timm's ImageNet size, for photos"


def _epochs(target_images: int, train_images: int, bounds: tuple[int, int]) -> int:
    low, high = bounds
    return max(low, min(high, round(target_images / max(1, train_images))))


def _models(shape: DataShape, machine: Machine, img_size: int) -> tuple[tuple[str, ...], str]:
    """Two teachers and a student, and why the student."""
    if machine.gpu:
        if img_size >= 128:
            return ("resnet50", "resnet26d", "resnet18"), "ResNet-like, early exits"
        return ("resnet26d", "resnet18", "resnet10t"), "ResNet-like, early exits"
    if shape.train_images > CPU_LARGE_IMAGES or img_size > 32:
        teachers: tuple[str, ...] = ("resnet10t", "test_convnext")  # what a CPU affords
    else:
        teachers = ("resnet18", "resnet10t")
    if shape.classes > NARROW_CLASSES:
        return (*teachers, "resnet10t"), f"{shape.classes} classes need width"
    return (*teachers, "test_efficientnet"), "0.2 M params, fast; KD helps it most"


def choose_recipe(shape: DataShape, machine: Machine) -> Recipe:
    """The pipeline's plan for this data on this machine (deterministic: no timing is run)."""
    if shape.train_images < 1 or shape.classes < 2:
        raise UserError(
            f"{shape.dataset} has {shape.train_images} training images of {shape.classes} "
            "classes; a pipeline needs at least two classes"
        )
    gpu = machine.gpu is not None
    img_size, size_why = _image_size(shape.side, gpu)
    picked, student_why = _models(shape, machine, img_size)
    teachers, student = picked[:2], picked[2]
    scale = GPU_SCHEDULE if gpu else 1
    t_bounds, s_bounds = GPU_EPOCHS if gpu else (TEACHER_EPOCHS, STUDENT_EPOCHS)
    n = shape.train_images
    teacher_epochs = _epochs(TEACHER_IMAGES * scale, n, t_bounds)
    student_epochs = _epochs(STUDENT_IMAGES * scale, n, s_bounds)
    expected = _expected_seconds(
        machine, img_size, n, teachers, teacher_epochs, student, student_epochs
    )
    reasons = {
        "img_size": size_why,
        "teachers": f"{_thousands(teacher_epochs * n)} images each, sized to "
        + ("a GPU" if gpu else "a CPU"),
        "student": student_why,
        "schedule": "long runs use it" if gpu else "best on short runs",
        "time": (
            f"rough: a 2-core CPU table / {GPU_SPEEDUP:g}"
            if gpu
            else "a table of 2-core costs"
            if machine.cores == 2
            else f"a table of 2-core costs scaled to {machine.cores}"
        ),
    }
    return Recipe(
        shape=shape,
        machine=machine,
        img_size=img_size,
        teachers=teachers,
        teacher_epochs=teacher_epochs,
        student=student,
        student_epochs=student_epochs,
        expected_s=expected,
        augment=gpu,
        reasons=reasons,
    )


def _expected_seconds(
    machine: Machine,
    img_size: int,
    images: int,
    teachers: tuple[str, ...],
    teacher_epochs: int,
    student: str,
    student_epochs: int,
) -> float:
    """Training images x the table's per-image cost, scaled by pixels and cores, plus the
    stages' fixed overhead. The student's run adds one forward pass of each teacher (cached)."""
    per_pixel = (img_size / 32) ** 2
    speed = GPU_SPEEDUP if machine.gpu else machine.cores / 2

    def cost(model: str) -> float:
        return STEP_MS_2_CORES.get(model, 10.0) / 1000 * per_pixel / speed

    train = sum(cost(t) * teacher_epochs * images for t in teachers)
    train += sum(cost(t) / 3 * images for t in teachers)  # the teacher cache, forward only
    train += 2 * cost(student) * student_epochs * images  # the student and its baseline
    return train + OVERHEAD_S


def measure_shape(dataset: str, data_dir: Path | None) -> DataShape:
    """Read the dataset's training split (as every command does) and sample its images."""
    from mlkd_cli.data import sources
    from mlkd_cli.data.registry import load_splits

    splits = load_splits(dataset, data_dir or Path("data"))
    traits = sources.image_traits(splits.train)
    return DataShape(
        dataset=dataset,
        data_dir=data_dir,
        train_images=len(splits.train_indices),
        classes=splits.num_classes,
        side=traits.side,
        grayscale=traits.grayscale,
    )


def detect_machine(device: str) -> Machine:
    """This machine as the pipeline will use it: the GPU unless `--device cpu`."""
    from mlkd_cli.core.cpus import usable_cores

    cores = usable_cores()
    if device != "cpu":
        import torch

        if torch.cuda.is_available():
            return Machine(cores, torch.cuda.get_device_name(0))
    return Machine(cores)


def write_recipe(recipe: Recipe, path: Path, overwrite: bool) -> bool:
    """Write the recipe as a preset YAML; True when written. The same plan already there is
    kept (a rerun continues the run); another one is refused without `overwrite`."""
    import yaml  # pyyaml: what core.safeload reads presets with

    text = "# " + "\n# ".join(recipe.lines()) + "\n"
    text += "# Edit and rerun: mlkd pipeline --preset THIS_FILE --run-dir THE_RUN\n"
    text += yaml.safe_dump(recipe.preset(), sort_keys=False, width=96)
    if path.is_file():
        if _same_plan(path, recipe):
            return False
        if not overwrite:
            raise UserError(
                f"{path} holds another recipe (the data or machine changed); "
                "pass --overwrite to replace it, or --preset it to keep it"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return True


def _same_plan(path: Path, recipe: Recipe) -> bool:
    from mlkd_cli.presets import load_preset

    try:
        return load_preset(str(path))[0] == recipe.preset()
    except UserError:
        return False
