"""`mlkd teacher`: train (fine-tune) a teacher model on a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlkd_cli.core.console import Reporter
from mlkd_cli.engine.config import TeacherTrainConfig
from mlkd_cli.engine.launch import launcher_rank
from mlkd_cli.engine.trainer import launch_training, plan_teacher_training, train_teacher

from . import options as opt

app = typer.Typer(help="Train teacher models.", no_args_is_help=True)
# Defaults live in the config class; the help text reads them from there.
D = TeacherTrainConfig(dataset="", model="")


@app.command("train")
def train(
    dataset: opt.Dataset = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="timm model name, e.g. resnet50.")
    ] = None,
    name: Annotated[
        str | None,
        typer.Option("--name", "-n", help="Run name: files are <output-dir>/<name>*.pth."),
    ] = None,
    pretrained: Annotated[
        bool | None,
        typer.Option("--pretrained/--no-pretrained", help="Start from timm's hub weights."),
    ] = None,
    init_checkpoint: Annotated[
        Path | None,
        typer.Option("--init-checkpoint", help="Start from local weights (.pth or .safetensors)."),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", "-e", help=f"Epochs (default {D.epochs}).")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size", "-b", help=f"Images per process per step (default {D.batch_size})."
        ),
    ] = None,
    effective_batch_size: Annotated[
        int | None,
        typer.Option(
            "--effective-batch-size",
            help="Images per optimiser step over all processes (gradient accumulation).",
        ),
    ] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", help=f"Peak learning rate (default {D.lr:g}).")
    ] = None,
    weight_decay: Annotated[
        float | None,
        typer.Option("--weight-decay", help=f"AdamW weight decay (default {D.weight_decay:g})."),
    ] = None,
    warmup_epochs: Annotated[
        float | None,
        typer.Option(
            "--warmup-epochs", help=f"Linear warmup epochs (default {D.warmup_epochs:g})."
        ),
    ] = None,
    label_smoothing: Annotated[
        float | None,
        typer.Option("--label-smoothing", help=f"Label smoothing (default {D.label_smoothing:g})."),
    ] = None,
    mixup_alpha: Annotated[
        float | None,
        typer.Option("--mixup-alpha", help=f"Mixup alpha, 0 off (default {D.mixup_alpha:g})."),
    ] = None,
    cutmix_alpha: Annotated[
        float | None,
        typer.Option("--cutmix-alpha", help=f"CutMix alpha, 0 off (default {D.cutmix_alpha:g})."),
    ] = None,
    img_size: opt.ImgSize = None,
    val_fraction: opt.ValFraction = None,
    data_dir: opt.DataDir = None,
    download: opt.Download = None,
    world_size: opt.WorldSize = None,
    max_restarts: opt.MaxRestarts = None,
    log_to: opt.LogTo = None,
    device: opt.Device = None,
    seed: opt.Seed = None,
    workers: opt.Workers = None,
    output_dir: opt.OutputDir = None,
    skip_nonfinite: opt.SkipNonfinite = None,
    save_every_steps: opt.SaveEverySteps = None,
    strict_data: opt.StrictData = None,
    data_pipeline: opt.DataPipeline = None,
    augment: opt.Augment = None,
    compile_models: opt.Compile = None,
    resume: opt.Resume = False,
    overwrite: opt.Overwrite = False,
    preset: opt.Preset = None,
    quiet: opt.Quiet = False,
    json: opt.Json = False,
) -> None:
    """Fine-tune any timm model on a dataset; saves the best model by validation top-1."""
    flags = opt.given(
        dataset=dataset,
        model=model,
        name=name,
        pretrained=pretrained,
        init_checkpoint=init_checkpoint,
        epochs=epochs,
        batch_size=batch_size,
        effective_batch_size=effective_batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing,
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        img_size=img_size,
        val_fraction=val_fraction,
        data_dir=data_dir,
        download=download,
        world_size=world_size,
        max_restarts=max_restarts,
        log_to=log_to,
        device=device,
        seed=seed,
        workers=workers,
        output_dir=output_dir,
        skip_nonfinite=skip_nonfinite,
        save_every_steps=save_every_steps,
        strict_data=strict_data,
        data_pipeline=data_pipeline,
        augment=augment,
        compile=compile_models,
    )
    cfg = opt.training_config(
        TeacherTrainConfig,
        "teacher",
        preset,
        flags,
        resume=resume,
        overwrite=overwrite,
        quiet=quiet,
        json=json,
    )
    plan = plan_teacher_training(cfg)
    summary = launch_training(train_teacher, plan)
    report = Reporter(cfg.output, rank=launcher_rank())
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
    files = summary["files"]
    report.info(
        f"saved {files['best']}; history {files['history_csv']}; resume state {files['last']}"
    )
    report.result(summary)


def _pct(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}"


def _rate(value: float | None) -> str | None:
    return None if value is None else f"{value:.0f}"
