"""int8 staged ONNX: each segment of the verified fp32 staged export (`staged_onnx`) quantized
with onnxruntime's static quantization, as `int8` quantizes the one-graph file (QDQ, int8 weights
per channel, uint8 activations, the --int8-target's weight width), and judged as it is.

Segment k is calibrated on what it receives in the fp32 cascade: the calibration images run
through the fp32 segments before it, one batch at a time (nothing held but a batch, whatever the
maps' size). Then both staged forms run the validation split, judged on "every used head and the
cascade's decisions" (issue #35): where the manifest carries an operating point, the cascade's
decisions (the head each image leaves at and its class, early exit and all) and the top class of
every head the fp32 cascade answers some image with; without one, every head. Each must agree
with fp32 on at least --min-agreement % of the images, else nothing is written. A head no image
leaves at decides only by its confidence, which the decisions judge (the demo student's unused
exit3 agreed on 98.6 % of the digits in int8, its cascade on 100 %). `<name>.int8.onnx`'s staged
form is `<name>.int8_staged/`, its manifest the fp32 one's with the quantization recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlkd_cli.anytime.rules import EXIT_RULE
from mlkd_cli.core.atomic import atomic_write_text
from mlkd_cli.core.cpus import INT8_TARGET_KEY
from mlkd_cli.export.agreement import cascade_decisions, check_agreement, operating_point
from mlkd_cli.export.int8 import _batches, _quiet_root_logger, calibration_batches
from mlkd_cli.export.int8_plan import Int8Plan
from mlkd_cli.export.onnx_graph import head_output_names
from mlkd_cli.export.staged_onnx import MANIFEST, StagedManifest, StagedSessions, read_manifest
from mlkd_cli.passes.logits import card_image_config, split_dataset


def _prefix(runner: StagedSessions, index: int, images: np.ndarray) -> np.ndarray:
    """What segment `index` receives from the fp32 segments before it, for `images`."""
    x = images
    for segment, session in zip(runner.manifest.segments[:index], runner.sessions, strict=False):
        x = session.run([segment.outputs[1]], {segment.input: x})[0]
    return x


@dataclass
class PreparedStagedInt8:
    """A quantized, compared staged folder in a scratch folder, waiting to be placed."""

    scratch: Path
    destination: Path
    files: list[str]
    parity: dict[str, Any]

    def place(self) -> None:
        """Move every file into the destination folder, the manifest last."""
        self.destination.mkdir(exist_ok=True)
        for name in [*self.files, MANIFEST]:
            os.replace(self.scratch / name, self.destination / name)

    def result(self) -> dict[str, Any]:
        """What the export reports of the int8 staged folder."""
        return {"output": str(self.destination), "segments": list(self.files), **self.parity}


@contextmanager
def prepared_staged_int8(
    plan: Int8Plan, fp32_folder: Path, destination: Path
) -> Iterator[PreparedStagedInt8]:
    """Quantize every segment of the fp32 staged folder into a scratch folder beside
    `destination`, compare with fp32 on the validation split, refuse (one line) below
    --min-agreement; yields it for `place()`; the scratch folder is removed in any case."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = StagedSessions(read_manifest(fp32_folder))
    calibration = calibration_batches(plan)

    class Reader(CalibrationDataReader):
        def __init__(self, index: int) -> None:
            self.index, self.batches = index, iter(calibration)
            self.name = fp32.manifest.segments[index].input

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {self.name: _prefix(fp32, self.index, batch)}

    scratch = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        files = []
        with _quiet_root_logger():
            for index, segment in enumerate(fp32.manifest.segments):
                prepared = scratch / f".prepared{index}.onnx"
                quant_pre_process(str(segment.path), str(prepared))
                quantize_static(
                    str(prepared),
                    str(scratch / segment.path.name),
                    Reader(index),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    reduce_range=plan.target.reduce_range,
                    weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8,
                )
                prepared.unlink()
                files.append(segment.path.name)
        _write_manifest(fp32.manifest, scratch / MANIFEST, plan)
        parity = compare_staged(plan, fp32, StagedSessions(read_manifest(scratch)))
        check_agreement(parity, plan.options.min_agreement, plan.target)
        yield PreparedStagedInt8(scratch, destination, files, parity)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_manifest(source: StagedManifest, target: Path, plan: Int8Plan) -> None:
    """The fp32 manifest with the quantization and the target CPU recorded."""
    manifest = dict(source.record or {})
    weights = "7-bit weights" if plan.target.reduce_range else "8-bit weights"
    manifest["quantized"] = f"int8 (onnxruntime static, QDQ, per channel, {weights})"
    manifest[INT8_TARGET_KEY] = plan.target.name
    atomic_write_text(target, json.dumps(manifest, indent=2) + "\n")


def compare_staged(plan: Int8Plan, fp32: StagedSessions, int8: StagedSessions) -> dict[str, Any]:
    """On the validation split: the top-1 agreement (%) of every head (final first, as the
    one-graph file names them) and, where an operating point is recorded, of the cascade's
    decisions (from every head's logits, as `agreement.cascade_decisions` makes them for the
    one-graph file); each model's top-1 of the final head."""
    val = split_dataset(plan.splits, "val", card_image_config(plan.card))
    point = operating_point(fp32.manifest.exits, len(fp32.manifest.segments))
    thresholds, rule = point or (None, EXIT_RULE)
    tops: list[list[np.ndarray]] = [[], []]
    decisions: list[list[np.ndarray]] = [[], []]
    labels = []
    for batch, batch_labels in _batches(val, list(range(len(val)))):
        labels.append(batch_labels)
        for which, runner in enumerate((fp32, int8)):
            heads = runner.heads(batch)
            final_first = [heads[-1], *heads[:-1]]
            tops[which].append(np.stack([h.argmax(axis=1) for h in final_first]))
            if thresholds:
                decisions[which].append(cascade_decisions(final_first, thresholds, rule))
    top = [np.concatenate(t, axis=1) for t in tops]
    truth = np.concatenate(labels)
    names = head_output_names(top[0].shape[0])
    agreement = [100.0 * float((top[0][h] == top[1][h]).mean()) for h in range(len(names))]
    used, cascade = list(range(len(names))), None
    if thresholds:
        taken = [np.concatenate(d, axis=1) for d in decisions]
        agree = 100.0 * float((taken[0] == taken[1]).all(axis=0).mean())
        cascade = {"thresholds": list(thresholds), "rule": rule, "agreement": agree}
        # The heads the fp32 cascade answers some image with (final first, as `names`): only
        # their classes reach a user; the others' confidences are judged by the decisions.
        levels = set(taken[0][0].tolist())
        used = [h for h in used if (len(names) - 1 if h == 0 else h - 1) in levels]
    return {
        "images": int(len(truth)),
        "heads": [f"staged {names[h]}" for h in used],
        "agreement": [agreement[h] for h in used],
        "unused_heads": {
            f"staged {names[h]}": agreement[h] for h in range(len(names)) if h not in used
        },
        "cascade": cascade,
        "top1_fp32": 100.0 * float((top[0][0] == truth).mean()),
        "top1_int8": 100.0 * float((top[1][0] == truth).mean()),
    }
