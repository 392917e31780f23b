"""Every flag more than one command takes, declared once as an `Annotated` Typer option.

A command's own flags are declared beside it, in the same style; `commands/requests.py` gathers
them into the command's typed request. A help text may show a default of the command's config as
`{setting}` (e.g. `{lr:g}`): the request fills it in from its `DEFAULTS`, so a default is written
once, in the config class. Nothing here loads torch or the engine (`--help` stays fast).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

# ------------------------------------------------------------------------------- help panels
# `--help` shows options in these panels, in this order: `requests.takes` sorts a command's
# options by it, so the panel order is written here once. Each option names its panel where it is
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
MODEL_EMA = "Model EMA"
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
    MODEL_EMA,
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


# What `distill`, `study` and `teacher label` share: the teacher, the student and the loss mix.
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
        help="Student timm model (default {student}).",
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
        "default {exit_head}).",
        rich_help_panel=STUDENT,
    ),
]
Alpha = Annotated[
    float | None,
    typer.Option(
        "--alpha",
        help="Weight of the KD term vs cross-entropy (default {alpha:g}).",
        rich_help_panel=LOSS,
    ),
]
Temperature = Annotated[
    float | None,
    typer.Option(
        "--temperature",
        help="KD and DKD temperature (default {temperature:g}).",
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
        help="device: hold the training images (cifar-10/100, digits, or image files of one "
        "small size, decoded once) on the run's device and augment whole batches there; cpu: "
        "timm's transforms on loader workers; auto (default): device where the data and "
        "augmentation allow.",
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
        help="Also track the run in tensorboard, wandb and/or mlflow (comma-separated; "
        "pip install 'mlkd\\[tensorboard]', or \\[wandb], \\[mlflow]): its settings, each "
        "epoch's metrics and the final figures, into --output-dir's <name>_tensorboard/, "
        "wandb/ and mlruns/ (unless WANDB_DIR or MLFLOW_TRACKING_URI say otherwise).",
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

# ------------------------------------------------------ what `teacher train` and `distill` share
# A help text's `{setting}` is the command's config default (see the module docstring).
Epochs = Annotated[
    int | None,
    typer.Option("--epochs", "-e", help="Epochs (default {epochs}).", rich_help_panel=OPTIMISATION),
]
BatchSize = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        "-b",
        help="Most images per process per forward pass (default {batch_size}).",
        rich_help_panel=OPTIMISATION,
    ),
]
EffectiveBatchSize = Annotated[
    int | None,
    typer.Option(
        "--effective-batch-size",
        help="Images per optimiser step over all processes (accumulation, and a smaller "
        "per-process batch where that fits better).",
        rich_help_panel=OPTIMISATION,
    ),
]
Lr = Annotated[
    float | None,
    typer.Option("--lr", help="Peak learning rate (default {lr:g}).", rich_help_panel=OPTIMISATION),
]
WeightDecay = Annotated[
    float | None,
    typer.Option(
        "--weight-decay",
        help="Weight decay, none on biases and norms (default {weight_decay:g}).",
        rich_help_panel=OPTIMISATION,
    ),
]
WarmupEpochs = Annotated[
    float | None,
    typer.Option(
        "--warmup-epochs",
        help="Linear warmup epochs (default {warmup_epochs:g}).",
        rich_help_panel=OPTIMISATION,
    ),
]
Optimizer = Annotated[
    str | None,
    typer.Option(
        "--optimizer",
        help="adamw, or sgd (Nesterov, momentum 0.9) (default {optimizer}; timm: --opt).",
        rich_help_panel=OPTIMISATION,
    ),
]
Schedule = Annotated[
    str | None,
    typer.Option(
        "--schedule",
        help="cosine (with warmup) or constant (default {schedule}; timm: --sched).",
        rich_help_panel=OPTIMISATION,
    ),
]
# timm train.py's regularisers and stabilisers, under timm's names and meanings.
DropPath = Annotated[
    float | None,
    typer.Option(
        "--drop-path",
        help="Stochastic depth: timm's drop_path_rate of the model that trains (default: the "
        "architecture's, 0 for ResNets).",
        rich_help_panel=OPTIMISATION,
    ),
]
ClipGrad = Annotated[
    float | None,
    typer.Option(
        "--clip-grad",
        help="Clip the gradients before each step: their total norm, or each value, to this "
        "(default: no clipping).",
        rich_help_panel=OPTIMISATION,
    ),
]
ClipMode = Annotated[
    str | None,
    typer.Option(
        "--clip-mode",
        help="What --clip-grad bounds: norm (clip_grad_norm_) or value (clip_grad_value_) "
        "(default norm).",
        rich_help_panel=OPTIMISATION,
    ),
]
ModelEma = Annotated[
    bool | None,
    typer.Option(
        "--model-ema/--no-model-ema",
        help="Also keep timm's ModelEmaV3 average of the weights, validate it every epoch and "
        "save whichever of it and the raw weights scores better (default off).",
        rich_help_panel=MODEL_EMA,
    ),
]
ModelEmaDecay = Annotated[
    float | None,
    typer.Option(
        "--model-ema-decay",
        help="The EMA's decay per optimiser step (default {model_ema_decay:g}).",
        rich_help_panel=MODEL_EMA,
    ),
]
ModelEmaWarmup = Annotated[
    bool | None,
    typer.Option(
        "--model-ema-warmup",
        help="Ramp the EMA's decay up over the first steps, as timm (default off).",
        rich_help_panel=MODEL_EMA,
    ),
]
LabelSmoothing = Annotated[
    float | None,
    typer.Option(
        "--label-smoothing",
        help="Label smoothing (default {label_smoothing:g}; timm: --smoothing).",
        rich_help_panel=LOSS,
    ),
]
MixupAlpha = Annotated[
    float | None,
    typer.Option(
        "--mixup-alpha",
        help="Mixup alpha, 0 off (default {mixup_alpha:g}; timm: --mixup).",
        rich_help_panel=AUGMENTATION,
    ),
]
CutmixAlpha = Annotated[
    float | None,
    typer.Option(
        "--cutmix-alpha",
        help="CutMix alpha, 0 off (default {cutmix_alpha:g}; timm: --cutmix).",
        rich_help_panel=AUGMENTATION,
    ),
]
# timm's augmentation knobs (default: chosen from the dataset's images; see README).
Scale = Annotated[
    tuple[float, float] | None,
    typer.Option(
        "--scale",
        help="Random resized crop: MIN MAX share of the area.",
        rich_help_panel=AUGMENTATION,
    ),
]
Ratio = Annotated[
    tuple[float, float] | None,
    typer.Option(
        "--ratio",
        help="Random resized crop: MIN MAX aspect ratio (3/4 4/3).",
        rich_help_panel=AUGMENTATION,
    ),
]
Hflip = Annotated[
    float | None,
    typer.Option("--hflip", help="Horizontal flip probability.", rich_help_panel=AUGMENTATION),
]
Vflip = Annotated[
    float | None,
    typer.Option(
        "--vflip", help="Vertical flip probability (default 0).", rich_help_panel=AUGMENTATION
    ),
]
ColorJitter = Annotated[
    float | None,
    typer.Option(
        "--color-jitter",
        help="Brightness, contrast and saturation jitter, 0 off.",
        rich_help_panel=AUGMENTATION,
    ),
]
AutoAugment = Annotated[
    str | None,
    typer.Option(
        "--auto-augment",
        help="timm's RandAugment or AutoAugment, e.g. rand-m9-mstd0.5 (default none; timm: --aa).",
        rich_help_panel=AUGMENTATION,
    ),
]
Reprob = Annotated[
    float | None,
    typer.Option(
        "--reprob", help="Random erasing probability (default 0).", rich_help_panel=AUGMENTATION
    ),
]
Interpolation = Annotated[
    str | None,
    typer.Option(
        "--interpolation",
        help="Resampling: bicubic (default), bilinear, random.",
        rich_help_panel=AUGMENTATION,
    ),
]
SaveFrequency = Annotated[
    int | None,
    typer.Option(
        "--save-frequency",
        "-s",
        help="Keep <name>_e<N>.pth every N epochs, 0 never (default {save_frequency}).",
        rich_help_panel=RUN,
    ),
]


# timm train.py's names for the settings above, taken as they are and shown in their help only
# (at 80 columns a second name beside each would squeeze the panels' text): see
# `requests.TIMM_ALIASES`, which maps each to its setting.
def _timm_name(flag: str, kind: type, setting: str, panel: str) -> object:
    return Annotated[
        kind | None,
        typer.Option(flag, hidden=True, help=f"timm's name for {setting}.", rich_help_panel=panel),
    ]


TimmOpt = _timm_name("--opt", str, "--optimizer", OPTIMISATION)
TimmSched = _timm_name("--sched", str, "--schedule", OPTIMISATION)
TimmSmoothing = _timm_name("--smoothing", float, "--label-smoothing", LOSS)
TimmMixup = _timm_name("--mixup", float, "--mixup-alpha", AUGMENTATION)
TimmCutmix = _timm_name("--cutmix", float, "--cutmix-alpha", AUGMENTATION)
TimmAa = _timm_name("--aa", str, "--auto-augment", AUGMENTATION)
