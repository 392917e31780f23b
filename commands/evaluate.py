"""`mlkd eval`: honest numbers for a checkpoint, several checkpoints, or an ensemble file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from mlkd_cli.core.console import Reporter
from mlkd_cli.core.errors import UserError
from mlkd_cli.core.metrics import confusion_matrix, reliability_bins
from mlkd_cli.engine.evaluation import EvalJob, EvalRequest, Measured, measure, plan_eval_job
from mlkd_cli.engine.launch import launcher_rank

from . import options as opt


@opt.with_options(opt.run_options(), opt.output_options())
def evaluate(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(help="Checkpoints (.pth, .safetensors) or ensemble files to evaluate."),
    ],
    dataset: opt.Dataset = None,
    split: Annotated[opt.SplitChoice, typer.Option("--split", help="Which split.")] = (
        opt.SplitChoice.test
    ),
    data_dir: opt.DataDir = None,
    model: opt.PlainModel = None,
    num_classes: opt.PlainClasses = None,
    img_size: opt.ImgSize = None,
    models_dir: Annotated[
        Path | None, typer.Option("--models-dir", help="Where an ensemble file's names resolve.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per step.")] = 128,
    plots: Annotated[
        Path | None,
        typer.Option("--plots", help="Write a confusion matrix and a reliability diagram here."),
    ] = None,
    *,
    shared: opt.Shared,
) -> None:
    """Top-1, top-5, NLL, calibration (ECE) and the worst classes of a model on a split."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
        if not os.access(plots, os.W_OK):
            raise UserError(f"--plots folder {plots} is not writable")
    out = shared.output
    jobs = [
        plan_eval_job(
            EvalRequest(
                path=path,
                dataset=dataset,
                data_dir=data_dir or Path("data"),
                split=split.value,
                arch=model,
                num_classes=num_classes,
                img_size=img_size,
                models_dir=models_dir,
                batch_size=batch_size,
                workers=shared["workers"],
                precision=shared["precision"] or "auto",
                output=out,
            )
        )
        for path in checkpoints
    ]
    results = []
    for job in jobs:
        measured = measure(job, shared["world_size"] or 1, shared["device"] or "auto")
        if measured is None:
            continue
        result = measured.result
        if plots is not None:
            result["plots"] = _plots(plots, job, measured)
        results.append(result)
    if launcher_rank() != 0:
        return
    _render(Reporter(out), results)


def _plots(folder: Path, job: EvalJob, measured: Measured) -> dict[str, str]:
    from mlkd_cli.core.plots import confusion_matrix_png, reliability_png

    stem = job.path.stem
    title = f"{job.label} on {job.dataset} {job.split}"
    confusion, reliability = folder / f"{stem}_confusion.png", folder / f"{stem}_reliability.png"
    logits, labels = measured.logits, measured.labels
    confusion_matrix_png(confusion_matrix(logits, labels), measured.class_names, title, confusion)
    bins = reliability_bins(logits.double().softmax(1), labels)
    reliability_png(bins, measured.result["ece"], title, reliability)
    return {"confusion_matrix": str(confusion), "reliability": str(reliability)}


def _render(report: Reporter, results: list[dict[str, Any]]) -> None:
    columns = ["checkpoint", "params (M)", "images", "top-1 %", "top-5 %", "NLL", "ECE", "img/s"]
    rows = [
        [
            r["checkpoint"],
            f"{r['params_m']:.2f}",
            r["images"],
            f"{r['top1']:.2f}",
            f"{r['top5']:.2f}",
            f"{r['nll']:.4f}",
            f"{r['ece']:.4f}",
            f"{r['images_per_s']:.0f}" if r["images_per_s"] else None,
        ]
        for r in results
    ]
    first = results[0]
    report.table(f"{first['dataset']} {first['split']}", columns, rows)
    if len(results) == 1:
        report.table(
            "worst classes",
            ["class", "images", "top-1 %"],
            [[c["class"], c["images"], f"{c['top1']:.2f}"] for c in first["worst_classes"]],
        )
        report.result(first)
    else:
        report.result({"results": results})
