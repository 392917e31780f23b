"""Option declarations shared by the command modules, so every command spells them alike."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.models import ParameterInfo

from mlkd_cli.core.console import OutputOptions
from mlkd_cli.engine.config import DistillConfig, build_config, config_field_names
from mlkd_cli.presets import preset_section

C = TypeVar("C")
R = TypeVar("R")

# ------------------------------------------------------------------------------- help panels
# `--help` shows options in these panels, in this order: `with_options` sorts a command's options
# by it, so the panel order is written here once. Each option names its panel where it is
# declared; a panel a command does not use is not shown.
PIPELINE = "Pipeline"
STUDY = "Study"
STORE = "Soft-label store"
DATA = "Data"
EXPORT = "Export"
TEACHER = "Teacher"
MODEL = "Model"
STUDENT = "Student and exits"
ENSEMBLE = "Ensemble"
EARLY_EXIT = "Early exit"
OPTIMISATION = "Optimisation"
LOSS = "Loss"
AUGMENTATION = "Augmentation"
PROCESSES = "Processes and devices"
RUN = "Run and checkpoints"
OUTPUT = "Output"
PANELS = (
    PIPELINE,
    STUDY,
    STORE,
    DATA,
    EXPORT,
    TEACHER,
    MODEL,
    STUDENT,
    ENSEMBLE,
    EARLY_EXIT,
    OPTIMISATION,
    LOSS,
    AUGMENTATION,
    PROCESSES,
    RUN,
    OUTPUT,
)


class DeviceChoice(str, Enum):
    """Where models run."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class PrecisionChoice(str, Enum):
    """The arithmetic models run in."""

    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


class PipelineChoice(str, Enum):
    """Where training images are augmented."""

    auto = "auto"
    device = "device"
    cpu = "cpu"


class SplitChoice(str, Enum):
    """Which held-out split to run on."""

    val = "val"
    test = "test"


# ------------------------------------------------------------------------- shared declarations

Preset = Annotated[
    str | None,
    typer.Option(
        "--preset",
        help="A shipped preset name or a YAML file; flags given here win.",
        rich_help_panel=RUN,
    ),
]
Dataset = Annotated[
    str | None,
    typer.Option(
        "--dataset", "-d", help="Dataset name (see `mlkd data list`).", rich_help_panel=DATA
    ),
]
DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="Folder holding the dataset files (default data).", rich_help_panel=DATA
    ),
]
Download = Annotated[
    bool | None,
    typer.Option(
        "--download/--no-download",
        help="Download the dataset if absent (needs a network).",
        rich_help_panel=DATA,
    ),
]
ImgSize = Annotated[
    int | None,
    typer.Option(
        "--img-size", help="Training resolution (default: the dataset's).", rich_help_panel=DATA
    ),
]
ValFraction = Annotated[
    float | None,
    typer.Option(
        "--val-fraction",
        help="Share of each class held out for validation (default 0.1).",
        rich_help_panel=DATA,
    ),
]
LabelFraction = Annotated[
    float | None,
    typer.Option(
        "--label-fraction",
        help="A label budget: keep the labels of only this share of each class's training "
        "images (the same images every run). Teachers and plain training learn from those; "
        "distill from every image (default 1).",
        rich_help_panel=DATA,
    ),
]
PlainModel = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="Architecture, for plain state dicts.", rich_help_panel=MODEL
    ),
]
PlainClasses = Annotated[
    int | None,
    typer.Option(
        "--num-classes", help="Class count, for plain state dicts.", rich_help_panel=MODEL
    ),
]


def teacher_flags(
    model: str | None,
    checkpoint: Path | None,
    ensemble: Path | None,
    models_dir: Path | None,
    img_size: int | None = None,
) -> dict[str, Any]:
    """The teacher options as config settings (`DistillConfig`'s names)."""
    return {
        "teacher_model": model,
        "teacher_checkpoint": checkpoint,
        "ensemble": ensemble,
        "models_dir": models_dir,
        "teacher_img_size": img_size,
    }


