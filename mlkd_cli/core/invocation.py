"""The command line mlkd was invoked with, as the root command received it (the console script's
arguments, or those a test passes in-process), for the provenance a run records."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

_ARGS: list[str] | None = None


def record_invocation(args: Sequence[str] | None) -> None:
    """Remember the arguments the root command runs with (None: the process's own)."""
    global _ARGS
    _ARGS = None if args is None else [str(a) for a in args]


def command_line() -> str:
    """`mlkd ARGS...` as typed, shell-quoted."""
    args = _ARGS if _ARGS is not None else sys.argv[1:]
    return shlex.join(["mlkd", *args])
