"""Run a worker function on one process, on N spawned DDP processes, or under torchrun.

Every command that trains or evaluates goes through `launch`, so the three ways of running share
one code path: the worker receives a `DistContext` and does the same thing whatever its rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from mlkd_cli.core.console import Reporter
from mlkd_cli.core.cpus import compute_threads
from mlkd_cli.core.dist import DistContext
from mlkd_cli.core.errors import RunInterrupted, RunStopped, UserError
from mlkd_cli.core.workers import (
    FORKSERVER_PRELOAD,
    START_METHOD,
    under_torchrun,
)
from mlkd_cli.data.loaders import default_cpu_workers
from mlkd_cli.engine.interrupt import HANDLED

T = TypeVar("T")
P = TypeVar("P")

# A collective that waits longer than this is a dead peer, not a slow one.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)
# How long workers told to stop (SIGTERM, Ctrl-C) get to finish their step and save their state
# before they are killed.
SHUTDOWN_GRACE_S = 120
# Workers start by fork from one server process that imported torch, timm and mlkd once
# (core/workers.py): every later launch in the same process (a pipeline's next stage, a restart)
# starts its workers in well under a second instead of ~5 s of imports each. The server holds no
# CUDA context and no threads.
# What this module saw of the environment when it was imported. In a forked worker that is the
# fork server's environment from before the elastic agent added the worker's own variables, which
# tells those apart (see `_adopt_launcher_environment`).
_IMPORT_ENVIRON = dict(os.environ)
# Variables the elastic agent sets for each worker (kept even where equal to the server's).
_AGENT_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


class WorkerDied(RunStopped):
    """A DDP worker ended without finishing (killed, out of memory, pre-empted)."""


def resolve_device(name: str) -> str:
    """Turn `auto|cpu|cuda` into the device type to use, refusing CUDA where there is none."""
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, not {name!r}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "--device cuda was asked for but no CUDA device is visible; use --device cpu"
        )
    return name


def launcher_rank() -> int:
    """This process's global rank as the launcher sees it: torchrun's RANK, else 0."""
    return int(os.environ["RANK"]) if under_torchrun() else 0


def launch(
    worker: Callable[[DistContext, P], T],
    payload: P,
    world_size: int,
    device: str,
    *,
    max_restarts: int = 0,
    memory_hint: str = "lower --batch-size",
    workers: int | None = None,
) -> T:
    """Run `worker(ctx, payload)` on every rank and return rank 0's result.

    One process runs the worker in place. `world_size` > 1 (or `max_restarts` > 0) starts
    local worker processes through PyTorch's elastic launcher (torchrun's engine), which reads
    each worker's return value while the workers run, so results of any size come back. A
    torchrun launch is detected from its environment and runs in place (its world size and its
    own --max-restarts win). A worker's `UserError`, interruption or stop comes back to the
    caller as the same exception; a worker that dies is restarted up to `max_restarts` times
    (training resumes from its last saved state), then reported as `WorkerDied`.
    `memory_hint` is what an out-of-memory report tells the user to do; `workers` is the
    run's `--workers` (None: the loaders' default), which a CPU process leaves cores for.
    """
    device_type = resolve_device(device)
    if world_size < 1:
        raise UserError(f"--world-size must be at least 1, got {world_size}")
    if max_restarts < 0:
        raise UserError(f"--max-restarts must not be negative, got {max_restarts}")
    if under_torchrun():
        local_rank = int(os.environ["LOCAL_RANK"])
        ctx = _init_process(
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            local_rank,
            device_type,
            int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            workers,
        )
        try:
            return _run_worker(worker, ctx, payload, memory_hint)
        finally:
            _shutdown(ctx)
    if device_type == "cuda" and world_size > torch.cuda.device_count():
        raise UserError(
            f"--world-size {world_size} needs {world_size} GPUs but only "
            f"{torch.cuda.device_count()} are visible; lower --world-size"
        )
    if world_size == 1 and max_restarts == 0:
        torch_device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        if device_type == "cuda":
            torch.cuda.set_device(torch_device)
        else:
            use_cpu_share(1, workers)
        return _run_worker(worker, DistContext(0, 1, 0, torch_device), payload, memory_hint)
    return _elastic(worker, payload, world_size, device_type, max_restarts, memory_hint, workers)


def _run_worker(
    worker: Callable[[DistContext, P], T], ctx: DistContext, payload: P, memory_hint: str
) -> T:
    """The worker, with an out-of-memory error turned into one line naming what to lower."""
    try:
        return worker(ctx, payload)
    except torch.OutOfMemoryError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else "out of memory"
        raise RunStopped(
            f"{ctx.device.type.upper()} ran out of memory on rank {ctx.rank} ({detail}); "
            f"{memory_hint}"
        ) from None


def _elastic(
    worker: Callable[[DistContext, P], T],
    payload: P,
    world_size: int,
    device_type: str,
    max_restarts: int,
    memory_hint: str,
    workers: int | None,
) -> T:
    """Start `world_size` local workers through torch's elastic launcher, restarting on death."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    given_port = os.environ.get("MASTER_PORT")
    if given_port is not None and not port_is_free(
        os.environ.get("MASTER_ADDR", "127.0.0.1"), given_port
    ):
        Reporter().warn(f"MASTER_PORT {given_port} is busy or invalid; using a free port")
    _start_fork_server(worker.__module__)
    scratch = Path(tempfile.mkdtemp(prefix="mlkd-launch-"))
    try:
        for attempt in range(max_restarts + 1):
            reports = scratch / f"attempt{attempt}"
            reports.mkdir()
            try:
                with _LauncherState():
                    results = elastic_launch(
                        _launch_config(world_size, scratch / f"logs{attempt}"), _elastic_entry
                    )(
                        worker,
                        payload,
                        device_type,
                        attempt,
                        str(reports),
                        memory_hint,
                        workers,
                        dict(os.environ),
                    )
            except SignalException as exc:
                _kill_children()
                signum = int(exc.sigval)
                raise _reported(reports, world_size) or RunInterrupted(
                    f"stopped by {signal.Signals(signum).name} before the workers finished; "
                    "nothing was written by this pass",
                    signum,
                ) from None
            except ChildFailedError as exc:
                _kill_children()
                killed = any(f.exitcode < 0 for f in exc.failures.values())
                reported = _reported(reports, world_size, crashes=not killed)
                if reported is not None:
                    raise reported from None
                died = _death_message(exc, world_size, memory_hint)
                if attempt < max_restarts:
                    Reporter().warn(
                        f"{died}; restarting every worker from the last saved state "
                        f"(restart {attempt + 1} of {max_restarts})"
                    )
                    continue
                raise WorkerDied(
                    f"{died}; the others were stopped. A training run continues from its last "
                    "saved state with --resume (or add --max-restarts N to restart by itself)"
                ) from None
            return results[0]
        raise AssertionError("unreachable")  # the loop returns or raises
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _start_fork_server(worker_module: str) -> None:
    """Start the fork server (the first launch of this process only) and wait until it has
    imported what workers need.

    Starting workers then takes a fork each, so a signal cannot catch one half-started: a worker
    forked after the launcher had stopped would fail on the launcher's removed locks, with a
    traceback. A signal while the server imports stops the launch with one line.
    """
    mp.set_forkserver_preload([*FORKSERVER_PRELOAD, worker_module])

    def stop(signum: int, frame: object) -> None:
        raise RunInterrupted(
            f"stopped by {signal.Signals(signum).name} before the workers started; "
            "nothing was written by this pass",
            signum,
        )

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, stop) for signum in HANDLED}
    try:
        probe = mp.get_context(START_METHOD).Process(target=_fork_server_ready, daemon=True)
        probe.start()
        probe.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _fork_server_ready() -> None:
    """What the probe process runs: nothing (it shows the fork server can fork)."""


