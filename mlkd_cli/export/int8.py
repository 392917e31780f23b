"""int8 ONNX: a verified fp32 export quantized by onnxruntime's own static quantization, kept
only when it agrees with the fp32 model.

Calibration runs `--calibration-images` training images (a seeded draw, the evaluation
transform the model card records) through the fp32 model; weights are quantized per channel to
int8 and activations to uint8 (QDQ format, what onnxruntime's CPU kernels run fastest). Then
both models classify the validation split: the share of images on which their top classes agree
on every head of a student with exits, and on the cascade's decisions (the head each image
leaves at and its class) where the file carries an operating point, and the top-1 of each; a
file on which any of these falls under `--min-agreement` % is refused, not written.

The flags, the target CPU and the data are checked first (`int8_plan`); the agreement bound
(`agreement`) decides whether the file is kept.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlkd_cli.core.cpus import INT8_TARGET_KEY
from mlkd_cli.data.loaders import TransformedSubset
from mlkd_cli.data.transforms import build_eval_transform
from mlkd_cli.export.agreement import cascade_decisions, check_agreement, saved_operating_point
from mlkd_cli.export.int8_plan import Int8Plan, Int8Target
from mlkd_cli.export.session import open_session
from mlkd_cli.passes.logits import card_image_config, split_dataset

BATCH = 32  # images a calibration or comparison batch holds
CALIBRATION_SEED = 0


def _batches(
    dataset: TransformedSubset, positions: list[int]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The images at `positions`, transformed once, in batches of BATCH (float32 NCHW), each
    with its labels."""
    batches = []
    for start in range(0, len(positions), BATCH):
        items = [dataset[p] for p in positions[start : start + BATCH]]  # (image, label, position)
        images = torch.stack([item[0] for item in items]).numpy()
        batches.append((images, np.array([item[1] for item in items])))
    return batches


def calibration_batches(plan: Int8Plan) -> list[np.ndarray]:
    """`calibration_images` training images (a seeded draw), as the model sees them."""
    splits = plan.splits
    train = TransformedSubset(
        splits.train, splits.train_indices, build_eval_transform(card_image_config(plan.card))
    )
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    order = torch.randperm(len(train), generator=generator).tolist()
    return [images for images, _ in _batches(train, order[: plan.options.calibration_images])]


def quantize_export(plan: Int8Plan, fp32: Path, destination: Path) -> dict[str, Any]:
    """Quantize the verified fp32 ONNX at `fp32` into `destination`, compare both on the
    validation split, and place the file only when every head (and the cascade) agrees
    enough."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibration = calibration_batches(plan)
    name = _input_name(fp32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {name: batch}

    with (
        tempfile.TemporaryDirectory(prefix=".int8-", dir=destination.parent) as scratch,
        _quiet_root_logger(),
    ):
        prepared, quantized = Path(scratch) / "prepared.onnx", Path(scratch) / "int8.onnx"
        quant_pre_process(str(fp32), str(prepared))  # shape inference and folding first
        quantize_static(
            str(prepared),
            str(quantized),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=plan.target.reduce_range,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
        )
        parity = compare_on_validation(plan, fp32, quantized)
        check_agreement(parity, plan.options.min_agreement, plan.target)
        _copy_metadata(fp32, quantized, plan.target)
        os.replace(quantized, destination)
    return {
        "format": "onnx-int8",
        "output": str(destination),
        "calibration_images": sum(b.shape[0] for b in calibration),
        "fp32_bytes": fp32.stat().st_size,
        "int8_bytes": destination.stat().st_size,
        "target": plan.target.name,
        "reduce_range": plan.target.reduce_range,
        "target_line": plan.target.describe(),
        **parity,
    }


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantizer warns on the root logger for every 1-D weight it leaves per
    tensor (norm scales): dozens of lines that say nothing to the user; kept off stderr."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _input_name(path: Path) -> str:
    return open_session(path).get_inputs()[0].name


def compare_on_validation(plan: Int8Plan, fp32: Path, int8: Path) -> dict[str, Any]:
    """On the validation split: the top-1 agreement (%) of every output (`heads`, final first)
    and, where the fp32 file carries an operating point, of the cascade's decisions (`cascade`);
    each model's top-1 of the final head."""
    splits = plan.splits
    val = split_dataset(splits, "val", card_image_config(plan.card))
    batches = _batches(val, list(range(len(val))))
    labels = np.concatenate([batch_labels for _, batch_labels in batches])
    sessions = [open_session(p) for p in (fp32, int8)]
    name = sessions[0].get_inputs()[0].name
    heads = [output.name for output in sessions[0].get_outputs()]
    point = saved_operating_point(sessions[0].get_modelmeta().custom_metadata_map, len(heads))
    # Per model: each batch's (heads, n) top classes, and (2, n) cascade exits and classes.
    predictions: list[list[np.ndarray]] = [[], []]
    decisions: list[list[np.ndarray]] = [[], []]
    for batch, _ in batches:
        for which, session in enumerate(sessions):
            outputs = session.run(None, {name: batch})
            predictions[which].append(np.stack([o.argmax(axis=1) for o in outputs]))
            if point is not None:
                decisions[which].append(cascade_decisions(outputs, *point))
    top = [np.concatenate(predictions[which], axis=1) for which in (0, 1)]
    cascade = None
    if point is not None:
        taken = [np.concatenate(decisions[which], axis=1) for which in (0, 1)]
        cascade = {
            "thresholds": list(point[0]),
            "rule": point[1],
            "agreement": 100.0 * float((taken[0] == taken[1]).all(axis=0).mean()),
        }
    return {
        "images": int(len(labels)),
        "heads": heads,
        "agreement": [100.0 * float((top[0][h] == top[1][h]).mean()) for h in range(len(heads))],
        "cascade": cascade,
        "top1_fp32": 100.0 * float((top[0][0] == labels).mean()),
        "top1_int8": 100.0 * float((top[1][0] == labels).mean()),
    }


def _copy_metadata(source: Path, target: Path, int8_target: Int8Target) -> None:
    """The fp32 file's metadata (card, exits record) onto the int8 file, with its target."""
    import onnx

    model = onnx.load(str(target))
    present = {p.key for p in model.metadata_props}
    for entry in onnx.load(str(source)).metadata_props:
        if entry.key not in present:
            added = model.metadata_props.add()
            added.key, added.value = entry.key, entry.value
    weights = "7-bit weights" if int8_target.reduce_range else "8-bit weights"
    for key, value in (
        ("mlkd_quantized", f"int8 (onnxruntime static, QDQ, per channel, {weights})"),
        (INT8_TARGET_KEY, int8_target.name),
    ):
        added = model.metadata_props.add()
        added.key, added.value = key, value
    onnx.save(model, str(target))
