"""Exporting a trained classifier so it runs without mlkd: safetensors, ONNX, TorchScript.

Every export is written to a temporary file beside its destination, reloaded and run on a batch,
compared with PyTorch (largest absolute difference at most 1e-4), and only then renamed into
place: a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlkd_cli.core.atomic import (
    atomic_write_text,
    check_new_files,
    check_writable,
    plain_file_mode,
)
from mlkd_cli.core.checkpoint import ModelCard, read_weights
from mlkd_cli.core.constants import DEFAULT_MEAN, DEFAULT_STD, FORMATS
from mlkd_cli.core.errors import UserError
from mlkd_cli.core.safeload import shown
from mlkd_cli.export.int8 import Int8Options, Int8Plan, plan_int8, quantize_export
from mlkd_cli.models.exits import (
    ExitsCheckpoint,
    is_exits_checkpoint,
    load_exits_checkpoint,
    load_exits_safetensors,
)
from mlkd_cli.models.factory import card_of, load_trained_model

# What `mlkd export` writes of a student with exits when no --format is given: both.
EXITS_FORMATS = ("safetensors", "onnx")
TOLERANCE = 1e-4
ONNX_OPSET = 18  # onnxruntime >= 1.16 and every current runtime run it


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
    example, check = _probe_batches(size)
    with torch.no_grad():
        expected = model(check)
    writer = {"safetensors": _safetensors, "onnx": _onnx, "torchscript": _torchscript}[fmt]
    diff, checked_with = writer(model, card, example, check, expected, destination)
    if diff > TOLERANCE:
        raise UserError(
            f"the {fmt} export differs from PyTorch by {diff:.2e} (> {TOLERANCE:g}); not written"
        )
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


def _probe_batches(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch an export is traced on, and another of another size that checks it (the batch
    axis must be dynamic)."""
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, size, size, generator=generator)
    return example, torch.randn(3, 3, size, size, generator=generator)


def _verified_file(
    destination: Path, write: Callable[[Path], None], verify: Callable[[Path], float]
) -> float:
    """Write to a temporary file beside `destination`, verify it, then rename it into place."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent
    )
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        diff = verify(tmp)
        if diff <= TOLERANCE:
            os.chmod(tmp, plain_file_mode())  # not mkstemp's 0600: others may read a model
            os.replace(tmp, destination)
        return diff
    finally:
        tmp.unlink(missing_ok=True)


def timm_config(model: nn.Module, card: ModelCard | None, size: int) -> dict[str, Any]:
    """config.json in timm's hub form: architecture, classes, and the pretrained config."""
    arch = card.arch if card else model.default_cfg.get("architecture", type(model).__name__)
    classes = model.num_classes
    config: dict[str, Any] = {
        "architecture": arch,
        "num_classes": classes,
        "num_features": getattr(model, "num_features", None),
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "interpolation": card.interpolation if card else "bicubic",
            "mean": list(card.mean) if card else list(DEFAULT_MEAN),
            "std": list(card.std) if card else list(DEFAULT_STD),
            "crop_pct": card.crop_pct if card else 0.875,
            "crop_mode": "center",
            "num_classes": classes,
            "classifier": model.pretrained_cfg.get("classifier", "fc"),
        },
    }
    if card is not None:
        config["label_names"] = list(card.class_names)
    return config


def _safetensors(model, card, example, check, expected, destination: Path) -> tuple[float, str]:
    from safetensors.torch import load_file, save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "pt"}
    if card is not None:
        metadata["mlkd"] = json.dumps(asdict(card))

    def verify(path: Path) -> float:
        import timm

        fresh = timm.create_model(
            timm_config(model, card, check.shape[-1])["architecture"], num_classes=model.num_classes
        )
        fresh.load_state_dict(load_file(str(path)))
        fresh.eval()
        with torch.no_grad():
            return float((fresh(check) - expected).abs().max())

    diff = _verified_file(
        destination / "model.safetensors",
        lambda p: save_file(state, str(p), metadata=metadata),
        verify,
    )
    if diff <= TOLERANCE:
        config = timm_config(model, card, check.shape[-1])
        atomic_write_text(destination / "config.json", json.dumps(config, indent=2) + "\n")
    return diff, "timm.create_model + safetensors"


