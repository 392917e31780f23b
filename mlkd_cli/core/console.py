"""Terminal output: rich on rank 0, quiet mode, JSON mode."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


@dataclass(frozen=True)
class OutputOptions:
    """How a run talks to the user; travels to DDP workers inside the run's config."""

    quiet: bool = False
    json: bool = False


class Reporter:
    """Prints progress, per-epoch lines and result tables, but only on rank 0.

    Logs and progress go to stderr so that stdout carries only results (tables or JSON).
    Progress bars appear only on a terminal; `--quiet` silences everything but results.
    """

    def __init__(self, options: OutputOptions = OutputOptions(), rank: int = 0) -> None:
        self.options = options
        self.enabled = rank == 0
        self.err = Console(stderr=True, highlight=False)
        self.out = Console(highlight=False)

    @property
    def chatty(self) -> bool:
        """True when informational lines should be printed."""
        return self.enabled and not self.options.quiet and not self.options.json

    def info(self, message: str) -> None:
        """One informational line on stderr (rank 0, not quiet)."""
        if self.chatty:
            self.err.print(message, soft_wrap=True, markup=False)

    def warn(self, message: str) -> None:
        """A warning on stderr; shown even when quiet, on rank 0 only."""
        if self.enabled:
            self.err.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)

    def progress(self) -> AbstractContextManager[Progress | None]:
        """A rich progress display when on a terminal and not quiet, else a no-op context."""
        if not (self.chatty and self.err.is_terminal):
            return nullcontext(None)
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.err,
            transient=True,
        )

    @contextmanager
    def step_progress(
        self, description: str, total: int
    ) -> Iterator[Callable[[int, float | None], None] | None]:
        """A progress bar for one pass of `total` steps, as an `on_step(done, loss)` callback.

        Yields None when nothing is shown, so the caller does no per-step work for it.
        """
        with self.progress() as progress:
            if progress is None:
                yield None
                return
            task = progress.add_task(description, total=total, status="")

            def on_step(done: int, loss: float | None) -> None:
                status = {} if loss is None else {"status": f"loss {loss:.4f}"}
                progress.update(task, completed=done, **status)

            yield on_step

    def epoch_table(
        self, title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
    ) -> None:
        """A progress table on stderr (rank 0, not quiet): what a long run reports as it goes."""
        if not self.chatty:
            return
        self.err.print(title, soft_wrap=True, markup=False)
        table = Table()
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*(format_value(v) for v in row))
        self.err.print(table)

    def table(self, title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """A result table on stdout (rank 0; suppressed in JSON mode, kept when quiet)."""
        if not self.enabled or self.options.json:
            return
        table = Table(title=title)
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*(format_value(v) for v in row))
        self.out.print(table)

    def result(self, payload: Mapping[str, Any]) -> None:
        """The machine-readable result: one JSON object on stdout in JSON mode."""
        if self.enabled and self.options.json:
            sys.stdout.write(json.dumps(payload, default=str) + "\n")
            sys.stdout.flush()


def format_value(value: Any) -> str:
    """Render a table cell: floats with 4 significant decimals, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
