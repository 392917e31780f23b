"""Self-describing, atomically written checkpoints, loaded without unpickling arbitrary objects.

A model checkpoint is a dict with timm's `state_dict` key beside plain metadata, so
`timm.create_model(arch, checkpoint_path=path, num_classes=n)` loads it with no mlkd installed,
and `mlkd eval` knows the architecture, classes and image config without being told.
"""

from __future__ import annotations

import argparse
import math
import pickle
import struct
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlkd_cli import __version__
from mlkd_cli.core.atomic import atomic_write
from mlkd_cli.core.constants import MAX_CLASSES, MAX_IMG_SIZE
from mlkd_cli.core.errors import UserError
from mlkd_cli.core.safeload import load_json, quote

MODEL_FORMAT = "mlkd-model/1"
# A student with its exits: the state dict of the whole multi-exit network (`backbone.*` is the
# plain timm model, `exits.*` the branches), the card, and an `exits` record (stages, MACs,
# thresholds once chosen).
EXITS_FORMAT = "mlkd-exits/1"
BACKBONE_PREFIX = "backbone."
# The one class besides tensors and containers that a checkpoint may hold: timm's train.py
# pickles its arguments (`args`) as an argparse.Namespace, a plain attribute bag.
SAFE_CLASSES = (argparse.Namespace,)
# Where a checkpoint keeps its weights: timm's EMA copy first (when wanted), then the raw ones.
EMA_KEY = "state_dict_ema"
WEIGHT_KEYS = ("state_dict", "model")
TRAINING_STATE_FORMAT = "mlkd-training-state/1"
# What a card may record: a file's metadata sizes allocations, so it is bounded before use.
CROP_PCT_RANGE = (0.1, 1.0)


@dataclass
class ModelCard:
    """What a checkpoint must say about its model for anyone to use it correctly."""

    arch: str
    num_classes: int
    class_names: list[str]
    dataset: str
    img_size: int
    crop_pct: float
    mean: list[float]
    std: list[float]
    interpolation: str = "bicubic"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], origin: str = "checkpoint") -> ModelCard:
        """Read the card back from a loaded checkpoint dict, checking what it records."""
        check_card(checkpoint, origin)
        names = [f.name for f in cls.__dataclass_fields__.values()]
        return cls(**{k: checkpoint[k] for k in names if k in checkpoint})

    @classmethod
    def from_json(cls, text: str, origin: str) -> ModelCard:
        """The card an export's header holds as JSON text (safetensors, ONNX), checked."""
        return cls.from_checkpoint(_card_record(text, origin), origin)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_channels(value: Any) -> bool:
    return isinstance(value, list) and len(value) in (1, 3) and all(map(_is_finite, value))


# Each card field: whether a value is acceptable, and what it must be (for the error line).
_CARD_RULES: dict[str, tuple[Any, str]] = {
    "arch": (lambda v: isinstance(v, str) and 0 < len(v) <= 200, "a model name"),
    "num_classes": (
        lambda v: _is_int(v) and 1 <= v <= MAX_CLASSES,
        f"a whole number from 1 to {MAX_CLASSES}",
    ),
    "class_names": (
        lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
        "a list of names",
    ),
    "dataset": (lambda v: isinstance(v, str), "a dataset name"),
    "img_size": (
        lambda v: _is_int(v) and 1 <= v <= MAX_IMG_SIZE,
        f"a whole number of pixels from 1 to {MAX_IMG_SIZE}",
    ),
    "crop_pct": (
        lambda v: _is_finite(v) and CROP_PCT_RANGE[0] <= v <= CROP_PCT_RANGE[1],
        f"a number from {CROP_PCT_RANGE[0]} to {CROP_PCT_RANGE[1]}",
    ),
    "mean": (_is_channels, "a list of 1 or 3 finite numbers"),
    "std": (
        lambda v: _is_channels(v) and all(x > 0 for x in v),
        "a list of 1 or 3 positive numbers",
    ),
    "interpolation": (lambda v: isinstance(v, str), "an interpolation name"),
    "extra": (lambda v: isinstance(v, dict), "a mapping"),
}
_OPTIONAL_CARD_FIELDS = {"interpolation", "extra"}


def check_card(record: dict[str, Any], origin: str) -> None:
    """Refuse a card (a checkpoint's metadata) whose fields are missing, mistyped or unbounded.

    A file's `img_size: 100000` would otherwise size a 3.8 TB allocation.
    """
    for key, (acceptable, wanted) in _CARD_RULES.items():
        if key not in record:
            if key in _OPTIONAL_CARD_FIELDS:
                continue
            raise UserError(f"{origin} records no {key}; re-save it with mlkd")
        if not acceptable(record[key]):
            raise UserError(
                f"{origin} records {key} {quote(record[key], 60)}; it must be {wanted} "
                "(the file is damaged or was edited)"
            )
    if len(record["class_names"]) != record["num_classes"]:
        raise UserError(
            f"{origin} records {record['num_classes']} classes but "
            f"{len(record['class_names'])} class names (the file is damaged or was edited)"
        )


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save such that a crash or full disk mid-write leaves the previous file intact."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def save_model(
    path: Path,
    model: torch.nn.Module,
    card: ModelCard,
    epoch: int,
    metrics: dict[str, float],
) -> None:
    """Write a plain timm state dict with the model card, epoch and metrics beside it."""
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    card_dict = asdict(card)
    atomic_save(
        {
            "format": MODEL_FORMAT,
            "state_dict": state_dict,
            **card_dict,
            "epoch": epoch,
            "metrics": dict(metrics),
            "mlkd_version": __version__,
        },
        path,
    )