# What `distill` and `study` share: the teacher, the student and the loss mix.
_DISTILL = DistillConfig(dataset="")
EnsembleFile = Annotated[
    Path | None,
    typer.Option(
        "--ensemble",
        help="Ensemble teacher file (default: config.json here).",
        rich_help_panel=TEACHER,
    ),
]
TeacherModel = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="A single teacher's timm model name (default: what its checkpoint records).",
        rich_help_panel=TEACHER,
    ),
]
TeacherCheckpoint = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint", "-c", help="A single teacher's checkpoint.", rich_help_panel=TEACHER
    ),
]
TeacherImgSize = Annotated[
    int | None,
    typer.Option(
        "--teacher-img-size",
        help="Input size the teacher runs at (default: what its checkpoint records; one that "
        "records none sees the student's size).",
        rich_help_panel=TEACHER,
    ),
]
ModelsDir = Annotated[
    Path | None,
    typer.Option(
        "--models-dir", help="Where the ensemble file's names resolve.", rich_help_panel=TEACHER
    ),
]
SoftLabels = Annotated[
    Path | None,
    typer.Option(
        "--soft-labels",
        help="A store from `mlkd teacher label`: no teacher runs, each image replays one of "
        "its stored views.",
        rich_help_panel=TEACHER,
    ),
]
Student = Annotated[
    str | None,
    typer.Option(
        "--student",
        help=f"Student timm model (default {_DISTILL.student}).",
        rich_help_panel=STUDENT,
    ),
]
Exits = Annotated[
    str | None,
    typer.Option(
        "--exits",
        help="Stages that get exits, e.g. 0,1,2 (default: all but last).",
        rich_help_panel=STUDENT,
    ),
]
ExitHead = Annotated[
    str | None,
    typer.Option(
        "--exit-head",
        help="original (the original's branch) or light (1-3 % of a ResNet-50's MACs an exit; "
        f"default {_DISTILL.exit_head}).",
        rich_help_panel=STUDENT,
    ),
]
Alpha = Annotated[
    float | None,
    typer.Option(
        "--alpha",
        help=f"Weight of the KD term vs cross-entropy (default {_DISTILL.alpha:g}).",
        rich_help_panel=LOSS,
    ),
]
Temperature = Annotated[
    float | None,
    typer.Option(
        "--temperature",
        help=f"KD and DKD temperature (default {_DISTILL.temperature:g}).",
        rich_help_panel=LOSS,
    ),
]
Augment = Annotated[
    bool | None,
    typer.Option(
        "--augment/--no-augment",
        help="Random crop, flip and colour jitter on training images (default on).",
        rich_help_panel=AUGMENTATION,
    ),
]
WorldSize = Annotated[
    int | None,
    typer.Option(
        "--world-size",
        help="Processes to spawn (one per GPU; gloo on CPU) (default 1).",
        rich_help_panel=PROCESSES,
    ),
]
Device = Annotated[
    DeviceChoice | None,
    typer.Option("--device", help="Where models run (default auto).", rich_help_panel=PROCESSES),
]
Precision = Annotated[
    PrecisionChoice | None,
    typer.Option(
        "--precision",
        help="bf16 autocast or fp32. auto (default): bf16 on CUDA and on CPUs with native bf16 "
        "(AVX512-BF16, AMX), fp32 elsewhere. The run's first line says which was chosen, with "
        "the memory format.",
        rich_help_panel=PROCESSES,
    ),
]
Workers = Annotated[
    int | None,
    typer.Option(
        "--workers",
        help="Data-loading workers per process (default auto).",
        rich_help_panel=PROCESSES,
    ),
]
MaxRestarts = Annotated[
    int | None,
    typer.Option(
        "--max-restarts",
        help="Restart the workers up to N times when one dies, each time from the last saved "
        "state (default 0; under torchrun, torchrun's own --max-restarts applies).",
        rich_help_panel=PROCESSES,
    ),
]
DataPipeline = Annotated[
    PipelineChoice | None,
    typer.Option(
        "--data-pipeline",
        help="device: hold an in-memory dataset (cifar-10/100, digits) on the run's device and "
        "augment whole batches there; cpu: timm's transforms on loader workers; auto (default): "
        "device where the dataset and augmentation allow.",
        rich_help_panel=PROCESSES,
    ),
]
Compile = Annotated[
    bool | None,
    typer.Option(
        "--compile/--no-compile",
        help="torch.compile the models (default off).",
        rich_help_panel=PROCESSES,
    ),
]
OutputDir = Annotated[
    Path | None,
    typer.Option(
        "--output-dir",
        help="Where checkpoints and histories go (default models).",
        rich_help_panel=RUN,
    ),
]
Resume = Annotated[
    bool,
    typer.Option("--resume", help="Continue the run from <name>_last.pth.", rich_help_panel=RUN),
]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Replace an existing run of the same name.", rich_help_panel=RUN
    ),
]
# The same flag for a command that writes files rather than a run: it replaces existing files
# (never the command's input; mlkd_cli.core.atomic.check_new_files holds both rules).
OverwriteFiles = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace output files that exist already (never the input).",
        rich_help_panel=OUTPUT,
    ),
]
Seed = Annotated[
    int | None, typer.Option("--seed", help="Random seed (default 0).", rich_help_panel=RUN)
]
SaveEverySteps = Annotated[
    int | None,
    typer.Option(
        "--save-every-steps",
        help="Also write the resumable training state every N optimiser steps (default 0: "
        "at epoch ends only).",
        rich_help_panel=RUN,
    ),
]
SkipNonfinite = Annotated[
    bool | None,
    typer.Option(
        "--skip-nonfinite/--stop-nonfinite",
        help="Skip optimiser steps whose loss is NaN/inf instead of stopping the run.",
        rich_help_panel=RUN,
    ),
]
StrictData = Annotated[
    bool | None,
    typer.Option(
        "--strict-data/--skip-unreadable",
        help="Stop at an image file that cannot be decoded instead of leaving it out.",
        rich_help_panel=RUN,
    ),
]
LogTo = Annotated[
    str | None,
    typer.Option(
        "--log-to",
        # escaped: rich would read [tensorboard] as markup and drop it
        help="Also send each epoch's metrics to: tensorboard (into <name>_tensorboard/ in "
        "--output-dir; needs pip install 'mlkd\\[tensorboard]').",
        rich_help_panel=RUN,
    ),
]
Quiet = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="Print results only, no progress.", rich_help_panel=OUTPUT),
]
Json = Annotated[
    bool,
    typer.Option("--json", help="Print the result as one JSON object.", rich_help_panel=OUTPUT),
]


