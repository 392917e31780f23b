"""int8 ONNX: a verified fp32 export quantized by onnxruntime's own static quantization, kept
only when it agrees with the fp32 model.

Calibration runs `--calibration-images` training images (a seeded draw, the evaluation
transform the model card records) through the fp32 model; weights are quantized per channel to
int8 and activations to uint8 (QDQ format, what onnxruntime's CPU kernels run fastest). Then
both models classify the validation split: the share of images on which their top classes agree
on every head of a student with exits, and on the cascade's decisions (the head each image
leaves at and its class) where the file carries an operating point, and the top-1 of each; a
file on which any of these falls under `--min-agreement` % is refused, not written.

The int8 target (`--int8-target`) is the CPU the file is for. On x86 without VNNI (`avx2`, and
`avx512` without VNNI) onnxruntime's kernels sum pairs of uint8 x int8 products in 16 bits,
which saturates on full 8-bit weights; there the weights are quantized to 7 bits
(`reduce_range`), which no CPU saturates. `vnni` keeps 8-bit weights: right where VNNI (or AMX)
accumulates in 32 bits, and the file records its target so that loading it on a CPU without
VNNI warns. `auto` is this CPU. A CPU that is not x86 (ARM widens its products and does not
saturate) or whose features cannot be read gets `avx2`'s 7-bit weights under `auto`: a file that
is right on every CPU it may later be copied to, at a cost in agreement too small to measure on
the students tried (issue #32: 100 % agreement with reduce_range on every one).
"""

from __future__ import annotations

import json
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

from mlkd_cli.anytime.rules import EXIT_RULE, cascade_from_outputs
from mlkd_cli.core.checkpoint import ModelCard
from mlkd_cli.core.console import OutputOptions
from mlkd_cli.core.constants import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_MIN_AGREEMENT,
    INT8_TARGETS,
)
from mlkd_cli.core.cpus import INT8_TARGET_KEY, TARGETS_NEEDING_VNNI, CpuFeatures, detect_cpu
from mlkd_cli.core.errors import UserError
from mlkd_cli.data.loaders import TransformedSubset
from mlkd_cli.data.registry import DataSplits, load_splits
from mlkd_cli.data.transforms import build_eval_transform
from mlkd_cli.engine.logits import card_recipe, data_dir_for, split_dataset

BATCH = 32  # images a calibration or comparison batch holds
CALIBRATION_SEED = 0


@dataclass(frozen=True)
class Int8Options:
    """What `mlkd export --int8` was asked for."""

    data_dir: Path | None = None  # None: the folder the card records, else ./data
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    target: str = "auto"
    output: OutputOptions = OutputOptions()


@dataclass(frozen=True)
class Int8Target:
    """The CPU an int8 file is quantized for, and what that means for its weights."""

    name: str  # avx2, avx512, vnni
    reduce_range: bool  # 7-bit weights, which no CPU's int8 kernels saturate
    reason: str  # why this target, for the user

    def describe(self) -> str:
        """One line: `int8 target avx2 (this CPU has no VNNI): reduce_range on`."""
        state = "on" if self.reduce_range else "off"
        return f"int8 target {self.name} ({self.reason}): reduce_range {state}"


def resolve_int8_target(requested: str, cpu: CpuFeatures) -> Int8Target:
    """The target `--int8-target requested` names on the CPU `cpu` (`auto`: that CPU)."""
    if requested not in INT8_TARGETS:
        raise UserError(
            f"--int8-target is one of {', '.join(INT8_TARGETS)}, not {requested[:100]!r}"
        )
    if requested != "auto":
        name, reason = requested, "as asked"
        if name in TARGETS_NEEDING_VNNI and cpu.is_x86 and cpu.flags and not cpu.has_vnni:
            reason = "as asked; this CPU has no VNNI, so the check below saturates"
    elif not cpu.is_x86:
        name, reason = "avx2", f"this CPU is {cpu.machine or 'unknown'}, not x86: 7-bit weights"
    elif cpu.flags is None:
        name, reason = "avx2", "this CPU's features are unknown: 7-bit weights"
    elif cpu.has_vnni:
        name, reason = "vnni", "this CPU has VNNI"
    elif cpu.has_avx512:
        name, reason = "avx512", "this CPU has AVX-512 but no VNNI"
    else:
        name, reason = "avx2", "this CPU has no VNNI"
    return Int8Target(name, name not in TARGETS_NEEDING_VNNI, reason)


