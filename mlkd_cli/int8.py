"""int8 ONNX: a verified fp32 export quantized by onnxruntime's own static quantization, kept
only when it agrees with the fp32 model.

Calibration runs `--calibration-images` training images (a seeded draw, the evaluation
transform the model card records) through the fp32 model; weights are quantized per channel to
int8 and activations to uint8 (QDQ format, what onnxruntime's CPU kernels run fastest). Then
both models classify the validation split: the share of images on which their top classes agree
(every head of a student with exits) and the top-1 of each are reported, and a file whose final
head agrees on less than `--min-agreement` % is refused, not written.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlkd_cli.core.checkpoint import ModelCard
from mlkd_cli.core.console import OutputOptions
from mlkd_cli.core.errors import UserError
from mlkd_cli.data.loaders import TransformedSubset
from mlkd_cli.data.registry import DataSplits, load_splits
from mlkd_cli.data.transforms import build_eval_transform
from mlkd_cli.engine.logits import card_recipe, data_dir_for, split_dataset

DEFAULT_CALIBRATION_IMAGES = 512
DEFAULT_MIN_AGREEMENT = 99.0
BATCH = 32  # images a calibration or comparison batch holds
CALIBRATION_SEED = 0


@dataclass(frozen=True)
class Int8Options:
    """What `mlkd export --int8` was asked for."""

    data_dir: Path | None = None  # None: the folder the card records, else ./data
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    output: OutputOptions = OutputOptions()


@dataclass(frozen=True)
class Int8Plan:
    """A checked quantization: the options, the model card and its data."""

    options: Int8Options
    card: ModelCard
    splits: DataSplits


def plan_int8(options: Int8Options, card: ModelCard | None, checkpoint: Path) -> Int8Plan:
    """Check the flags, onnxruntime and the data the card names, before any export."""
    if options.calibration_images < 1:
        raise UserError(
            f"--calibration-images must be at least 1, got {options.calibration_images}"
        )
    if not 0 < options.min_agreement <= 100:
        raise UserError(
            f"--min-agreement is a percentage in (0, 100], not {options.min_agreement:g}"
        )
    if card is None:
        raise UserError(
            f"{checkpoint} does not record its dataset, which --int8 calibrates and checks on; "
            "export an mlkd checkpoint"
        )
    try:
        import onnxruntime.quantization  # noqa: F401
    except ImportError:
        raise UserError("--int8 needs onnxruntime: pip install 'mlkd[export]'") from None
    data_dir = data_dir_for(options.data_dir, None, card, checkpoint, options.output)
    splits = load_splits(card.dataset, data_dir, False, card.extra.get("val_fraction", 0.1))
    if splits.num_classes != card.num_classes:
        raise UserError(
            f"{card.dataset} in {data_dir} has {splits.num_classes} classes and "
            f"{checkpoint} {card.num_classes}; pass the --data-dir it was trained on"
        )
    return Int8Plan(options, card, splits)


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
        splits.train, splits.train_indices, build_eval_transform(card_recipe(plan.card))
    )
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    order = torch.randperm(len(train), generator=generator).tolist()
    return [images for images, _ in _batches(train, order[: plan.options.calibration_images])]


def quantize_export(plan: Int8Plan, fp32: Path, destination: Path) -> dict[str, Any]:
    """Quantize the verified fp32 ONNX at `fp32` into `destination`, compare both on the
    validation split, and place the file only when the final head agrees enough."""
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
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
        )
        parity = compare_on_validation(plan, fp32, quantized)
        final = parity["agreement"][0]
        if final < plan.options.min_agreement:
            raise UserError(
                f"the int8 model agrees with fp32 on {final:.2f} % of the {parity['images']} "
                f"validation images, under --min-agreement {plan.options.min_agreement:g}; not "
                "written (calibrate on more images with --calibration-images, or keep fp32)"
            )
        _copy_metadata(fp32, quantized)
        os.replace(quantized, destination)
    return {
        "format": "onnx-int8",
        "output": str(destination),
        "calibration_images": sum(b.shape[0] for b in calibration),
        "fp32_bytes": fp32.stat().st_size,
        "int8_bytes": destination.stat().st_size,
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
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.get_inputs()[0].name


def compare_on_validation(plan: Int8Plan, fp32: Path, int8: Path) -> dict[str, Any]:
    """Top-1 agreement of every output (%, final first) and each model's top-1 of the final
    head on the validation split."""
    import onnxruntime

    splits = plan.splits
    val = split_dataset(splits, "val", card_recipe(plan.card))
    batches = _batches(val, list(range(len(val))))
    labels = np.concatenate([batch_labels for _, batch_labels in batches])
    sessions = [
        onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        for p in (fp32, int8)
    ]
    name = sessions[0].get_inputs()[0].name
    predictions: list[list[list[np.ndarray]]] = [[], []]
    for batch, _ in batches:
        for which, session in enumerate(sessions):
            outputs = session.run(None, {name: batch})
            predictions[which].append([o.argmax(axis=1) for o in outputs])
    heads = len(predictions[0][0])
    per_head = [
        [np.concatenate([b[h] for b in predictions[which]]) for h in range(heads)]
        for which in (0, 1)
    ]
    agreement = [100.0 * float((per_head[0][h] == per_head[1][h]).mean()) for h in range(heads)]
    return {
        "images": int(len(labels)),
        "agreement": agreement,
        "top1_fp32": 100.0 * float((per_head[0][0] == labels).mean()),
        "top1_int8": 100.0 * float((per_head[1][0] == labels).mean()),
    }


def _copy_metadata(source: Path, target: Path) -> None:
    """The fp32 file's metadata (card, exits record) onto the int8 file."""
    import onnx

    model = onnx.load(str(target))
    present = {p.key for p in model.metadata_props}
    for entry in onnx.load(str(source)).metadata_props:
        if entry.key not in present:
            added = model.metadata_props.add()
            added.key, added.value = entry.key, entry.value
    marker = model.metadata_props.add()
    marker.key, marker.value = "mlkd_quantized", "int8 (onnxruntime static, QDQ, per channel)"
    onnx.save(model, str(target))