def _onnx_module() -> Any:
    try:
        import onnx
    except ImportError:
        raise UserError(
            "ONNX export needs onnx and onnxscript: pip install 'mlkd[export]'"
        ) from None
    return onnx


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path, outputs: list[str]) -> None:
    """torch.onnx's exporter with a dynamic batch axis, its progress kept off stdout."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter prints its progress on stdout, which --json reserves for the result.
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["images"],
            output_names=outputs,
            opset_version=ONNX_OPSET,
            dynamo=True,
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )


def _onnx(model, card, example, check, expected, destination: Path) -> tuple[float, str]:
    onnx = _onnx_module()

    def write(path: Path) -> None:
        _export_onnx(model, example, path, ["logits"])
        if card is not None:  # the card (provenance included) travels inside the file
            _add_metadata(onnx, path, {"mlkd": asdict(card)})

    checked_with = ["onnx.checker"]

    def verify(path: Path) -> float:
        onnx.checker.check_model(onnx.load(str(path)))
        try:
            import onnxruntime
        except ImportError:
            return 0.0  # structurally valid; nothing here can run it (the caller says so)
        checked_with.append("onnxruntime")
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: check.numpy()})[0]
        return float((torch.from_numpy(got) - expected).abs().max())

    diff = _verified_file(destination, write, verify)
    return diff, " + ".join(checked_with)


def _torchscript(model, card, example, check, expected, destination: Path) -> tuple[float, str]:
    def write(path: Path) -> None:
        with torch.no_grad():
            traced = torch.jit.trace(model, example)
        traced.save(str(path))

    def verify(path: Path) -> float:
        loaded = torch.jit.load(str(path))
        with torch.no_grad():
            return float((loaded(check) - expected).abs().max())

    return _verified_file(destination, write, verify), "torch.jit.load"


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
        fp32 = Path(next(r["output"] for r in results if r["format"] == "onnx"))
        results.append(quantize_export(plan, fp32, _int8_path(fp32)))
    return results


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
    loaded = load_exits_checkpoint(checkpoint)
    student = loaded.student
    size = loaded.card.img_size
    example, check = _probe_batches(size)
    with torch.no_grad():
        expected = student(check)
    results = []
    for fmt, destination in destinations.items():
        writer = _exits_safetensors if fmt == "safetensors" else _exits_onnx
        diff, checked_with = writer(loaded, example, check, expected, destination)
        if diff > TOLERANCE:
            raise UserError(
                f"the {fmt} export differs from PyTorch by {diff:.2e} (> {TOLERANCE:g}); "
                "not written"
            )
        results.append(
            {
                "format": fmt,
                "output": str(destination),
                "max_abs_diff": diff,
                "checked_with": checked_with,
                "img_size": size,
                "outputs": list(head_output_names(len(expected))),
            }
        )
    return results


def head_output_names(count: int) -> list[str]:
    """The ONNX output names of a student with `count` heads: final, exit1, exit2, ..."""
    return ["final", *(f"exit{i}" for i in range(1, count))]


def _largest_diff(got: list[torch.Tensor], expected: tuple[torch.Tensor, ...]) -> float:
    if len(got) != len(expected):
        return float("inf")
    return max(float((g - e).abs().max()) for g, e in zip(got, expected, strict=True))


def _exits_safetensors(
    loaded: ExitsCheckpoint, example, check, expected, destination: Path
) -> tuple[float, str]:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in loaded.student.state_dict().items()}
    metadata = {
        "format": "pt",
        "mlkd": json.dumps(asdict(loaded.card)),
        "mlkd_exits": json.dumps(loaded.exits),
    }

    def verify(path: Path) -> float:
        fresh = load_exits_safetensors(path)
        with torch.no_grad():
            return _largest_diff(list(fresh.student(check)), expected)

    diff = _verified_file(
        destination / "model.safetensors",
        lambda p: save_file(state, str(p), metadata=metadata),
        verify,
    )
    if diff <= TOLERANCE:
        about = {"card": asdict(loaded.card), "exits": loaded.exits}
        atomic_write_text(destination / "exits.json", json.dumps(about, indent=2) + "\n")
    return diff, "mlkd_cli.anytime + safetensors"


def _add_metadata(onnx: Any, path: Path, entries: dict[str, Any]) -> None:
    """Write `entries` (as JSON) into the ONNX file's metadata."""
    model = onnx.load(str(path))
    for key, value in entries.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(model, str(path))


def _exits_onnx(
    loaded: ExitsCheckpoint, example, check, expected, destination: Path
) -> tuple[float, str]:
    onnx = _onnx_module()
    names = head_output_names(len(expected))

    def write(path: Path) -> None:
        _export_onnx(loaded.student, example, path, names)
        # The card and the exits record (rule, thresholds, MACs) travel inside the file, as
        # ONNX metadata, so a runtime needs nothing beside it to run the cascade.
        _add_metadata(onnx, path, {"mlkd": asdict(loaded.card), "mlkd_exits": loaded.exits})

    checked_with = ["onnx.checker"]

    def verify(path: Path) -> float:
        onnx.checker.check_model(onnx.load(str(path)))
        try:
            import onnxruntime
        except ImportError:
            return 0.0
        checked_with.append("onnxruntime")
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        if [o.name for o in session.get_outputs()] != names:
            return float("inf")
        got = session.run(None, {session.get_inputs()[0].name: check.numpy()})
        return _largest_diff([torch.from_numpy(g) for g in got], expected)

    diff = _verified_file(destination, write, verify)
    return diff, " + ".join(checked_with)
