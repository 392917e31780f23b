"""`mlkd export`: a trained model as safetensors (+ timm config.json), ONNX or TorchScript."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from mlkd_cli import api
from mlkd_cli.core.console import Reporter
from mlkd_cli.core.constants import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_MIN_AGREEMENT,
    FORMATS,
    INT8_TARGETS,
)

from . import options as opt
from .requests import OutputFlags, takes

# The formats mlkd_cli.export writes, as a choice --help lists (the exporter loads when it runs).
FormatChoice = Enum("FormatChoice", {name: name for name in FORMATS}, type=str)
# The CPUs an int8 file can be quantized for.
TargetChoice = Enum("TargetChoice", {name: name for name in INT8_TARGETS}, type=str)


@dataclass(kw_only=True)
class ExportRequest(OutputFlags):
    """`mlkd export`'s flags."""

    checkpoint: Annotated[Path, typer.Argument(help="A trained checkpoint (.pth or .safetensors).")]
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
    ] = None
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Destination (default beside the checkpoint; a folder for safetensors).",
            rich_help_panel=opt.EXPORT,
        ),
    ] = None
    model: opt.PlainModel = None
    num_classes: opt.PlainClasses = None
    img_size: Annotated[
        int | None,
        typer.Option(
            "--img-size",
            help="Input size the export is traced and checked at (default: the checkpoint's, "
            "else 224).",
            rich_help_panel=opt.MODEL,
        ),
    ] = None
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="Also quantize the ONNX export to int8 (<name>.int8.onnx), calibrated on "
            "training images and kept only if it agrees with fp32 on the validation split.",
            rich_help_panel=opt.EXPORT,
        ),
    ] = False
    calibration_images: Annotated[
        int,
        typer.Option(
            "--calibration-images",
            help="Training images --int8 calibrates on.",
            rich_help_panel=opt.EXPORT,
        ),
    ] = DEFAULT_CALIBRATION_IMAGES
    min_agreement: Annotated[
        float,
        typer.Option(
            "--min-agreement",
            help="% of validation images on which int8 and fp32 must give the same top class, "
            "on every head, and the same exit and class in the saved cascade.",
            rich_help_panel=opt.EXPORT,
        ),
    ] = DEFAULT_MIN_AGREEMENT
    int8_target: Annotated[
        TargetChoice | None,
        typer.Option(
            "--int8-target",
            metavar="<cpu>",
            help="The CPU the int8 file is for: auto (this one, the default), avx2 or avx512 "
            "(7-bit weights, which CPUs without VNNI need), vnni (8-bit weights).",
            rich_help_panel=opt.EXPORT,
        ),
    ] = None
    data_dir: opt.DataDir = None
    overwrite: opt.OverwriteFiles = False


@takes(ExportRequest)
def export(request: ExportRequest) -> None:
    """Export a checkpoint to safetensors, ONNX or TorchScript, checked against PyTorch; with
    --int8, an int8 ONNX checked against the fp32 one too."""
    r = request
    exported = api.export(
        r.checkpoint,
        format=r.fmt,
        output=r.output,
        model=r.model,
        num_classes=r.num_classes,
        img_size=r.img_size,
        int8=r.int8,
        calibration_images=r.calibration_images,
        min_agreement=r.min_agreement,
        int8_target=r.int8_target,
        data_dir=r.data_dir,
        overwrite=r.overwrite,
        progress=r.output_options,
    )
    from mlkd_cli.export import TOLERANCE

    checkpoint, results = r.checkpoint, [e.record for e in exported]
    report = Reporter(r.output_options)
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
            _report_int8(report, r)
        elif r.get("staged"):
            staged = r["staged"]
            report.info(
                f"staged onnx: {staged['output']} ({len(staged['segments'])} segments + "
                f"manifest.json, max |diff| {staged['max_abs_diff']:.2e}): onnxruntime runs an "
                "image only as far as its exit"
            )
    if any(r["format"] == "onnx" and "onnxruntime" not in r["checked_with"] for r in results):
        report.warn("onnxruntime is not installed: the file passed the checker but was not run")
    report.result(results[0] if len(results) == 1 else {"exports": results})


def _report_int8(report: Reporter, r: dict) -> None:
    """The int8 file's target, and its agreement with fp32 on each head and the cascade."""
    report.info(r["target_line"])
    images, target = r["images"], r["target"]
    rows = [
        [head, target, f"{a:.2f}", images]
        for head, a in zip(r["heads"], r["agreement"], strict=True)
    ]
    if r.get("staged"):
        staged = r["staged"]
        rows.extend(
            [head, target, f"{a:.2f}", images]
            for head, a in zip(staged["heads"], staged["agreement"], strict=True)
        )
    for part in (r, r.get("staged") or {}):
        if part.get("cascade"):
            name = "staged cascade" if part is not r else "cascade"
            agreement = part["cascade"]["agreement"]
            rows.append([f"{name} ({part['cascade']['rule']})", target, f"{agreement:.2f}", images])
    report.table(
        "int8 against fp32, head by head",
        ["int8 head", "target", "agrees with fp32 %", "validation images"],
        rows,
    )
    report.info(
        f"int8: {r['output']}, {r['int8_bytes'] / 1e6:.1f} MB (fp32 "
        f"{r['fp32_bytes'] / 1e6:.1f} MB), {r['calibration_images']} calibration images; "
        f"top-1 {r['top1_int8']:.2f} (fp32 {r['top1_fp32']:.2f})"
    )
    if r.get("staged"):
        report.info(
            f"int8 staged: {r['staged']['output']} ({len(r['staged']['segments'])} segments)"
        )
