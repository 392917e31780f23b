"""Per-epoch metrics written beside the checkpoints as JSON and CSV, atomically, on rank 0."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from mlkd_cli.core.atomic import atomic_write_text


class History:
    """The rows of a run, one per epoch, saved as `<name>_history.json` and `.csv`."""

    def __init__(self, output_dir: Path, name: str, run_info: dict[str, Any]) -> None:
        self.json_path = output_dir / f"{name}_history.json"
        self.csv_path = output_dir / f"{name}_history.csv"
        self.run_info = run_info
        self.rows: list[dict[str, Any]] = []

    def append(self, row: dict[str, Any]) -> None:
        """Add one epoch's metrics."""
        self.rows.append(dict(row))

    def save(self) -> None:
        """Write both files (call on rank 0 only)."""
        atomic_write_text(
            self.json_path,
            json.dumps({**self.run_info, "epochs": self.rows}, indent=2, default=str) + "\n",
        )
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.csv_path, buffer.getvalue())
