"""`mlkd pipeline`: teachers, ensemble, student, baseline, evaluation and export in one command."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from mlkd_cli import api
from mlkd_cli.core.console import Reporter

from . import options as opt
from .requests import OutputFlags, RestartFlags, RunFlags, takes


@dataclass(kw_only=True)
class PipelineRequest(OutputFlags, RestartFlags, RunFlags):
    """`mlkd pipeline`'s flags: a preset names every stage's settings; without one, `-d`
    chooses a recipe for the data and writes it beside the run."""

    preset: Annotated[
        str | None,
        typer.Option(
            "--preset",
            help="A shipped preset name or a YAML file (default: a recipe chosen for -d).",
            rich_help_panel=opt.PIPELINE,
        ),
    ] = None
    dataset: opt.Dataset = None
    run_dir: Annotated[
        Path | None,
        typer.Option(
            "--run-dir",
            help="The run folder (default runs/<preset>, or runs/<name of --data-dir>).",
            rich_help_panel=opt.PIPELINE,
        ),
    ] = None
    baseline: Annotated[
        bool | None,
        typer.Option(
            "--baseline/--no-baseline",
            help="Also train a cross-entropy-only student (default: as the preset).",
            rich_help_panel=opt.PIPELINE,
        ),
    ] = None
    data_dir: opt.DataDir = None
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace the run folder's recipe.yaml when the data or machine chose another.",
            rich_help_panel=opt.PIPELINE,
        ),
    ] = False


@takes(PipelineRequest)
def pipeline(request: PipelineRequest) -> None:
    """Run the whole method from a preset, or on your data with a recipe chosen for it
    (`-d imagefolder --data-dir DIR`); a stopped run continues where it stopped."""
    out = request.output_options
    result = api.pipeline(
        request.preset,
        dataset=request.dataset,
        run_dir=request.run_dir,
        data_dir=request.data_dir,
        overwrite=request.overwrite,
        baseline=request.baseline,
        world_size=request.world_size,
        device=request.device,
        precision=request.precision,
        workers=request.workers,
        max_restarts=request.max_restarts,
        progress=out,
    )
    if result is None:  # a torchrun rank other than 0
        return
    summary = result.record
    report = Reporter(out)
    report.table(
        f"{summary['preset']}: test split ({summary['run_dir']})",
        ["model", "role", "params (M)", "top-1 %", "NLL", "ECE", "MACs %", "img/s"],
        [
            [
                r["name"],
                r["role"],
                None if r["params_m"] is None else f"{r['params_m']:.2f}",
                f"{r['top1']:.2f}",
                f"{r['nll']:.4f}",
                None if r["ece"] is None else f"{r['ece']:.4f}",
                None if r.get("macs_pct") is None else f"{r['macs_pct']:.1f}",
                None if r["images_per_s"] is None else f"{r['images_per_s']:.0f}",
            ]
            for r in summary["rows"]
        ],
    )
    cascade = next((r for r in summary["rows"] if r["role"] == "cascade"), None)
    if cascade is not None:
        values = ",".join(f"{v:g}" for v in cascade["thresholds"])
        speed = ""
        if cascade["model_images_per_s"] and cascade["plain_model_images_per_s"]:
            speed = (
                f"; {cascade['model_images_per_s']:.0f} img/s against "
                f"{cascade['plain_model_images_per_s']:.0f} for the plain student (the model "
                "alone, images in memory)"
            )
        report.info(
            f"early exit at {cascade.get('exit_rule', 'max_softmax')} thresholds {values} (chosen "
            "on the validation split): "
            f"{cascade['macs_pct']:.1f} % of the student's MACs{speed}"
        )
    report.info(f"figure {summary['comparison_png']}; student exported to {summary['export']}")
    gain = summary["distillation_gain"]
    if gain is not None:  # last, where a reader looks first: what distillation gave
        report.table(
            "distillation against cross-entropy training of the same student (test split)",
            ["", "top-1 %", "NLL"],
            [
                ["distilled student", f"{gain['student_top1']:.2f}", f"{gain['student_nll']:.4f}"],
                [
                    "cross-entropy baseline",
                    f"{gain['baseline_top1']:.2f}",
                    f"{gain['baseline_nll']:.4f}",
                ],
                ["difference", f"{gain['top1_points']:+.2f}", f"{gain['nll_change']:+.4f}"],
            ],
        )
    report.result(summary)
