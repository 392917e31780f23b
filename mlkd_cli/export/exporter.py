"""What `mlkd export` does: check every destination before any work, load the checkpoint, write
each format (`safetensors_folder`, `onnx_graph`, `torchscript`), each verified against PyTorch
before it is placed (`verify`), and with --int8 quantize the ONNX file (`int8`). A student with
exits' ONNX export has its staged form beside it (`staged_onnx`, `staged_int8`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlkd_cli.core.atomic import check_new_files, check_writable
from mlkd_cli.core.checkpoint import read_weights
from mlkd_cli.core.constants import FORMATS
from mlkd_cli.core.errors import UserError
from mlkd_cli.core.safeload import shown
from mlkd_cli.export.int8 import quantize_export
from mlkd_cli.export.int8_plan import Int8Options, Int8Plan, plan_int8
from mlkd_cli.export.onnx_graph import head_output_names, write_exits_onnx, write_onnx
from mlkd_cli.export.safetensors_folder import write_exits_safetensors, write_safetensors
from mlkd_cli.export.staged_int8 import prepared_staged_int8
from mlkd_cli.export.staged_onnx import check_staged_destination, prepared_staged, staged_folder
from mlkd_cli.export.torchscript import write_torchscript
from mlkd_cli.export.verify import Probe, probe, refuse_if_far
from mlkd_cli.models.exits import ExitsCheckpoint, is_exits_checkpoint, load_exits_checkpoint
from mlkd_cli.models.factory import card_of, load_trained_model

# What `mlkd export` writes of a student with exits when no --format is given: both.
EXITS_FORMATS = ("safetensors", "onnx")
# The writer of each format of a plain classifier.
WRITERS = {"safetensors": write_safetensors, "onnx": write_onnx, "torchscript": write_torchscript}


def default_output(checkpoint: Path, fmt: str) -> Path:
    """Where an export goes without --output: beside the checkpoint."""
    if fmt == "safetensors":
        return checkpoint.with_suffix("")  # a model folder: model.safetensors + config.json
    return checkpoint.with_suffix(".onnx" if fmt == "onnx" else ".torchscript.pt")


def export_checkpoint(
    checkpoint: Path,
    fmt: str,
    output: Path | None = None,
    arch: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export, verify against PyTorch, and return what was written and how close it is."""
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    destination = output or default_output(checkpoint, fmt)
    check_destination(checkpoint, fmt, destination, overwrite)
    model, card = load_trained_model(checkpoint, arch, num_classes)
    model.eval()
    size = img_size or (card.img_size if card else 224)
    diff, checked_with = WRITERS[fmt](model, card, probe(model, size), destination)
    refuse_if_far(diff, fmt)
    return {
        "format": fmt,
        "output": str(destination),
        "max_abs_diff": diff,
        "checked_with": checked_with,
        "img_size": size,
    }


def written_files(fmt: str, destination: Path, exits: bool = False) -> list[Path]:
    """The files an export in `fmt` to `destination` writes (safetensors: a folder of two)."""
    if fmt != "safetensors":
        return [destination]
    return [
        destination / "model.safetensors",
        destination / ("exits.json" if exits else "config.json"),
    ]


def check_destination(
    checkpoint: Path,
    fmt: str,
    destination: Path,
    overwrite: bool,
    exits: bool = False,
    also: tuple[Path, ...] = (),
) -> None:
    """Before any work: the folder that receives an export must exist and be writable (a
    safetensors folder itself is created), and no file it writes may exist (unless
    `overwrite`) or be the checkpoint exported (ever). `also`: further files it writes."""
    parent = destination.parent
    if not parent.is_dir():
        raise UserError(
            f"cannot write {shown(destination)}: {shown(parent)} is not a writable folder (it "
            "does not exist); create it or choose another --output"
        )
    check_writable(parent, "--output")
    if fmt == "safetensors" and destination.exists() and not destination.is_dir():
        raise UserError(
            f"--output {shown(destination)} is a file; a safetensors export is a folder "
            "(model.safetensors + config.json): name a folder"
        )
    files = [*written_files(fmt, destination, exits), *also]
    check_new_files(files, overwrite, "--output", sources=[checkpoint])