def given(**values: Any) -> dict[str, Any]:
    """The options the user actually passed (Typer gives None for the rest)."""
    return {k: v for k, v in values.items() if v is not None}


def training_config(
    cls: type[C],
    section: str,
    preset: str | None,
    flags: dict[str, Any],
    *,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    json: bool,
) -> C:
    """A run's config: class defaults, then the preset's section, then the flags given."""
    values = {**preset_section(preset, section, config_field_names(cls)), **flags}
    values.update(resume=resume, overwrite=overwrite, output=OutputOptions(quiet=quiet, json=json))
    return build_config(cls, values, origin=preset or "options")


# ------------------------------------------------------------------------- shared option groups


def _plain(value: Any) -> Any:
    """An Enum choice as its string (what configs hold); anything else as it is."""
    return value.value if isinstance(value, Enum) else value


def option_group(**options: tuple[Any, Any]) -> list[inspect.Parameter]:
    """Keyword parameters `name: annotation = default`, as Typer reads them."""
    kind = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter(name, kind, annotation=annotation, default=default)
        for name, (annotation, default) in options.items()
    ]


def _opt(kind: Any, *names: str, help: str, panel: str) -> Any:
    """An optional flag of type `kind` (None when not given), shown in `--help` under `panel`."""
    return Annotated[kind | None, typer.Option(*names, help=help, rich_help_panel=panel)]


def run_options() -> list[inspect.Parameter]:
    """Where and how processes run: every command that runs models takes these."""
    return option_group(
        world_size=(WorldSize, None),
        device=(Device, None),
        precision=(Precision, None),
        workers=(Workers, None),
    )


def restart_options() -> list[inspect.Parameter]:
    """How often dead workers are restarted: every command that trains takes this."""
    return option_group(max_restarts=(MaxRestarts, None))


