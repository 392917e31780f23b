"""`mlkd distill`: multi-level knowledge distillation into any timm student."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar

import typer

from mlkd_cli import api
from mlkd_cli.core.console import OutputOptions, Reporter, saved_lines
from mlkd_cli.core.errors import UserError
from mlkd_cli.engine.config import DistillConfig
from mlkd_cli.losses.registry import LOSSES

from . import options as opt
from .requests import TrainingFlags, takes


@dataclass(kw_only=True)
class DistillRequest(TrainingFlags):
    """`mlkd distill`'s flags: each a `DistillConfig` setting of its name but `COMMAND_ONLY`."""

    # Defaults live in the config class; the help text reads them from there.
    DEFAULTS: ClassVar[DistillConfig] = DistillConfig(dataset="")
    SECTION: ClassVar[str] = "distill"
    COMMAND_ONLY: ClassVar[frozenset[str]] = frozenset({"loss_param", "list_losses"})

    dataset: opt.Dataset = None
    ensemble: opt.EnsembleFile = None
    teacher_model: opt.TeacherModel = None
    teacher_checkpoint: opt.TeacherCheckpoint = None
    teacher_cache: Annotated[
        bool | None,
        typer.Option(
            "--teacher-cache/--no-teacher-cache",
            help="Compute the teacher's outputs once and reuse them every epoch (needs "
            "--no-augment and no Mixup/CutMix).",
            rich_help_panel=opt.TEACHER,
        ),
    ] = None
    models_dir: opt.ModelsDir = None
    teacher_img_size: opt.TeacherImgSize = None
    soft_labels: opt.SoftLabels = None
    teacher_ema: Annotated[
        bool | None,
        typer.Option(
            "--teacher-ema/--no-teacher-ema",
            help="Teachers saved by timm's train.py: use their EMA weights (state_dict_ema; "
            "the default) or the raw ones.",
            rich_help_panel=opt.TEACHER,
        ),
    ] = None
    student: opt.Student = None
    student_checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--student-checkpoint",
            help="Start the student from local weights.",
            rich_help_panel=opt.STUDENT,
        ),
    ] = None
    pretrained: Annotated[
        bool | None,
        typer.Option(
            "--pretrained/--no-pretrained",
            help="Start the student from timm's hub.",
            rich_help_panel=opt.STUDENT,
        ),
    ] = None
    exits: opt.Exits = None
    exit_head: opt.ExitHead = None
    exit_weights: Annotated[
        str | None,
        typer.Option(
            "--exit-weights",
            help="Loss weight per exit (default 1 each).",
            rich_help_panel=opt.STUDENT,
        ),
    ] = None
    alpha: opt.Alpha = None
    loss: Annotated[
        str | None,
        typer.Option(
            "--loss",
            help="What every head learns from the teacher: kd (Hinton KD, the default), dkd "
            "(decoupled KD), dist (DIST), kd+feature, dkd+feature (plus the exits' features), "
            "original; see --list-losses.",
            rich_help_panel=opt.LOSS,
        ),
    ] = None
    loss_param: Annotated[
        list[str] | None,
        typer.Option(
            "--loss-param",
            help="A parameter of the chosen loss, NAME=VALUE (repeat for more); "
            "--list-losses names them.",
            rich_help_panel=opt.LOSS,
        ),
    ] = None
    list_losses: Annotated[
        bool,
        typer.Option(
            "--list-losses",
            help="List the losses with their parameters and defaults, and exit.",
            rich_help_panel=opt.LOSS,
        ),
    ] = False
    temperature: opt.Temperature = None
    name: Annotated[
        str | None,
        typer.Option("--name", "-n", help="Run name (default {name}).", rich_help_panel=opt.RUN),
    ] = None
    recipe: Annotated[
        str | None,
        typer.Option(
            "--recipe",
            help="mlkd (default): settings that hold up on small runs and your own data; "
            "original: the original project's training, setting for setting (README).",
            rich_help_panel=opt.RUN,
        ),
    ] = None


@takes(DistillRequest)
def distill(request: DistillRequest) -> None:
    """Distil a teacher (model or ensemble) into a multi-exit student; saves a plain timm model."""
    if request.list_losses:
        show_losses(request.output_options)
        return
    cfg = request.config(loss_params=parse_loss_params(request.loss_param))
    result = api.distill(cfg)
    if result is None:  # a torchrun rank other than 0
        return
    summary = result.record
    report = Reporter(cfg.output)
    best = summary["best_row"] or {}
    rows = [["final", _pct(best.get("val_top1")), best.get("val_nll")]]
    for i in range(1, len(summary["exits"]) + 1):
        rows.append([f"exit {i}", _pct(best.get(f"exit{i}_top1")), best.get(f"exit{i}_nll")])
    report.table(
        f"{summary['name']}: best epoch {summary['best_epoch']}/{summary['epochs']}",
        ["head", "val top-1 %", "val NLL"],
        rows,
    )
    for line in saved_lines(summary["files"], "plain timm, exits dropped"):
        report.info(line)
    report.result(summary)


def parse_loss_params(pairs: list[str] | None) -> dict[str, float] | None:
    """`--loss-param NAME=VALUE ...` as a mapping; None when none is given."""
    if not pairs:
        return None
    params: dict[str, float] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        try:
            value = float(text)
        except ValueError:
            value = None
        if not sep or not key.strip() or value is None:
            raise UserError(
                f"--loss-param takes NAME=VALUE with a number, e.g. nckd_weight=4, not {pair!r}"
            )
        params[key.strip()] = value
    return params


def show_losses(output: OutputOptions) -> None:
    """The registered losses, what each learns and its parameters with their defaults."""
    report = Reporter(output)
    losses = [
        {
            "loss": name,
            "summary": cls.SUMMARY,
            "features": cls.has_features(),
            "params": {p.name: p.default for p in cls.PARAMS},
            "param_help": {p.name: p.help for p in cls.PARAMS},
        }
        for name, cls in LOSSES.items()
    ]
    report.table(
        "losses (--loss NAME; --loss-param NAME=VALUE)",
        ["loss", "what every head learns", "parameters (default)"],
        [
            [
                row["loss"],
                row["summary"],
                "\n".join(f"{k}={v:g}: {row['param_help'][k]}" for k, v in row["params"].items())
                or "-",
            ]
            for row in losses
        ],
    )
    report.result({"losses": losses})


def _pct(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}"
