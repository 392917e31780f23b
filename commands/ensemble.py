"""`mlkd ensemble`: fit a weighted teacher ensemble on held-out data, and evaluate it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mlkd_cli import api
from mlkd_cli.core.console import Reporter

from . import options as opt
from .requests import OutputFlags, RunFlags, takes

if TYPE_CHECKING:  # the engine loads when a command runs, not for --help
    from mlkd_cli.passes.ensemble import LogitsRequest

app = typer.Typer(help="Build and evaluate weighted teacher ensembles.", no_args_is_help=True)

Config = Annotated[
    Path,
    typer.Argument(help="Ensemble file: the original's JSON or a members list (YAML/JSON)."),
]
ModelsDir = Annotated[
    Path | None,
    typer.Option(
        "--models-dir",
        help="Where the original format's names resolve, as <dir>/<name>.pth "
        "(default: models/ beside the file).",
        rich_help_panel=opt.ENSEMBLE,
    ),
]
BatchSize = Annotated[
    int,
    typer.Option(
        "--batch-size", "-b", help="Images per process per step.", rich_help_panel=opt.PROCESSES
    ),
]
ValFraction = Annotated[
    float | None,
    typer.Option(
        "--val-fraction",
        help="Held-out share of the training data (default: as the members').",
        rich_help_panel=opt.DATA,
    ),
]


def _render(
    report: Reporter, title: str, rows: list[dict[str, Any]], member_weights: list[float]
) -> None:
    lines = []
    for i, row in enumerate(rows):
        weight = member_weights[i] if i < len(member_weights) else None
        lines.append(
            [
                row["name"],
                row["arch"],
                None if weight is None else f"{weight:.4f}",
                f"{row['top1']:.2f}",
                f"{row['nll']:.4f}",
            ]
        )
    report.table(title, ["member", "architecture", "weight", "top-1 %", "NLL"], lines)


@dataclass(kw_only=True)
class PassFlags:
    """The data and batching flags both commands take."""

    dataset: opt.Dataset = None
    data_dir: opt.DataDir = None
    models_dir: ModelsDir = None
    val_fraction: ValFraction = None
    batch_size: BatchSize = 128
    teacher_ema: Annotated[
        bool,
        typer.Option(
            "--teacher-ema/--no-teacher-ema",
            help="Members saved by timm's train.py: their EMA weights (state_dict_ema; "
            "the default) or the raw ones.",
            rich_help_panel=opt.ENSEMBLE,
        ),
    ] = True


@dataclass(kw_only=True)
class EnsembleRequest(OutputFlags, RunFlags, PassFlags):
    """What `ensemble build` and `ensemble eval` share: a logits pass over a split."""

    def logits_request(self, config_path: Path, split: str, dataset: str | None) -> LogitsRequest:
        """The logits pass both commands run."""
        from mlkd_cli.passes.ensemble import LogitsRequest

        return LogitsRequest(
            config_path=config_path,
            models_dir=self.models_dir,
            dataset=dataset,
            data_dir=self.data_dir or Path("data"),
            split=split,
            val_fraction=self.val_fraction,
            batch_size=self.batch_size,
            world_size=self.world_size or 1,
            device=self.device or "auto",
            precision=self.precision or "auto",
            teacher_ema=self.teacher_ema,
            workers=self.workers,
            output=self.output_options,
        )


@dataclass(kw_only=True)
class EnsembleBuildRequest(EnsembleRequest):
    """`mlkd ensemble build`'s flags."""

    config_path: Config = Path("config.json")
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write the fitted file here instead.",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = None
    in_place: Annotated[
        bool,
        typer.Option(
            "--in-place",
            help="Rewrite CONFIG (the default without --output).",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = False
    fit_temperature: Annotated[
        bool | None,
        typer.Option(
            "--fit-temperature/--no-fit-temperature",
            help="Also fit a temperature, weakly pulled towards 1 (default: the preset's, or no).",
            rich_help_panel=opt.ENSEMBLE,
        ),
    ] = None
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset",
            help="A shipped preset name or a YAML file: its dataset and ensemble settings, "
            "under the flags given.",
            rich_help_panel=opt.ENSEMBLE,
        ),
    ] = None
    overwrite: opt.OverwriteFiles = False


@dataclass(kw_only=True)
class EnsembleEvalRequest(EnsembleRequest):
    """`mlkd ensemble eval`'s flags."""

    config_path: Config = Path("config.json")
    split: Annotated[
        opt.SplitChoice, typer.Option("--split", help="Which split.", rich_help_panel=opt.DATA)
    ] = opt.SplitChoice.val


@app.command("build")
@takes(EnsembleBuildRequest)
def build(request: EnsembleBuildRequest) -> None:
    """Fit member weights on the held-out validation split and write them into the file."""
    r = request
    fitted = api.build_ensemble(
        r.config_path,
        output=r.output,
        in_place=r.in_place,
        dataset=r.dataset,
        data_dir=r.data_dir,
        models_dir=r.models_dir,
        val_fraction=r.val_fraction,
        batch_size=r.batch_size,
        teacher_ema=r.teacher_ema,
        fit_temperature=r.fit_temperature,
        preset=r.preset,
        overwrite=r.overwrite,
        world_size=r.world_size,
        device=r.device,
        precision=r.precision,
        workers=r.workers,
        progress=r.output_options,
    )
    if fitted is None:  # a torchrun rank other than 0
        return
    report = Reporter(r.output_options)
    title = f"ensemble on {fitted.dataset} val ({fitted.images} images)"
    _render(report, title, fitted.members, fitted.weights)
    temperature = (
        f", temperature {fitted.temperature:.4f}" if fitted.temperature is not None else ""
    )
    report.info(
        f"held-out NLL {fitted.equal_nll:.4f} with equal weights, {fitted.fitted_nll:.4f} fitted"
        f"{temperature}; wrote {fitted.written}"
    )
    report.result(fitted.record)


@app.command("eval")
@takes(EnsembleEvalRequest)
def evaluate(request: EnsembleEvalRequest) -> None:
    """Every member's and the ensemble's top-1 and NLL on a split, with the file's weights."""
    from mlkd_cli.passes.ensemble import run_logits_pass

    out = request.output_options
    split_name = request.split
    run = run_logits_pass(request.logits_request(request.config_path, split_name, request.dataset))
    if run is None:
        return
    config, plan, labels = run.config, run.plan, run.labels
    rows = run.rows("file weights", config.weights, config.temperature)
    report = Reporter(out)
    _render(
        report,
        f"ensemble on {plan.dataset} {split_name} ({len(labels)} images)",
        rows,
        config.weights,
    )
    report.result(
        {
            "dataset": plan.dataset,
            "split": split_name,
            "images": len(labels),
            "weights": config.weights,
            "temperature": config.temperature,
            "rows": rows,
        }
    )
