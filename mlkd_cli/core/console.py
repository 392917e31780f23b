"""Terminal output: rich on rank 0, quiet mode, JSON mode; tables that fit the terminal."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from rich import box
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

# A column of words wider than TEXT_WRAP is free text: it may wrap at its words, down to
# TEXT_MIN columns (or its longest word), taking what room the other columns leave.
TEXT_WRAP = 20
TEXT_MIN = 16
# A value without spaces (a path) wider than this folds onto more lines instead of being cut.
LONG_VALUE = 48
# The precision last shown in this process (`Reporter.precision`) and the lines said once a run
# (`Reporter.once`); `new_run` forgets both.
_shown_precision: list[str] = []
_said_once: set[str] = set()


def new_run() -> None:
    """Forget what earlier commands in this process said once per run (the precision line)."""
    _shown_precision.clear()
    _said_once.clear()


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

    def once(self, message: str) -> None:
        """An informational line said once a run, however many stages or arms plan again (a
        teacher's input, which a study's every arm settles the same way)."""
        if message in _said_once:
            return
        if self.chatty:
            _said_once.add(message)
        self.info(message)

    def precision(self, line: str, key: str) -> None:
        """The precision line, once a run: again only where `key` (arithmetic, layout, device)
        differs from the one shown last, e.g. a pipeline stage that runs otherwise."""
        if key in _shown_precision:
            return
        if self.chatty:
            _shown_precision[:] = [key]
        self.info(line)

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

    def table(self, title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """A result table on stdout (rank 0; suppressed in JSON mode, kept when quiet), fitted
        to the terminal's width (`fit_table`)."""
        if not self.enabled or self.options.json:
            return
        for table in fit_table(title, columns, rows, self.out.width):
            self.out.print(table)

    def result(self, payload: Mapping[str, Any]) -> None:
        """The machine-readable result: one JSON object on stdout in JSON mode."""
        if self.enabled and self.options.json:
            sys.stdout.write(json.dumps(payload, default=str) + "\n")
            sys.stdout.flush()


def saved_lines(files: Mapping[str, Any], model_note: str = "") -> list[str]:
    """What a training run wrote, every file named, a short line each: the model(s), then its
    records. `files` is a run summary's `files` (best, exits, periodic, history_csv,
    history_json, curves, last); `model_note` says what the best model is."""
    note = f" ({model_note})" if model_note else ""
    lines = [f"saved {files['best']}{note}"]
    if files.get("exits"):
        lines.append(f"saved {files['exits']} (the student with its exits)")
    periodic = files.get("periodic") or []
    if periodic:
        lines.append(f"saved {', '.join(str(p) for p in periodic)} (--save-frequency)")
    lines.append(f"history {files['history_csv']}, {files['history_json']}")
    lines.append(f"curves {files['curves']}; resume state {files['last']}")
    return lines


def format_value(value: Any) -> str:
    """Render a table cell: floats with 4 significant decimals, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def fit_table(
    title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]], width: int
) -> list[Table]:
    """The table as rich tables no wider than `width`, no value cut short.

    Headers wrap at their words and free text at its words; numbers and names keep a column as
    wide as their widest value. Where bordered columns do not fit, borders go; where even those
    do not fit, the columns are folded into several tables, each led by the first column (the
    row's name). Only a value too long for any column (a long path) folds onto more lines.
    """
    cells = [[format_value(v) for v in row] for row in rows]
    needs, naturals, texts = [], [], []
    for j, header in enumerate(columns):
        need, natural, text = _column_widths(header, [row[j] for row in cells])
        needs.append(need)
        naturals.append(natural)
        texts.append(text)
    if sum(needs) + 3 * len(needs) + 1 <= width:
        groups, compact = [list(range(len(columns)))], False
    else:
        groups, compact = _fold_columns(needs, width), True
    tables = []
    for g, group in enumerate(groups):
        picked = [0, *group] if g else group
        chrome = 2 * (len(picked) - 1) if compact else 3 * len(picked) + 1
        widths = _spread(
            [needs[j] for j in picked],
            [naturals[j] for j in picked],
            [texts[j] for j in picked],
            width - chrome,
        )
        table = _table(None if g else title, compact)
        for j, column_width in zip(picked, widths, strict=True):
            table.add_column(columns[j], width=column_width, overflow="fold")
        for row in cells:
            table.add_row(*(row[j] for j in picked))
        tables.append(table)
    return tables


def _column_widths(header: str, values: Sequence[str]) -> tuple[int, int, bool]:
    """How wide a column must be for its header's words and its values to stay whole, how wide
    it would be with nothing wrapped, and whether it holds free text (wrapped at its words)."""
    lines = [line for value in values for line in value.splitlines()] or [""]
    widest = max(len(line) for line in lines)
    natural = max(len(header), min(widest, 2 * LONG_VALUE))
    # A header takes at most two lines where its words allow: "% at exit 1" as "% at/exit 1".
    words = max((len(w) for w in header.split()), default=0)
    while words and len(textwrap.wrap(header, words)) > 2:
        words += 1
    text = widest > TEXT_WRAP and any(" " in line for line in lines)
    if text:  # free text: wrap its words
        longest_word = max(len(w) for line in lines for w in line.split() or [""])
        widest = max(longest_word, TEXT_MIN)
    return max(words, min(widest, LONG_VALUE)), natural, text


def _spread(
    needs: Sequence[int], naturals: Sequence[int], texts: Sequence[bool], room: int
) -> list[int]:
    """Column widths: each its natural width where all of those fit; else each its need (alike
    columns wrap their headers alike), and the room left shared among the free-text columns in
    proportion to what each lacks."""
    if sum(naturals) <= room:
        return list(naturals)
    widths = list(needs)
    lacking = [
        natural - need if text else 0
        for need, natural, text in zip(needs, naturals, texts, strict=True)
    ]
    spare, total = room - sum(widths), sum(lacking)
    if spare <= 0 or total <= 0:
        return widths
    for j, lack in enumerate(lacking):
        widths[j] += min(lack, spare * lack // total)
    return widths


def _fold_columns(needs: Sequence[int], width: int) -> list[list[int]]:
    """Column indices per borderless table (two spaces between columns): all in one where they
    fit, else the first column leads each table and the others fill them in order."""
    if sum(needs) + 2 * (len(needs) - 1) <= width:
        return [list(range(len(needs)))]
    groups: list[list[int]] = [[0]]
    used = needs[0]
    for j in range(1, len(needs)):
        fresh = groups[-1] in ([], [0])
        if not fresh and used + 2 + needs[j] > width:
            groups.append([])
            used = needs[0]
        groups[-1].append(j)
        used += 2 + needs[j]
    return groups


def _table(title: str | None, compact: bool) -> Table:
    if not compact:
        return Table(title=title)
    return Table(
        title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True
    )
