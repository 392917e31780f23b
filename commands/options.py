"""Option declarations shared by the command modules, so every command spells them alike."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from mlkd_cli.core.console import OutputOptions
from mlkd_cli.engine.config import build_config, config_field_names
from mlkd_cli.presets import preset_section

C = TypeVar("C")

Preset = Annotated[
    str | None,
    typer.Option("--preset", help="A shipped preset name or a YAML file; flags given here win."),
]
Dataset = Annotated[
    str | None, typer.Option("--dataset", "-d", help="Dataset name (see `mlkd data list`).")
]
DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Folder holding the dataset files (default data)."),
]
Download = Annotated[
    bool | None,
    typer.Option(
        "--download/--no-download", help="Download the dataset if absent (needs a network)."
    ),
]
WorldSize = Annotated[
    int | None,
    typer.Option("--world-size", help="Processes to spawn (one per GPU; gloo on CPU) (default 1)."),
]
LogTo = Annotated[
    str | None,
    typer.Option(
        "--log-to",
        help="Also send each epoch's metrics to: tensorboard (writes <output-dir>/"
        "<name>_tensorboard/; needs pip install 'mlkd[tensorboard]').",
    ),
]
MaxRestarts = Annotated[
    int | None,
    typer.Option(
        "--max-restarts",
        help="Restart the workers up to N times when one dies, each time from the last saved "
        "state (default 0; under torchrun, torchrun's own --max-restarts applies).",
    ),
]
Device = Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda (default auto).")]
Seed = Annotated[int | None, typer.Option("--seed", help="Random seed (default 0).")]
Workers = Annotated[
    int | None, typer.Option("--workers", help="Data-loading workers per process (default auto).")
]
OutputDir = Annotated[
    Path | None,
    typer.Option("--output-dir", help="Where checkpoints and histories go (default models)."),
]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run from <name>_last.pth.")]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace an existing run of the same name.")
]
ImgSize = Annotated[
    int | None, typer.Option("--img-size", help="Training resolution (default: the dataset's).")
]
ValFraction = Annotated[
    float | None,
    typer.Option(
        "--val-fraction", help="Share of each class held out for validation (default 0.1)."
    ),
]
PlainModel = Annotated[
    str | None, typer.Option("--model", "-m", help="Architecture, for plain state dicts.")
]
PlainClasses = Annotated[
    int | None, typer.Option("--num-classes", help="Class count, for plain state dicts.")
]
SkipNonfinite = Annotated[
    bool | None,
    typer.Option(
        "--skip-nonfinite/--stop-nonfinite",
        help="Skip optimiser steps whose loss is NaN/inf instead of stopping the run.",
    ),
]
SaveEverySteps = Annotated[
    int | None,
    typer.Option(
        "--save-every-steps",
        help="Also write the resumable training state every N optimiser steps (default 0: "
        "at epoch ends only).",
    ),
]
StrictData = Annotated[
    bool | None,
    typer.Option(
        "--strict-data/--skip-unreadable",
        help="Stop at an image file that cannot be decoded instead of leaving it out.",
    ),
]
DataPipeline = Annotated[
    str | None,
    typer.Option(
        "--data-pipeline",
        help="device: hold an in-memory dataset on the GPU and augment it there; cpu: loader "
        "workers; auto (default): device on CUDA for cifar-10/100 and digits.",
    ),
]
Augment = Annotated[
    bool | None,
    typer.Option(
        "--augment/--no-augment",
        help="Random crop, flip and colour jitter on training images (default on).",
    ),
]
Compile = Annotated[
    bool | None,
    typer.Option("--compile/--no-compile", help="torch.compile the models (default off)."),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print results only, no progress.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")]


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