def save_exits_model(
    path: Path,
    student: torch.nn.Module,
    card: ModelCard,
    exits: dict[str, Any],
    epoch: int,
    metrics: dict[str, float],
) -> None:
    """Write a student with its exits: the whole network's state dict, the card, `exits`."""
    state_dict = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    atomic_save(
        {
            "format": EXITS_FORMAT,
            "state_dict": state_dict,
            **asdict(card),
            "exits": exits,
            "epoch": epoch,
            "metrics": dict(metrics),
            "mlkd_version": __version__,
        },
        path,
    )


def load_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """Load a .pth file with `weights_only=True`, turning every failure into a UserError.

    `mmap` maps the tensors instead of reading them (for a look at the metadata).
    """
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path")
    try:
        with torch.serialization.safe_globals(list(SAFE_CLASSES)):
            content = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower():
            raise UserError(
                f"{path} holds objects that need arbitrary code to unpickle, which mlkd refuses; "
                "re-save it as a plain state dict or .safetensors"
            ) from exc
        raise UserError(f"{path} is not a readable checkpoint (damaged pickle data)") from exc
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        IndexError,
        struct.error,
        zipfile.BadZipFile,
    ) as exc:
        # An untrusted file can fail the restricted unpickler in many ways; all mean "unreadable".
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        first_line = first_line.split(". ", 1)[0]  # torch appends paragraphs of advice
        raise UserError(
            f"{path} is not a readable checkpoint ({first_line}); it may be truncated, re-save it"
        ) from exc
    if isinstance(content, dict) and content.get("format") in (MODEL_FORMAT, EXITS_FORMAT):
        check_card(content, str(path))
    return content


def read_weights(path: Path, ema: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and whatever metadata a .pth or .safetensors file carries.

    A checkpoint of timm's train.py holds its EMA weights beside the raw ones; they are taken
    unless `ema` is False. `meta["weights_key"]` says which key the weights came from. A student
    with exits gives its plain timm model's weights.
    """
    if path.suffix == ".safetensors":
        tensors, meta = read_safetensors(path)
        return (_plain_part(tensors) if "mlkd_exits" in meta else tensors), meta
    content = load_checkpoint(path)
    if not isinstance(content, dict):
        raise UserError(f"{path} holds a {type(content).__name__}, not a state dict")
    if content.get("format") == EXITS_FORMAT and isinstance(content.get("state_dict"), dict):
        # Wherever a plain model is wanted, a student with exits gives its timm model.
        meta = {k: v for k, v in content.items() if k != "state_dict"}
        return _plain_part(content["state_dict"]), meta
    keys = (EMA_KEY, *WEIGHT_KEYS) if ema else WEIGHT_KEYS
    for key in keys:
        if isinstance(content.get(key), dict):
            meta = {k: v for k, v in content.items() if k not in (key, EMA_KEY, "optimizer")}
            meta["weights_key"] = key
            meta["has_ema"] = isinstance(content.get(EMA_KEY), dict)
            return _strip_wrappers(content[key]), meta
    if content and all(isinstance(v, torch.Tensor) for v in content.values()):
        return _strip_wrappers(content), {}
    raise UserError(f"{path} has no state dict inside (no 'state_dict' or 'model' key)")


def _plain_part(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The timm model's weights inside a multi-exit student's state dict."""
    return {
        k.removeprefix(BACKBONE_PREFIX): v
        for k, v in state_dict.items()
        if k.startswith(BACKBONE_PREFIX)
    }


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and header metadata of a .safetensors file (whatever its name ends with)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (not iterable)
            meta = dict(handle.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path} is not a readable .safetensors file ({exc})") from exc
    if "mlkd" in meta:  # the card, as JSON text in the header
        check_card(_card_record(meta["mlkd"], str(path)), str(path))
    return tensors, meta


def _card_record(text: Any, origin: str) -> dict[str, Any]:
    if not isinstance(text, str):
        raise UserError(f"{origin}'s mlkd header is not JSON text; re-export the file")
    record = load_json(text, f"{origin}'s mlkd header")
    if not isinstance(record, dict):
        raise UserError(f"{origin}'s mlkd header is not a mapping; re-export the file")
    return record


def _strip_wrappers(state_dict: dict[str, Any]) -> dict[str, Any]:
    # DDP and torch.compile prefix parameter names; a plain model has neither.
    prefixes = ("module.", "_orig_mod.")
    cleaned = {}
    for key, value in state_dict.items():
        while key.startswith(prefixes):
            key = key.split(".", 1)[1]
        cleaned[key] = value
    return cleaned
