"""Staged ONNX: a student with exits as one ONNX file per segment, so that onnxruntime runs an
image only as far as the exit it leaves at (the one-graph file computes every head for every
image).

`mlkd export <name>_exits.pth --format onnx` writes, beside `<name>_exits.onnx`, the folder
`<name>_exits_staged/`: `segment0.onnx` ... `segmentE.onnx` and `manifest.json`. Segment k takes
the previous segment's feature map (segment 0 the image) and returns exit k+1's logits and its own
feature map; the last returns the final head's logits. The backbone is cut where `StagedStudent`
cuts it (checked against timm's own forward once). The manifest lists the segments in order with
their input and output names, and carries the card and the exits record (rule, thresholds, MACs),
as the one-graph file carries them in its metadata.

A folder of plain files, not one file holding the segments as ONNX functions: each segment is an
ordinary model that any runtime opens by itself, with no mlkd-specific loader, and a runtime that
wants one session per stage (on another device, or another thread) opens just that file.

Every segment is traced, run in onnxruntime on a batch of another size and compared with PyTorch
(on PyTorch's own input to that segment) before it is kept; the folder is assembled in a scratch
folder beside its destination and moved into place file by file only when every segment agrees,
so a failed export leaves nothing behind. `read_manifest` reads a manifest back with limits.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mlkd_cli.anytime.rules import exit_confidence
from mlkd_cli.anytime.staged import StagedStudent
from mlkd_cli.core.atomic import atomic_write_text, check_new_files, check_writable
from mlkd_cli.core.checkpoint import ModelCard
from mlkd_cli.core.cpus import INT8_TARGET_KEY
from mlkd_cli.core.errors import UserError
from mlkd_cli.core.safeload import clip, load_data_file, shown
from mlkd_cli.export.onnx_graph import ONNX_OPSET, checked_onnx, export_onnx, onnx_module
from mlkd_cli.export.session import open_session
from mlkd_cli.export.verify import Probe, refuse_if_far
from mlkd_cli.models.exits import ExitsCheckpoint, exits_header

MANIFEST = "manifest.json"
STAGED_FORMAT = "mlkd-staged-onnx/1"
MAX_SEGMENTS = 64  # a manifest naming more is not one mlkd wrote (students have 3 or 4)


def staged_folder(onnx: Path) -> Path:
    """Where the staged form of the one-graph ONNX file `onnx` goes: `<name>_staged/` beside it."""
    return onnx.with_name(f"{onnx.stem}_staged")


def segment_file(index: int) -> str:
    """The file name of segment `index` inside the staged folder."""
    return f"segment{index}.onnx"


def segment_names(index: int, count: int) -> tuple[str, list[str]]:
    """Segment `index`'s input name and output names, of `count` segments: the image or the
    previous segment's map in; its exit's logits and its map out (the last: the final head)."""
    name_in = "images" if index == 0 else f"features{index}"
    if index == count - 1:
        return name_in, ["final"]
    return name_in, [f"exit{index + 1}", f"features{index + 1}"]


def check_staged_destination(folder: Path, overwrite: bool) -> None:
    """Before any work: the staged folder must be creatable, and none of the files an export
    writes there may exist unless `overwrite` (a folder's other files are left alone)."""
    if folder.exists() and not folder.is_dir():
        raise UserError(
            f"{shown(folder)} is a file; the staged ONNX export is a folder of that name: move "
            "the file or choose another --output"
        )
    check_writable(folder.parent, "--output")
    if folder.is_dir():
        ours = [folder / MANIFEST, *sorted(folder.glob("segment*.onnx"))]
        check_new_files(ours, overwrite, "--output")


class _Segment(nn.Module):
    """Segment `index` of a staged student as a module torch.onnx can trace."""

    def __init__(self, staged: StagedStudent, index: int) -> None:
        super().__init__()
        self.body = staged.segments[index]
        last = index == staged.exit_count
        self.branch = None if last else staged.student.exits[index]
        # The head reads the backbone's own modules (timm's forward_head); only used ones are
        # traced into the graph.
        self.backbone = staged.student.backbone if last else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.body(x)
        if self.branch is None:
            assert self.backbone is not None
            return (self.backbone.forward_head(x),)
        return self.branch(x), x


def _segment_inputs(staged: StagedStudent, images: torch.Tensor) -> list[torch.Tensor]:
    """What PyTorch feeds each segment: the images, then each segment's map."""
    inputs, x = [images], images
    with torch.no_grad():
        for segment in staged.segments[:-1]:
            x = segment(x)
            inputs.append(x)
    return inputs


def _write_segment(
    onnx: Any, module: _Segment, example: torch.Tensor, check: torch.Tensor, path: Path, names: Any
) -> float:
    """Segment `module` as ONNX at `path`, verified in onnxruntime against PyTorch on `check`."""
    name_in, names_out = names
    with torch.no_grad():
        probe = Probe(example, check, tuple(module(check)))

    def write(tmp: Path) -> None:
        export_onnx(module, example, tmp, names_out, inputs=(name_in,))

    return checked_onnx(onnx, path, write, probe, list(names_out))[0]


@dataclass
class PreparedStaged:
    """A staged export written and verified in a scratch folder, waiting to be placed."""

    scratch: Path
    destination: Path
    files: list[str]
    max_abs_diff: float

    def place(self) -> None:
        """Move every file into the destination folder, the manifest last (a reader that finds a
        manifest finds its segments)."""
        self.destination.mkdir(exist_ok=True)
        for name in [*self.files, MANIFEST]:
            os.replace(self.scratch / name, self.destination / name)

    def result(self) -> dict[str, Any]:
        """What the export reports of the staged folder."""
        return {
            "output": str(self.destination),
            "segments": list(self.files),
            "manifest": str(self.destination / MANIFEST),
            "max_abs_diff": self.max_abs_diff,
            "checked_with": "onnx.checker + onnxruntime, segment by segment",
        }


@contextmanager
def prepared_staged(
    loaded: ExitsCheckpoint, probe: Probe, destination: Path
) -> Iterator[PreparedStaged]:
    """Write and verify every segment and the manifest in a scratch folder beside
    `destination`; yields them for `place()`; the scratch folder is removed in any case."""
    onnx = onnx_module()
    try:
        import onnxruntime  # noqa: F401  (each segment is verified by running it)
    except ImportError:
        raise UserError(
            "the staged ONNX export is checked in onnxruntime: pip install 'mlkd[export]'"
        ) from None
    staged = StagedStudent(loaded.student, loaded.card.img_size)
    count = staged.exit_count + 1
    scratch = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        examples = _segment_inputs(staged, probe.example)
        checks = _segment_inputs(staged, probe.check)
        files, entries, worst = [], [], 0.0
        for index in range(count):
            names = segment_names(index, count)
            file = segment_file(index)
            module = _Segment(staged, index).eval()
            diff = _write_segment(
                onnx, module, examples[index], checks[index], scratch / file, names
            )
            worst = max(worst, diff)
            refuse_if_far(diff, f"staged onnx (segment {index})")
            files.append(file)
            entries.append({"file": file, "input": names[0], "outputs": names[1]})
        manifest = {
            "format": STAGED_FORMAT,
            "opset": ONNX_OPSET,
            "segments": entries,
            "card": asdict(loaded.card),
            "exits": loaded.exits,
        }
        atomic_write_text(scratch / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        yield PreparedStaged(scratch, destination, files, worst)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------------------ reading back


@dataclass(frozen=True)
class StagedSegment:
    """One segment of a staged export: its file and names."""

    path: Path
    input: str
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class StagedManifest:
    """A staged export read back: its segments in order, the card and the exits record."""

    folder: Path
    segments: tuple[StagedSegment, ...]
    card: ModelCard
    exits: dict[str, Any]
    int8_target: str | None = None  # the CPU an int8 staged export was quantized for
    record: dict[str, Any] | None = None  # the manifest as read (limits applied)


def is_staged(path: Path) -> bool:
    """True when `path` names a staged export: the folder holding `manifest.json`, or that file."""
    return path.name == MANIFEST or (path.is_dir() and (path / MANIFEST).is_file())


def read_manifest(path: Path) -> StagedManifest:
    """The staged export at `path` (its folder or manifest), read with limits and checked: every
    segment a plain file inside the folder, named as `mlkd export` names them."""
    manifest = path if path.name == MANIFEST else path / MANIFEST
    folder = manifest.parent
    if not manifest.is_file():
        raise UserError(
            f"no {MANIFEST} in {shown(folder)}: pass the <name>_staged folder mlkd export writes"
        )
    record = load_data_file(manifest, "the staged manifest", "json")
    if not isinstance(record, dict) or record.get("format") != STAGED_FORMAT:
        raise UserError(f"{shown(manifest)} is not a staged export written by mlkd export")
    card, exits = exits_header(
        {"mlkd": json.dumps(record.get("card")), "mlkd_exits": json.dumps(record.get("exits"))},
        manifest,
    )
    stages = exits.get("stages") if isinstance(exits, dict) else None
    if not isinstance(stages, list) or not 0 < len(stages) < MAX_SEGMENTS:
        raise UserError(f"{shown(manifest)} has a damaged exits record; export the student again")
    entries = record.get("segments")
    count = len(stages) + 1
    if not isinstance(entries, list) or len(entries) != count:
        raise UserError(
            f"{shown(manifest)} must list {count} segments (one per exit, then the final head); "
            "export the student again"
        )
    segments = tuple(
        _segment(entry, index, count, folder, manifest) for index, entry in enumerate(entries)
    )
    target = record.get(INT8_TARGET_KEY)
    target = clip(target) if target else None
    return StagedManifest(folder, segments, card, exits, target, record)


def _segment(entry: Any, index: int, count: int, folder: Path, manifest: Path) -> StagedSegment:
    """Entry `index` of a manifest's segments, checked: the names mlkd writes, a plain file."""
    name_in, names_out = segment_names(index, count)
    file = entry.get("file") if isinstance(entry, dict) else None
    if (
        not isinstance(file, str)
        or file != segment_file(index)
        or entry.get("input") != name_in
        or entry.get("outputs") != names_out
    ):
        raise UserError(
            f"{shown(manifest)}: segment {index} is not what mlkd export writes "
            f"({clip(json.dumps(entry), 60)}); export the student again"
        )
    path = folder / file
    if not path.is_file():
        raise UserError(f"{shown(manifest)} names {file}, which is missing; export again")
    return StagedSegment(path, name_in, tuple(names_out))


class StagedSessions:
    """A staged export in onnxruntime: one session per segment, run as a cascade."""

    def __init__(self, manifest: StagedManifest) -> None:
        self.manifest = manifest
        # Not spinning: the segments run one after another, and an idle session's spinning
        # threads would take the cores from the one running.
        self.sessions = [open_session(s.path, spinning=False) for s in manifest.segments]
        for segment, session in zip(manifest.segments, self.sessions, strict=True):
            names_in = [i.name for i in session.get_inputs()]
            names_out = [o.name for o in session.get_outputs()]
            if names_in != [segment.input] or names_out != list(segment.outputs):
                raise UserError(
                    f"{segment.path} does not take {segment.input} and give "
                    f"{', '.join(segment.outputs)} as its manifest says; export the student again"
                )

    def cascade(
        self, images: torch.Tensor, thresholds: Sequence[float], rule: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the head each image left at, and that head (exits 0.., final last): each
        segment runs only on the images that have not left at an earlier exit."""
        count = images.shape[0]
        last = len(self.sessions) - 1
        taken = torch.full((count,), last, dtype=torch.long)
        logits = torch.zeros(count, self.manifest.card.num_classes)
        x, positions = images.float().cpu().numpy(), torch.arange(count)
        for level, (segment, session) in enumerate(
            zip(self.manifest.segments, self.sessions, strict=True)
        ):
            if positions.numel() == 0:
                break
            outputs = session.run(list(segment.outputs), {segment.input: x})
            head = torch.from_numpy(outputs[0]).float()
            if level == last:
                logits[positions] = head
                break
            leave = exit_confidence(head, rule) >= thresholds[level]
            logits[positions[leave]] = head[leave]
            taken[positions[leave]] = level
            stay = ~leave
            x, positions = outputs[1][stay.numpy()], positions[stay]
        return logits, taken

    def heads(self, images: np.ndarray) -> list[np.ndarray]:
        """Every head's logits on every image (no early exit): the exits in order, then the
        final head."""
        outputs, x = [], images
        for segment, session in zip(self.manifest.segments, self.sessions, strict=True):
            got = session.run(list(segment.outputs), {segment.input: x})
            outputs.append(got[0])
            if len(got) > 1:
                x = got[1]
        return outputs
