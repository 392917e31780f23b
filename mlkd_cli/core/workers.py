"""Where local DDP workers come from: a fork server, and whether torchrun started this process.

Torch-free on purpose: a command starts the fork server before it imports torch (see
`prepare_workers`), and `mlkd --help` imports this module.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import signal

START_METHOD = "forkserver"
# What the fork server imports once for every worker it forks: the first launch of a command
# pays these imports once, not once per worker, and a later launch in the same process (a
# pipeline's next stage, a restart) none. The worker's own module is added where the launch
# starts the server; a server `prepare_workers` started earlier leaves it to each worker, which
# costs 0.03-0.08 s (torch, timm and the launcher already loaded).
FORKSERVER_PRELOAD = ("torch", "timm", "mlkd_cli.engine.launch")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_stop_registered = False


def under_torchrun() -> bool:
    """True when torchrun (or any launcher setting RANK/WORLD_SIZE/LOCAL_RANK) started us."""
    return all(v in os.environ for v in TORCHRUN_VARIABLES)


def prepare_workers(world_size: int | None) -> None:
    """Start the fork server's imports now when this run will start local workers (world size
    above 1, not under torchrun), and return at once.

    A command calls it before it imports torch and checks its plan, so that the server's imports
    and the launcher's own run side by side instead of one after the other (about 4 s of a DDP
    command's start on two cores). A command that then stops (a bad value, a signal) takes the
    server down with it as it exits.
    """
    global _stop_registered
    if (world_size or 1) <= 1 or under_torchrun():
        return
    from multiprocessing import forkserver

    multiprocessing.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    forkserver.ensure_running()
    if not _stop_registered:
        atexit.register(_stop_fork_server)
        _stop_registered = True


def _stop_fork_server() -> None:
    """Kill this process's fork server at exit: one started for a run that never launched would
    otherwise go on importing torch for seconds after the command ended."""
    from multiprocessing import forkserver

    # The standard library keeps the server's pid private; without it there is nothing to stop.
    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
