"""SIGINT/SIGTERM during training: finish the step, save the state, stop with a resume hint.

A pre-empted cluster job gets SIGTERM and some seconds of grace; a user presses Ctrl-C. Either
way the run should not lose the epoch it is in. The handler only records the request; the
training loop looks at it after each optimiser step, where the state is consistent.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType, TracebackType
from typing import Any

import torch

from mlkd_cli.core.dist import DistContext

HANDLED = (signal.SIGINT, signal.SIGTERM)
# A Ctrl-C reaches a DDP worker twice: from the terminal (the whole process group) and from the
# launcher, which passes the signals it gets on to its workers. Copies this close together are
# one request; a person's second Ctrl-C comes later.
SAME_REQUEST_S = 1.0


class StopRequest:
    """Records SIGINT/SIGTERM while installed; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
        elif signum == signal.SIGINT and now - self._first_at > SAME_REQUEST_S:
            raise KeyboardInterrupt  # the user insists: stop now, without saving

    @property
    def name(self) -> str:
        """The signal's name, e.g. SIGTERM."""
        return signal.Signals(self.signum).name if self.signum else "request"

    def agreed(self, ctx: DistContext) -> int | None:
        """The signal to stop on if any rank got one (a collective: call on every rank alike)."""
        if not ctx.distributed:
            return self.signum
        flag = torch.tensor([float(self.signum or 0)], device=ctx.device, dtype=torch.float64)
        ctx.all_reduce_max(flag)
        signum = int(flag.item())
        if signum and self.signum is None:
            self.signum = signum
        return signum or None
