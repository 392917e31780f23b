"""`mlkd distill`: multi-level knowledge distillation into any timm student."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlkd_cli.core.console import Reporter
from mlkd_cli.engine.config import DistillConfig
from mlkd_cli.engine.distiller import distill_student, plan_distillation
from mlkd_cli.engine.launch import launcher_rank
from mlkd_cli.engine.trainer import launch_training

from . import options as opt

# Defaults live in the config class; the help text reads them from there.
D = DistillConfig(dataset="")


def distill(
    dataset: opt.Dataset = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="A single teacher's timm model name.")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", "-c", help="A single teacher's checkpoint.")
    ] = None,
    ensemble: Annotated[
        Path | None,
        typer.Option("--ensemble", help="Ensemble teacher file (default: config.json here)."),
    ] = None,
    models_dir: Annotated[
        Path | None,
        typer.Option("--models-dir", help="Where the ensemble file's names resolve."),
    ] = None,
    student: Annotated[
        str | None, typer.Option("--student", help=f"Student timm model (default {D.student}).")
    ] = None,
    student_checkpoint: Annotated[
        Path | None,
        typer.Option("--student-checkpoint", help="Start the student from local weights."),
    ] = None,
    pretrained: Annotated[
        bool | None,
        typer.Option("--pretrained/--no-pretrained", help="Start the student from timm's hub."),
    ] = None,
    exits: Annotated[
        str | None,
        typer.Option("--exits", help="Stages that get exits, e.g. 0,1,2 (default: all but last)."),
    ] = None,
    exit_weights: Annotated[
        str | None, typer.Option("--exit-weights", help="Loss weight per exit (default 1 each).")
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
            help="Images per optimiser step over all processes (default: 128 as the original, "
            "or one step's worth if larger).",
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", "-e", help=f"Epochs (default {D.epochs}).")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", "-n", help=f"Run name (default {D.name}).")
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(
            "--alpha", help=f"Weight of the KD term vs cross-entropy (default {D.alpha:g})."
        ),
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option("--temperature", help=f"KD temperature (default {D.temperature:g})."),
    ] = None,
    mixup_alpha: Annotated[
        float | None, typer.Option("--mixup-alpha", help=f"(default {D.mixup_alpha:g})")
    ] = None,
    cutmix_alpha: Annotated[
        float | None, typer.Option("--cutmix-alpha", help=f"(default {D.cutmix_alpha:g})")
    ] = None,
    label_smoothing: Annotated[
        float | None,
        typer.Option("--label-smoothing", help=f"Of the CE term (default {D.label_smoothing:g})."),
    ] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", help=f"AdamW rate (default {D.lr:g}).")
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option("--weight-decay", help=f"(default {D.weight_decay:g})")
    ] = None,
    warmup_epochs: Annotated[
        float | None, typer.Option("--warmup-epochs", help=f"(default {D.warmup_epochs:g})")
    ] = None,
    save_frequency: Annotated[
        int | None,
        typer.Option(
            "--save-frequency",
            "-s",
            help=f"Keep <name>_e<N>.pth every N epochs, 0 never (default {D.save_frequency}).",
        ),
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
    teacher_cache: Annotated[
        bool | None,
        typer.Option(
            "--teacher-cache/--no-teacher-cache",
            help="Compute the teacher's outputs once and reuse them every epoch (needs "
            "--no-augment and no Mixup/CutMix).",
        ),
    ] = None,
    resume: opt.Resume = False,
    overwrite: opt.Overwrite = False,
    preset: opt.Preset = None,
    quiet: opt.Quiet = False,
    json: opt.Json = False,
) -> None:
    """Distil a teacher (model or ensemble) into a multi-exit student; saves a plain timm model."""
    flags = opt.given(
        dataset=dataset,
        teacher_model=model,
        teacher_checkpoint=checkpoint,
        ensemble=ensemble,
        models_dir=models_dir,
        student=student,
        student_checkpoint=student_checkpoint,
        pretrained=pretrained,
        exits=exits,
        exit_weights=exit_weights,
        batch_size=batch_size,
        effective_batch_size=effective_batch_size,
        epochs=epochs,
        name=name,
        alpha=alpha,
        temperature=temperature,
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        label_smoothing=label_smoothing,
        lr=lr,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        save_frequency=save_frequency,
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
        teacher_cache=teacher_cache,
    )
    cfg = opt.training_config(
        DistillConfig,
        "distill",
        preset,
        flags,
        resume=resume,
        overwrite=overwrite,
        quiet=quiet,
        json=json,
    )
    plan = plan_distillation(cfg)
    summary = launch_training(distill_student, plan)
    report = Reporter(cfg.output, rank=launcher_rank())
    best = summary["best_row"] or {}
    rows = [["final", _pct(best.get("val_top1")), best.get("val_nll")]]
    for i in range(1, len(summary["exits"]) + 1):
        rows.append([f"exit {i}", _pct(best.get(f"exit{i}_top1")), best.get(f"exit{i}_nll")])
    report.table(
        f"{summary['name']}: best epoch {summary['best_epoch']}/{summary['epochs']}",
        ["head", "val top-1 %", "val NLL"],
        rows,
    )
    files = summary["files"]
    report.info(
        f"saved {files['best']} (plain timm, exits dropped); history {files['history_csv']}"
    )
    report.result(summary)


def _pct(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}"