def export_any(
    checkpoint: Path,
    fmt: str | None = None,
    output: Path | None = None,
    arch: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    int8: Int8Options | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """What `mlkd export` does: a plain model in `fmt` (default safetensors); a student with
    exits in `fmt`, or by default as both a safetensors folder and an ONNX model. With `int8`,
    the ONNX export is also quantized (`export/int8.py`) into `<name>.int8.onnx`, checked
    (data, flags) before anything is written. No file written may exist unless `overwrite`,
    nor ever be the checkpoint itself."""
    exits = is_exits_checkpoint(checkpoint)
    plan = _plan_int8(checkpoint, fmt, exits, int8) if int8 is not None else None
    if plan is not None:  # the int8 file is checked with the ONNX one, before either is written
        onnx = output or default_output(checkpoint, "onnx")
        check_destination(checkpoint, "onnx", onnx, overwrite, exits, (_int8_path(onnx),))
        if exits:  # and the int8 staged folder beside it
            check_staged_destination(staged_folder(_int8_path(onnx)), overwrite)
    if exits:
        if arch is not None or num_classes is not None or img_size is not None:
            raise UserError(
                f"{checkpoint} records its student; drop --model, --num-classes and --img-size"
            )
        formats = (fmt,) if fmt else EXITS_FORMATS
        results = export_exits_checkpoint(checkpoint, formats, output, overwrite)
    else:
        results = [
            export_checkpoint(
                checkpoint, fmt or "safetensors", output, arch, num_classes, img_size, overwrite
            )
        ]
    if plan is not None:
        onnx_result = next(r for r in results if r["format"] == "onnx")
        results.append(
            _quantize(plan, Path(onnx_result["output"]), bool(onnx_result.get("staged")))
        )
    return results


def _quantize(plan: Int8Plan, fp32: Path, staged: bool) -> dict[str, Any]:
    """The int8 copy of the ONNX export `fp32`; with its `staged` form, that too, quantized and
    compared first and placed only once the one-graph int8 file is."""
    if not staged:
        return quantize_export(plan, fp32, _int8_path(fp32))
    int8_folder = staged_folder(_int8_path(fp32))
    with prepared_staged_int8(plan, staged_folder(fp32), int8_folder) as folder:
        result = quantize_export(plan, fp32, _int8_path(fp32))
        folder.place()
    result["staged"] = folder.result()
    return result


def _int8_path(onnx: Path) -> Path:
    """Where --int8 writes the quantized copy of the ONNX export `onnx`."""
    return onnx.with_suffix(".int8.onnx")


def _plan_int8(checkpoint: Path, fmt: str | None, exits: bool, options: Int8Options) -> Int8Plan:
    """--int8 checked before any export: it quantizes the ONNX file, so one must be written."""
    if fmt != "onnx" and not (exits and fmt is None):
        raise UserError("--int8 quantizes the ONNX export: add --format onnx")
    card = load_exits_checkpoint(checkpoint).card if exits else card_of(read_weights(checkpoint)[1])
    return plan_int8(options, card, checkpoint)


def export_exits_checkpoint(
    checkpoint: Path,
    formats: tuple[str, ...] = EXITS_FORMATS,
    output: Path | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Export a student with its exits: a safetensors folder (weights, exits, thresholds) and an
    ONNX model with one output per head, each verified against PyTorch before it is placed."""
    unknown = [f for f in formats if f not in EXITS_FORMATS]
    if unknown:
        raise UserError(
            f"a student with exits exports as {' or '.join(EXITS_FORMATS)}, not {unknown[0]}; "
            "export the plain <name>.pth for that format"
        )
    if output is not None and len(formats) > 1:
        raise UserError("--output names one destination; pass --format too")
    destinations = {f: output or default_output(checkpoint, f) for f in formats}
    for fmt, destination in destinations.items():
        check_destination(checkpoint, fmt, destination, overwrite, exits=True)
        if fmt == "onnx":  # the staged form goes beside the one-graph file
            check_staged_destination(staged_folder(destination), overwrite)
    loaded = load_exits_checkpoint(checkpoint)
    checks = probe(loaded.student, loaded.card.img_size)
    results = []
    for fmt, destination in destinations.items():
        if fmt == "onnx":
            result = _exits_onnx(loaded, checks, destination)
        else:
            diff, checked_with = write_exits_safetensors(loaded, checks, destination)
            refuse_if_far(diff, fmt)
            result = _exits_result(fmt, destination, diff, checked_with, loaded, checks)
        results.append(result)
    return results


def _exits_onnx(loaded: ExitsCheckpoint, checks: Probe, destination: Path) -> dict[str, Any]:
    """The one-graph ONNX file and its staged folder: the segments are written and verified
    first, in a scratch folder, and placed only once the one-graph file is too. A student whose
    backbone cannot be run stage by stage (no MACs recorded) gets the one-graph file alone."""
    if loaded.costs is None:
        diff, checked_with = write_exits_onnx(loaded, checks, destination)
        refuse_if_far(diff, "onnx")
        return {
            **_exits_result("onnx", destination, diff, checked_with, loaded, checks),
            "staged": None,
        }
    with prepared_staged(loaded, checks, staged_folder(destination)) as staged:
        diff, checked_with = write_exits_onnx(loaded, checks, destination)
        refuse_if_far(diff, "onnx")
        staged.place()
    result = _exits_result("onnx", destination, diff, checked_with, loaded, checks)
    result["staged"] = staged.result()
    return result


def _exits_result(
    fmt: str,
    destination: Path,
    diff: float,
    checked_with: str,
    loaded: ExitsCheckpoint,
    checks: Probe,
) -> dict[str, Any]:
    """What the export of a student with exits reports for one format."""
    return {
        "format": fmt,
        "output": str(destination),
        "max_abs_diff": diff,
        "checked_with": checked_with,
        "img_size": loaded.card.img_size,
        "outputs": list(head_output_names(len(checks.expected))),
    }
