"""`mlkd teacher`: train (fine-tune) a teacher model on a dataset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar

import typer

from mlkd_cli import api
from mlkd_cli.core.console import Reporter, saved_lines
from mlkd_cli.core.constants import DEFAULT_VIEWS, SHARD_SIZE
from mlkd_cli.engine.config import DistillConfig, TeacherTrainConfig

from . import options as opt
from .requests import TrainingFlags, flag_names, takes

app = typer.Typer(help="Train teacher models.", no_args_is_help=True)


@dataclass(kw_only=True)
class TeacherTrainRequest(TrainingFlags):
    """`mlkd teacher train`'s flags: each a `TeacherTrainConfig` setting of its name."""

    # Defaults live in the config class; the help text reads them from there.
    DEFAULTS: ClassVar[TeacherTrainConfig] = TeacherTrainConfig(dataset="", model="")
    SECTION: ClassVar[str] = "teacher"

    dataset: opt.Dataset = None
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="timm model name, e.g. resnet50.", rich_help_panel=opt.MODEL
        ),
    ] = None
    pretrained: Annotated[
        bool | None,
        typer.Option(
            "--pretrained/--no-pretrained",
            help="Start from timm's hub weights.",
            rich_help_panel=opt.MODEL,
        ),
    ] = None
    init_checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--init-checkpoint",
            help="Start from local weights (.pth or .safetensors).",
            rich_help_panel=opt.MODEL,
        ),
    ] = None
    init_ema: Annotated[
        bool | None,
        typer.Option(
            "--init-ema/--no-init-ema",
            help="An --init-checkpoint saved by timm's train.py: start from its EMA weights "
            "(the default) or the raw ones.",
            rich_help_panel=opt.MODEL,
        ),
    ] = None
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            "-n",
            help="Run name: files are <name>*.pth in --output-dir.",
            rich_help_panel=opt.RUN,
        ),
    ] = None


@app.command("train")
@takes(TeacherTrainRequest)
def train(request: TeacherTrainRequest) -> None:
    """Fine-tune any timm model on a dataset; saves the best model by validation top-1."""
    cfg = request.config()
    result = api.train_teacher(cfg)
    if result is None:  # a torchrun rank other than 0
        return
    summary = result.record
    report = Reporter(cfg.output)
    best = summary["best_row"] or {}
    report.table(
        f"teacher {summary['name']}: {summary['model']} on {summary['dataset']}",
        ["best epoch", "val top-1 %", "val top-5 %", "val NLL", "img/s"],
        [
            [
                f"{summary['best_epoch']}/{summary['epochs']}",
                _pct(best.get("val_top1")),
                _pct(best.get("val_top5")),
                best.get("val_nll"),
                _rate(best.get("images_per_s")),
            ]
        ],
    )
    for line in saved_lines(summary["files"]):
        report.info(line)
    report.result(summary)


# What a labelling takes of the training options: data, the augmentation its views are drawn
# with, the pipeline, seed and batch, and how processes run.
LABEL_OPTIONS = {
    "data_dir", "img_size", "val_fraction", "download", "batch_size", "augment", "scale",
    "ratio", "hflip", "vflip", "color_jitter", "auto_augment", "reprob", "interpolation",
    "world_size", "device", "precision", "workers", "max_restarts", "data_pipeline", "preset",
    "seed", "quiet", "json", "timm_aa",
}  # fmt: skip
STORE = opt.STORE


@dataclass(kw_only=True)
class LabelRequest(TrainingFlags):
    """`mlkd teacher label`'s flags: the store's own, the teacher, and `LABEL_OPTIONS` of the
    training flags (each a `DistillConfig` setting); it names and continues its files itself."""

    DEFAULTS: ClassVar[DistillConfig] = DistillConfig(dataset="")
    SECTION: ClassVar[str] = "distill"
    COMMAND_ONLY: ClassVar[frozenset[str]] = frozenset({"output", "views", "top_k", "shard_size"})

    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="The store folder to write.", rich_help_panel=STORE),
    ]
    dataset: opt.Dataset = None
    views: Annotated[
        int,
        typer.Option("--views", help="Augmented views per image.", rich_help_panel=STORE),
    ] = DEFAULT_VIEWS
    top_k: Annotated[
        int | None,
        typer.Option(
            "--top-k",
            help="Largest logits kept per view (default: every class up to 100, else 10).",
            rich_help_panel=STORE,
        ),
    ] = None
    shard_size: Annotated[
        int,
        typer.Option(
            "--shard-size", help="Images per shard (what a resume redoes).", rich_help_panel=STORE
        ),
    ] = SHARD_SIZE
    ensemble: opt.EnsembleFile = None
    teacher_model: opt.TeacherModel = None
    teacher_checkpoint: opt.TeacherCheckpoint = None
    models_dir: opt.ModelsDir = None
    teacher_img_size: opt.TeacherImgSize = None


@app.command("label")
@takes(LabelRequest, without=flag_names(TrainingFlags) - LABEL_OPTIONS)
def label(request: LabelRequest) -> None:
    """Store a teacher's outputs for numbered augmented views of every training image, once."""
    cfg = request.config()
    labelled = api.label(
        cfg,
        output=request.output,
        views=request.views,
        top_k=request.top_k,
        shard_size=request.shard_size,
    )
    if labelled is None:  # a torchrun rank other than 0
        return
    report = Reporter(cfg.output)
    report.info(
        f"{labelled.store}: {labelled.images} images x {labelled.views} views, top "
        f"{labelled.top_k} logits each, {labelled.shards} shards ({labelled.skipped} already done)"
    )
    report.result(labelled.record)


def _pct(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}"


def _rate(value: float | None) -> str | None:
    return None if value is None else f"{value:.0f}"