@dataclass(frozen=True)
class Int8Plan:
    """A checked quantization: the options, the target, the model card and its data."""

    options: Int8Options
    card: ModelCard
    splits: DataSplits
    target: Int8Target


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
    target = resolve_int8_target(options.target, detect_cpu())
    data_dir = data_dir_for(options.data_dir, None, card, checkpoint, options.output)
    splits = load_splits(card.dataset, data_dir, False, card.extra.get("val_fraction", 0.1))
    if splits.num_classes != card.num_classes:
        raise UserError(
            f"{card.dataset} in {data_dir} has {splits.num_classes} classes and "
            f"{checkpoint} {card.num_classes}; pass the --data-dir it was trained on"
        )
    return Int8Plan(options, card, splits, target)


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
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.get_inputs()[0].name


def compare_on_validation(plan: Int8Plan, fp32: Path, int8: Path) -> dict[str, Any]:
    """On the validation split: the top-1 agreement (%) of every output (`heads`, final first)
    and, where the fp32 file carries an operating point, of the cascade's decisions (`cascade`);
    each model's top-1 of the final head."""
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


def saved_operating_point(metadata: dict[str, str], heads: int) -> tuple[list[float], str] | None:
    """The thresholds and exit rule an exported student with exits carries (`mlkd eval --split
    val --early-exit` chose them), None for a plain model or a student without them."""
    try:
        chosen = (json.loads(metadata.get("mlkd_exits", "null")) or {}).get("thresholds") or {}
        values = [float(v) for v in chosen.get("values") or []]
    except (ValueError, TypeError, AttributeError):
        return None
    if not values or len(values) != heads - 1:
        return None
    return values, str(chosen.get("rule", EXIT_RULE))


def cascade_decisions(outputs: list[np.ndarray], thresholds: list[float], rule: str) -> np.ndarray:
    """(2, images): the head each image leaves the cascade at and the class it is given there,
    from every head's logits (an exported graph's outputs: final first)."""
    logits, taken = cascade_from_outputs([torch.from_numpy(o) for o in outputs], thresholds, rule)
    return np.stack([taken.numpy(), logits.argmax(dim=1).numpy()])


def agreement_shortfalls(parity: dict[str, Any], min_agreement: float) -> list[str]:
    """`98.50 % (exit1)` for each head, and the cascade, that agrees on less than
    `min_agreement` % of the images."""
    short = [
        f"{agreement:.2f} % ({head})"
        for head, agreement in zip(parity["heads"], parity["agreement"], strict=True)
        if agreement < min_agreement
    ]
    cascade = parity.get("cascade")
    if cascade is not None and cascade["agreement"] < min_agreement:
        short.append(f"{cascade['agreement']:.2f} % (the cascade's exits and classes)")
    return short


def check_agreement(parity: dict[str, Any], min_agreement: float, target: Int8Target) -> None:
    """Refuse an int8 model any of whose heads, or whose cascade, agrees too little."""
    short = agreement_shortfalls(parity, min_agreement)
    if not short:
        return
    fix = "calibrate on more images with --calibration-images, or keep fp32"
    if not target.reduce_range:
        fix = f"try --int8-target avx2 (7-bit weights), {fix}"
    raise UserError(
        f"the int8 model agrees with fp32 on {', '.join(short)} of the {parity['images']} "
        f"validation images, under --min-agreement {min_agreement:g}; not written ({fix})"
    )


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