def _launch_config(world_size: int, log_dir: Path) -> Any:
    """One node, `world_size` workers, a rendezvous on a free loopback port, no restarts.

    mlkd restarts by itself (`_elastic`) so that a user error or an interrupt is never
    restarted; torch's own restarts belong to torchrun. Fields newer torch versions added are
    passed only where this torch has them.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs

    wanted: dict[str, Any] = {
        "min_nodes": 1,
        "max_nodes": 1,
        "nproc_per_node": world_size,
        "run_id": f"mlkd-{uuid.uuid4().hex[:12]}",
        "rdzv_backend": "c10d",
        "rdzv_endpoint": "127.0.0.1:0",
        "max_restarts": 0,
        "monitor_interval": 0.1,
        "start_method": START_METHOD,
        "logs_specs": DefaultLogsSpecs(log_dir=str(log_dir)),
        # Workers stopping on a signal finish their step and save their state first.
        "shutdown_timeout": SHUTDOWN_GRACE_S,
    }
    known = {f.name for f in dataclasses.fields(LaunchConfig)}
    return LaunchConfig(**{k: v for k, v in wanted.items() if k in known})


class _LauncherState:
    """Put back what the elastic launcher changes in this process: signal handlers, logging, env.

    torch's agent installs handlers that raise `SignalException` for SIGTERM/SIGINT/SIGHUP/
    SIGQUIT and leaves them behind; later stages of a pipeline must not inherit them. Its
    loggers narrate every worker it stops; mlkd says once what happened and what to do.
    """

    LOGGERS = ("torch.distributed", "torch.multiprocessing")

    def __enter__(self) -> _LauncherState:
        self.environ = dict(os.environ)
        # torch's modules set their loggers' own levels, so each one is quieted by name.
        names = [n for n in logging.root.manager.loggerDict if n.startswith(self.LOGGERS)]
        self.levels = {name: logging.getLogger(name).level for name in {*names, *self.LOGGERS}}
        for name in self.levels:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        self.handlers = {}
        if threading.current_thread() is threading.main_thread():
            for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"):
                signum = getattr(signal, name, None)
                if signum is not None:
                    self.handlers[signum] = signal.getsignal(signum)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.handlers.items():
            signal.signal(signum, handler)
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        os.environ.clear()
        os.environ.update(self.environ)


def _kill_children() -> None:
    """SIGKILL whatever worker is still alive (a second Ctrl-C, or a stuck shutdown)."""
    for child in mp.active_children():
        if child.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
            child.join(timeout=5)


def _death_message(exc: Any, world_size: int, memory_hint: str) -> str:
    """Which worker died and how, the one killed by a signal first (it is the cause)."""
    failures = sorted(exc.failures.items(), key=lambda item: (item[1].exitcode >= 0, item[0]))
    rank, failure = failures[0] if failures else (0, None)
    code = failure.exitcode if failure is not None else 1
    if code < 0:
        how = f"signal {signal.Signals(-code).name}"
        if -code == signal.SIGKILL:
            how += f", most likely out of memory: {memory_hint}"
    else:
        how = f"exit code {code}"
    return f"DDP worker {rank} of {world_size} died ({how})"


def _reported(reports: Path, world_size: int, *, crashes: bool = True) -> Exception | None:
    """The exception a worker reported before it ended, if any.

    A user error, a stop or an interruption explains the whole run. Crashes come last and the
    earliest wins: when one worker dies, its peers fail in their next collective ("connection
    closed by peer"), which is a consequence, not the cause. `crashes=False` leaves them out
    (a worker killed by a signal is the cause then).
    """
    found: dict[str, dict[str, Any]] = {}
    for rank in range(world_size):
        with contextlib.suppress(OSError, ValueError):
            report = json.loads((reports / f"rank{rank}.json").read_text())
            earlier = found.get(report["status"])
            if earlier is None or report["time"] < earlier["time"]:
                found[report["status"]] = report
    if "user_error" in found:
        return UserError(found["user_error"]["message"])
    if "stopped" in found:
        return RunStopped(found["stopped"]["message"])
    if "interrupted" in found:
        return RunInterrupted(found["interrupted"]["message"], int(found["interrupted"]["signum"]))
    if crashes and "crashed" in found:
        return WorkerCrashed(found["crashed"]["message"])
    return None


class WorkerCrashed(RuntimeError):
    """A worker raised an unexpected exception (a bug): its traceback is the message."""


def _elastic_entry(
    worker: Callable[[DistContext, Any], Any],
    payload: Any,
    device_type: str,
    restart: int,
    reports: str,
    memory_hint: str,
    workers: int | None,
    launcher_environ: dict[str, str],
) -> Any:
    """What each elastic worker runs: the worker, with failures written where the launcher looks.

    A worker's exceptions do not cross the process boundary, so each outcome other than success
    is written to `<reports>/rank<N>.json` and the process exits with the usual code.
    """
    _adopt_launcher_environment(launcher_environ)
    rank = int(os.environ["RANK"])
    ctx = _init_process(
        rank,
        int(os.environ["WORLD_SIZE"]),
        int(os.environ["LOCAL_RANK"]),
        device_type,
        restart,
        workers,
    )
    outcome: dict[str, Any] | None = None
    code = 0
    try:
        value = _run_worker(worker, ctx, payload, memory_hint)
        # Only rank 0's result is used: the others send nothing back through the launcher.
        return value if ctx.is_main else None
    except UserError as exc:
        outcome, code = {"status": "user_error", "message": str(exc)}, 2
    except RunInterrupted as exc:
        outcome = {"status": "interrupted", "message": str(exc), "signum": exc.signum}
        code = 128 + exc.signum
    except RunStopped as exc:
        outcome, code = {"status": "stopped", "message": str(exc)}, 1
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT  # a second Ctrl-C: stop now, quietly
    except Exception:
        outcome, code = {"status": "crashed", "message": traceback.format_exc()}, 1
    finally:
        _shutdown(ctx)
        if outcome is not None:
            with contextlib.suppress(OSError):
                outcome["time"] = time.time()
                (Path(reports) / f"rank{rank}.json").write_text(json.dumps(outcome))
    raise SystemExit(code)


def _adopt_launcher_environment(launcher_environ: dict[str, str]) -> None:
    """Give this worker the launcher's environment as it is now, plus the agent's variables.

    A forked worker inherits the fork server's environment, which is the launcher's as it was
    when the server started (the first launch of the process); a variable set or removed since
    (a pipeline stage, a test) would otherwise not reach it, as it would reach a spawned one.
    """
    agent = {
        name: value
        for name, value in os.environ.items()
        if name in _AGENT_VARIABLES
        or name.startswith("TORCHELASTIC_")
        or _IMPORT_ENVIRON.get(name) != value
    }
    os.environ.clear()
    os.environ.update(launcher_environ)
    os.environ.update(agent)


def use_cpu_share(local_world: int, workers: int | None) -> int:
    """Give torch this process's share of the usable cores, less its loader workers; returns
    the thread count (see core/cpus.py)."""
    loaders = default_cpu_workers(local_world) if workers is None else workers
    threads = compute_threads(local_world, loaders)
    torch.set_num_threads(threads)
    return threads


def _init_process(
    rank: int,
    world_size: int,
    local_rank: int,
    device_type: str,
    restart: int = 0,
    workers: int | None = None,
) -> DistContext:
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        # N workers on one machine share its cores instead of each taking all of them; an
        # explicit OMP_NUM_THREADS (torchrun sets 1 for several processes a node) wins.
        use_cpu_share(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), workers)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=PROCESS_GROUP_TIMEOUT,
        )
    return DistContext(rank, world_size, local_rank, device, restart)


def _shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def port_is_free(address: str, port: str) -> bool:
    """Whether a TCP port can be bound on `address` now (False for a malformed port)."""
    try:
        number = int(port)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((address, number))
    except (OSError, ValueError, OverflowError):
        return False
    return True
