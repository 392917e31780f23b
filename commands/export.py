"""`mlkd export`: a trained model as safetensors (+ timm config.json), ONNX or TorchScript."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from mlkd_cli.core.console import Reporter
from mlkd_cli.export import FORMATS, TOLERANCE, export_any
from mlkd_cli.int8 import DEFAULT_CALIBRATION_IMAGES, DEFAULT_MIN_AGREEMENT, Int8Options

from . import options as opt

# The formats mlkd_cli.export writes, as a choice --help lists.
FormatChoice = Enum("FormatChoice", {name: name for name in FORMATS}, type=str)


@opt.with_options(opt.output_options())
def export(
    checkpoint: Annotated[
        Path, typer.Argument(help="A trained checkpoint (.pth or .safetensors).")
    ],
    fmt: Annotated[
        FormatChoice | None,
        typer.Option(
            "--format",
            "-f",
            # the choices go in the help text: as a type they are too wide for an 80-column
            # terminal
            metavar="<format>",
            help=f"What to write: {', '.join(FORMATS)} (default safetensors; for a student with "
            "exits, <name>_exits.pth, both safetensors and onnx).",
            rich_help_panel=opt.EXPORT,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Destination (default beside the checkpoint; a folder for safetensors).",
            rich_help_panel=opt.EXPORT,
        ),
    ] = None,
    model: opt.PlainModel = None,
    num_classes: opt.PlainClasses = None,
    img_size: Annotated[
        int | None,
        typer.Option(
            "--img-size",
            help="Input size the export is traced and checked at (default: the checkpoint's, "
            "else 224).",
            rich_help_panel=opt.MODEL,
        ),
    ] = None,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="Also quantize the ONNX export to int8 (<name>.int8.onnx), calibrated on "
            "training images and kept only if it agrees with fp32 on the validation split.",
            rich_help_panel=opt.EXPORT,
        ),
    ] = False,
    calibration_images: Annotated[
        int,
        typer.Option(
            "--calibration-images",
            help="Training images --int8 calibrates on.",
            rich_help_panel=opt.EXPORT,
        ),
    ] = DEFAULT_CALIBRATION_IMAGES,
    min_agreement: Annotated[
        float,
        typer.Option(
            "--min-agreement",
            help="% of validation images on which int8 and fp32 must give the same top class.",
            rich_help_panel=opt.EXPORT,
        ),
    ] = DEFAULT_MIN_AGREEMENT,
    data_dir: opt.DataDir = None,
    *,
    shared: opt.Shared,
) -> None:
    """Export a checkpoint to safetensors, ONNX or TorchScript, checked against PyTorch; with
    --int8, an int8 ONNX checked against the fp32 one too."""
    options = (
        Int8Options(data_dir, calibration_images, min_agreement, shared.output) if int8 else None
    )
    results = export_any(
        checkpoint, fmt.value if fmt else None, output, model, num_classes, img_size, options
    )
    report = Reporter(shared.output)
    report.table(
        f"export of {checkpoint}",
        ["format", "written", "outputs", "checked with", "max |diff|"],
        [
            [
                r["format"],
                r["output"],
                ", ".join(r.get("outputs", ["logits"])),
                r["checked_with"],
                f"{r['max_abs_diff']:.2e} (limit {TOLERANCE:g})",
            ]
            for r in results
            if r["format"] != "onnx-int8"
        ],
    )
    for r in results:
        if r["format"] == "onnx-int8":
            agreement = ", ".join(f"{a:.2f}" for a in r["agreement"])
            report.info(
                f"int8: {r['output']} ({r['int8_bytes'] / 1e6:.1f} MB, fp32 "
                f"{r['fp32_bytes'] / 1e6:.1f} MB), calibrated on {r['calibration_images']} "
                f"training images; on {r['images']} validation images it agrees with fp32 on "
                f"{agreement} % (final head first), top-1 {r['top1_int8']:.2f} against fp32's "
                f"{r['top1_fp32']:.2f}"
            )
    if any(r["format"] == "onnx" and "onnxruntime" not in r["checked_with"] for r in results):
        report.warn("onnxruntime is not installed: the file passed the checker but was not run")
    report.result(results[0] if len(results) == 1 else {"exports": results})