def output_options() -> list[inspect.Parameter]:
    """How results are shown: every command that reports takes these."""
    return option_group(quiet=(Quiet, False), json=(Json, False))


def augmentation_options() -> dict[str, tuple[Any, Any]]:
    """timm's augmentation knobs (default: chosen from the dataset's images; see README)."""
    pair = tuple[float, float]
    aug = functools.partial(_opt, panel=AUGMENTATION)
    return {
        "scale": (
            aug(pair, "--scale", help="Random resized crop: MIN MAX share of the area."),
            None,
        ),
        "ratio": (
            aug(pair, "--ratio", help="Random resized crop: MIN MAX aspect ratio (3/4 4/3)."),
            None,
        ),
        "hflip": (aug(float, "--hflip", help="Horizontal flip probability."), None),
        "vflip": (aug(float, "--vflip", help="Vertical flip probability (default 0)."), None),
        "color_jitter": (
            aug(float, "--color-jitter", help="Brightness, contrast and saturation jitter, 0 off."),
            None,
        ),
        "auto_augment": (
            aug(
                str,
                "--auto-augment",
                help="timm's RandAugment or AutoAugment, e.g. rand-m9-mstd0.5 (default none).",
            ),
            None,
        ),
        "reprob": (aug(float, "--reprob", help="Random erasing probability (default 0)."), None),
        "interpolation": (
            aug(str, "--interpolation", help="Resampling: bicubic (default), bilinear, random."),
            None,
        ),
    }


def training_options(d: Any) -> list[inspect.Parameter]:
    """Options `teacher train` and `distill` share; help shows `d`'s (the command's) defaults.

    Within a panel they are listed in this order, the ones most often changed first.
    """
    optim = functools.partial(_opt, panel=OPTIMISATION)
    return [
        *option_group(
            data_dir=(DataDir, None),
            img_size=(ImgSize, None),
            val_fraction=(ValFraction, None),
            label_fraction=(LabelFraction, None),
            download=(Download, None),
            epochs=(optim(int, "--epochs", "-e", help=f"Epochs (default {d.epochs})."), None),
            batch_size=(
                optim(
                    int,
                    "--batch-size",
                    "-b",
                    help=f"Most images per process per forward pass (default {d.batch_size}).",
                ),
                None,
            ),
            effective_batch_size=(
                optim(
                    int,
                    "--effective-batch-size",
                    help="Images per optimiser step over all processes (accumulation, and a "
                    "smaller per-process batch where that fits better).",
                ),
                None,
            ),
            lr=(optim(float, "--lr", help=f"Peak AdamW learning rate (default {d.lr:g})."), None),
            weight_decay=(
                optim(
                    float,
                    "--weight-decay",
                    help=f"AdamW weight decay (default {d.weight_decay:g}).",
                ),
                None,
            ),
            warmup_epochs=(
                optim(
                    float,
                    "--warmup-epochs",
                    help=f"Linear warmup epochs (default {d.warmup_epochs:g}).",
                ),
                None,
            ),
            optimizer=(
                optim(str, "--optimizer", help=f"adamw or sgd (default {d.optimizer})."),
                None,
            ),
            schedule=(
                optim(
                    str,
                    "--schedule",
                    help=f"cosine (with warmup) or constant (default {d.schedule}).",
                ),
                None,
            ),
            label_smoothing=(
                _opt(
                    float,
                    "--label-smoothing",
                    help=f"Label smoothing (default {d.label_smoothing:g}).",
                    panel=LOSS,
                ),
                None,
            ),
            augment=(Augment, None),
            mixup_alpha=(
                _opt(
                    float,
                    "--mixup-alpha",
                    help=f"Mixup alpha, 0 off (default {d.mixup_alpha:g}).",
                    panel=AUGMENTATION,
                ),
                None,
            ),
            cutmix_alpha=(
                _opt(
                    float,
                    "--cutmix-alpha",
                    help=f"CutMix alpha, 0 off (default {d.cutmix_alpha:g}).",
                    panel=AUGMENTATION,
                ),
                None,
            ),
            **augmentation_options(),
        ),
        *run_options(),
        *restart_options(),
        *option_group(
            data_pipeline=(DataPipeline, None),
            compile=(Compile, None),
            preset=(Preset, None),
            output_dir=(OutputDir, None),
            resume=(Resume, False),
            overwrite=(Overwrite, False),
            seed=(Seed, None),
            save_frequency=(
                _opt(
                    int,
                    "--save-frequency",
                    "-s",
                    help="Keep <name>_e<N>.pth every N epochs, 0 never "
                    f"(default {d.save_frequency}).",
                    panel=RUN,
                ),
                None,
            ),
            save_every_steps=(SaveEverySteps, None),
            skip_nonfinite=(SkipNonfinite, None),
            strict_data=(StrictData, None),
            log_to=(LogTo, None),
        ),
        *output_options(),
    ]


