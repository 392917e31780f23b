"""ONNX export: a plain classifier (one output, `logits`) or a student with exits (one output per
head: final, exit1, exit2, ...), with a dynamic batch axis, the model card (and the exits record)
in the file's metadata, checked by `onnx.checker` and, where onnxruntime is installed, run and
compared with PyTorch.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlkd_cli.core.checkpoint import ModelCard
from mlkd_cli.core.errors import UserError
from mlkd_cli.export.session import open_session
from mlkd_cli.export.verify import Probe, largest_diff, verified_file
from mlkd_cli.models.exits import ExitsCheckpoint

ONNX_OPSET = 18  # onnxruntime >= 1.16 and every current runtime run it


def onnx_module() -> Any:
    """The onnx package, or the one line that says how to install it."""
    try:
        import onnx
    except ImportError:
        raise UserError(
            "ONNX export needs onnx and onnxscript: pip install 'mlkd[export]'"
        ) from None
    return onnx


def head_output_names(count: int) -> list[str]:
    """The ONNX output names of a student with `count` heads: final, exit1, exit2, ..."""
    return ["final", *(f"exit{i}" for i in range(1, count))]


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    outputs: list[str],
    inputs: tuple[str, ...] = ("images",),
) -> None:
    """torch.onnx's exporter with a dynamic batch axis, its progress kept off stdout."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter prints its progress on stdout, which --json reserves for the result.
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=list(inputs),
            output_names=outputs,
            opset_version=ONNX_OPSET,
            dynamo=True,
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )


def add_metadata(onnx: Any, path: Path, entries: dict[str, Any]) -> None:
    """Write `entries` (as JSON) into the ONNX file's metadata."""
    model = onnx.load(str(path))
    for key, value in entries.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(model, str(path))


def checked_onnx(
    onnx: Any,
    destination: Path,
    write: Any,
    probe: Probe,
    names: list[str],
) -> tuple[float, str]:
    """Write with `write`, check the file's structure, run it in onnxruntime (where installed)
    and compare every output with PyTorch's `expected`, before it is placed at `destination`."""
    checked_with = ["onnx.checker"]

    def verify(path: Path) -> float:
        onnx.checker.check_model(onnx.load(str(path)))
        try:
            session = open_session(path)
        except ImportError:
            return 0.0  # structurally valid; nothing here can run it (the caller says so)
        checked_with.append("onnxruntime")
        if [o.name for o in session.get_outputs()] != names:
            return float("inf")
        got = session.run(None, {session.get_inputs()[0].name: probe.check.numpy()})
        return largest_diff([torch.from_numpy(g) for g in got], probe.expected)

    diff = verified_file(destination, write, verify)
    return diff, " + ".join(checked_with)


def write_onnx(
    model: nn.Module, card: ModelCard | None, probe: Probe, destination: Path
) -> tuple[float, str]:
    """A plain classifier as ONNX (output `logits`), its card inside; the difference from
    PyTorch and what checked it."""
    onnx = onnx_module()

    def write(path: Path) -> None:
        export_onnx(model, probe.example, path, ["logits"])
        if card is not None:  # the card (provenance included) travels inside the file
            add_metadata(onnx, path, {"mlkd": asdict(card)})

    return checked_onnx(onnx, destination, write, probe, ["logits"])


def write_exits_onnx(loaded: ExitsCheckpoint, probe: Probe, destination: Path) -> tuple[float, str]:
    """A student with exits as ONNX, one output per head, its card and exits record inside."""
    onnx = onnx_module()
    names = head_output_names(len(probe.expected))

    def write(path: Path) -> None:
        export_onnx(loaded.student, probe.example, path, names)
        # The card and the exits record (rule, thresholds, MACs) travel inside the file, as
        # ONNX metadata, so a runtime needs nothing beside it to run the cascade.
        add_metadata(onnx, path, {"mlkd": asdict(loaded.card), "mlkd_exits": loaded.exits})

    return checked_onnx(onnx, destination, write, probe, names)
