"""The exceptions that end a run with one line instead of a traceback, and their exit codes."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing data, wrong file): one line, exit code 2."""


class RunStopped(Exception):
    """A run that could not go on (a worker died, the loss diverged): one line, exit code 1."""


class RunInterrupted(RunStopped):
    """A run stopped on request (SIGINT/SIGTERM) after saving its state: exit 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
