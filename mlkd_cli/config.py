"""Typed run configurations, with every default in one place; presets and flags fill them in."""

from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from mlkd_cli.console import OutputOptions, UserError

C = TypeVar("C")


@dataclass
class TeacherTrainConfig:
    """Everything `mlkd teacher train` needs: data, model, optimisation, launch and output."""

    dataset: str
    model: str
    name: str | None = None
    data_dir: Path = Path("data")
    download: bool = False
    val_fraction: float = 0.1
    img_size: int | None = None  # None: the dataset's own size
    pretrained: bool = False
    init_checkpoint: Path | None = None
    epochs: int = 30
    batch_size: int = 64  # per process, per forward pass
    effective_batch_size: int | None = (
        None  # per optimiser step over all ranks; None: no accumulation
    )
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    seed: int = 0
    world_size: int = 1
    device: str = "auto"
    workers: int | None = None
    output_dir: Path = Path("models")
    resume: bool = False
    overwrite: bool = False
    output: OutputOptions = field(default_factory=OutputOptions)

    @property
    def run_name(self) -> str:
        """The name the run's files carry: `--name`, or `<dataset>_<model>`."""
        return self.name or f"{self.dataset}_{self.model}"

    def accumulation_steps(self, world_size: int) -> int:
        """Forward passes per optimiser step so that the global batch is `effective_batch_size`."""
        per_step = self.batch_size * world_size
        if self.effective_batch_size is None:
            return 1
        if self.effective_batch_size % per_step:
            raise UserError(
                f"--effective-batch-size {self.effective_batch_size} is not a multiple of "
                f"--batch-size x world size = {per_step}; change one of them"
            )
        return self.effective_batch_size // per_step

    def validate(self) -> None:
        """Refuse impossible values before any work starts."""
        positive = {
            "epochs": self.epochs,
            "batch-size": self.batch_size,
            "world-size": self.world_size,
        }
        if self.effective_batch_size is not None:
            positive["effective-batch-size"] = self.effective_batch_size
        if self.img_size is not None:
            positive["img-size"] = self.img_size
        for flag, value in positive.items():
            if value < 1:
                raise UserError(f"--{flag} must be at least 1, got {value}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        for flag, value in {
            "weight-decay": self.weight_decay,
            "warmup-epochs": self.warmup_epochs,
            "mixup-alpha": self.mixup_alpha,
            "cutmix-alpha": self.cutmix_alpha,
        }.items():
            if value < 0:
                raise UserError(f"--{flag} must not be negative, got {value}")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers must not be negative, got {self.workers}")
        if (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.batch_size < 2:
            raise UserError("Mixup/CutMix mixes pairs of images: use --batch-size 2 or more")
        if self.resume and self.overwrite:
            raise UserError("--resume continues a run and --overwrite replaces it; pass one")
        self.accumulation_steps(self.world_size)

    def to_record(self) -> dict[str, Any]:
        """Plain values for history files and checkpoints (paths as strings)."""
        record = asdict(self)
        record.pop("output")
        return {k: str(v) if isinstance(v, Path) else v for k, v in record.items()}


def config_field_names(cls: type) -> set[str]:
    """The settable keys of a config class (what presets and flags may name)."""
    return {f.name for f in fields(cls) if f.name != "output"}


def build_config(cls: type[C], values: dict[str, Any], origin: str = "settings") -> C:
    """Make a config from merged preset + flag values, checking each value's type.

    `origin` names where the values came from, for the error message.
    """
    hints = typing.get_type_hints(cls)
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key not in hints:
            raise UserError(f"{origin}: unknown setting {key!r}")
        checked[key] = _coerce(key, value, hints[key], origin)
    missing = [f.name for f in fields(cls) if f.name not in checked and _required(f)]
    if missing:
        flag = missing[0].replace("_", "-")
        raise UserError(f"--{flag} is required (on the command line or in a --preset)")
    return cls(**checked)


def _required(f: Any) -> bool:
    from dataclasses import MISSING

    return f.default is MISSING and f.default_factory is MISSING


def _coerce(key: str, value: Any, hint: Any, origin: str) -> Any:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise UserError(f"{origin}: {key} must not be empty")
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if option is Path and isinstance(value, (str, Path)):
            return Path(value)
        if option is OutputOptions and isinstance(value, OutputOptions):
            return value
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise UserError(f"{origin}: {key} must be {wanted}, got {value!r}")
