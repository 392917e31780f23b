"""int8 before any work: `mlkd export --int8`'s flags, the CPU the file is for, and the data its
calibration and comparison read, checked before any export is written.

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

from dataclasses import dataclass
from pathlib import Path

from mlkd_cli.core.checkpoint import ModelCard
from mlkd_cli.core.console import OutputOptions
from mlkd_cli.core.constants import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_MIN_AGREEMENT,
    INT8_TARGETS,
)
from mlkd_cli.core.cpus import TARGETS_NEEDING_VNNI, CpuFeatures, detect_cpu
from mlkd_cli.core.errors import UserError
from mlkd_cli.data.registry import DataSplits, load_splits
from mlkd_cli.passes.logits import data_dir_for


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
