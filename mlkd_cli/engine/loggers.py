"""Where each epoch's metrics go besides the run's history files: `--log-to NAME[,NAME]`.

History (`<name>_history.json/.csv`) is always written; a metric logger receives the same rows.
A new destination (MLflow, W&B) is one class with `log_epoch` and `close`, and one entry in
`LOGGERS`.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from mlkd_cli.core.errors import UserError


class MetricLogger(Protocol):
    """Receives every epoch's row (the history's columns) on rank 0."""

    def log_epoch(self, row: dict[str, Any]) -> None:
        """Record one epoch's metrics; `row["epoch"]` is the step."""

    def close(self) -> None:
        """Flush and release whatever the logger holds."""


class TensorBoardLogger:
    """Scalars in `<output-dir>/<name>_tensorboard/`: losses by component, validation, speed."""

    requires = "tensorboard"

    def __init__(self, output_dir: Path, name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = output_dir / f"{name}_tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_epoch(self, row: dict[str, Any]) -> None:
        """One scalar per numeric column, grouped as train/, val/ and run/."""
        for key, value in row.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            self.writer.add_scalar(_tag(key), value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        """Close the event file."""
        self.writer.close()


def _tag(key: str) -> str:
    if key.startswith("val_") or key.endswith(("_top1", "_nll")):
        return f"val/{key.removeprefix('val_')}"
    if key in ("train_loss", "kd", "ce") or key.endswith("_loss"):
        return f"train/{key.removeprefix('train_')}"
    return f"run/{key}"


LOGGERS: dict[str, Callable[[Path, str], MetricLogger]] = {"tensorboard": TensorBoardLogger}


def parse_log_to(text: str | None) -> list[str]:
    """`--log-to tensorboard[,...]` as names, each checked to exist and to be installed."""
    if not text:
        return []
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        if name not in LOGGERS:
            raise UserError(f"--log-to {name}: choose from {', '.join(sorted(LOGGERS))}")
        package = getattr(LOGGERS[name], "requires", None)
        if package and importlib.util.find_spec(package) is None:
            raise UserError(
                f"--log-to {name} needs the {package} package: pip install 'mlkd[{name}]'"
            )
    return names


def build_loggers(names: list[str], output_dir: Path, run_name: str) -> list[MetricLogger]:
    """The loggers a run asked for (call on rank 0 only)."""
    return [LOGGERS[name](output_dir, run_name) for name in names]