@dataclass(frozen=True)
class Shared:
    """The values of a command's shared options, handed to it as one argument."""

    values: dict[str, Any]

    def given(self) -> dict[str, Any]:
        """The shared config settings the user passed (flags that map to config fields)."""
        skip = {"resume", "overwrite", "preset", "quiet", "json"}
        return {k: v for k, v in self.values.items() if k not in skip and v is not None}

    @property
    def output(self) -> OutputOptions:
        """--quiet / --json."""
        return OutputOptions(quiet=self.values["quiet"], json=self.values["json"])

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def own_files_config(self, cls: type[C], section: str, flags: dict[str, Any]) -> C:
        """The config of a command that names and continues its files itself (no --resume or
        --overwrite: `study`, `teacher label`)."""
        v = self.values
        return training_config(
            cls,
            section,
            v["preset"],
            {**self.given(), **given(**flags)},
            resume=False,
            overwrite=False,
            quiet=v["quiet"],
            json=v["json"],
        )

    def training_config(self, cls: type[C], section: str, flags: dict[str, Any]) -> C:
        """The run's config: class defaults, the preset's section, then every flag given."""
        v = self.values
        return training_config(
            cls,
            section,
            v["preset"],
            {**self.given(), **given(**flags)},
            resume=v["resume"],
            overwrite=v["overwrite"],
            quiet=v["quiet"],
            json=v["json"],
        )


def panel_of(param: inspect.Parameter) -> str | None:
    """The `--help` panel a parameter declares (None: an argument, or Typer's default panel)."""
    for info in getattr(param.annotation, "__metadata__", ()):
        if isinstance(info, ParameterInfo):
            return info.rich_help_panel
    return None


def _panel_rank(param: inspect.Parameter) -> int:
    panel = panel_of(param)
    if panel is None:
        return -1  # Typer shows arguments and its default panel first
    if panel not in PANELS:
        raise ValueError(f"--help panel {panel!r} of {param.name} is not in options.PANELS")
    return PANELS.index(panel)


def with_options(
    *groups: list[inspect.Parameter],
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Add the groups' options to a command; it receives their values as `shared: Shared`.

    Typer reads a command's parameters from its signature, so the shared ones are declared once
    here and spliced into each command's signature instead of being written out in each. The
    signature lists the command's own and the shared options panel by panel in `PANELS` order
    (declaration order within a panel), which is the order `--help` shows them in.
    """
    extra = [p for group in groups for p in group]

    def decorate(command: Callable[..., R]) -> Callable[..., R]:
        own = inspect.signature(command, eval_str=True)
        params = [p for p in own.parameters.values() if p.name != "shared"]
        hints = typing.get_type_hints(command, include_extras=True)
        hints.pop("shared", None)
        names = [p.name for p in extra]
        # Keyword-only, so that the sort may put a parameter without a default after one with
        # a default; Typer passes every value by name.
        ordered = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in sorted([*params, *extra], key=_panel_rank)
        ]

        @functools.wraps(command)
        def run(**values: Any) -> R:
            shared = Shared({name: _plain(values.pop(name)) for name in names})
            return command(**values, shared=shared)

        run.__signature__ = own.replace(parameters=ordered)  # type: ignore[attr-defined]
        run.__annotations__ = {**hints, **{p.name: p.annotation for p in extra}}
        del run.__wrapped__  # Typer must see this signature, not the command's own
        return run

    return decorate
