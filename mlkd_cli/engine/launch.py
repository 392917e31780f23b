"""Run a worker function on one process, on N spawned DDP processes, or under torchrun.

Every command that trains or evaluates goes through `launch`, so the three ways of running share
one code path: the worker receives a `DistContext` and does the same thing whatever its rank.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlkd_cli.console import Reporter, RunInterrupted, RunStopped, UserError

T = TypeVar("T")
P = TypeVar("P")

# A collective that waits longer than this is a dead peer, not a slow one.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on the one process that prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is in use."""
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks in place (a no-op on one process) and return it."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Take the maximum of a tensor over ranks in place (a no-op on one process)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Overwrite a tensor in place with rank 0's value (a no-op on one process)."""
        if self.distributed:
            dist.broadcast(tensor, src=0)
        return tensor

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's value of a picklable object, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.distributed:
            dist.barrier()


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


def under_torchrun() -> bool:
    """True when torchrun (or any launcher setting RANK/WORLD_SIZE/LOCAL_RANK) started us."""
    return all(v in os.environ for v in TORCHRUN_VARIABLES)


def launcher_rank() -> int:
    """This process's global rank as the launcher sees it: torchrun's RANK, else 0."""
    return int(os.environ["RANK"]) if under_torchrun() else 0


def launch(worker: Callable[[DistContext, P], T], payload: P, world_size: int, device: str) -> T:
    """Run `worker(ctx, payload)` on every rank and return rank 0's result.

    `world_size` > 1 spawns that many local processes; a torchrun launch is detected from its
    environment and runs in place (its world size wins). Any worker's `UserError` comes back
    to the caller as a `UserError`.
    """
    device_type = resolve_device(device)
    if world_size < 1:
        raise UserError(f"--world-size must be at least 1, got {world_size}")
    if under_torchrun():
        local_rank = int(os.environ["LOCAL_RANK"])
        ctx = _init_process(
            int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, device_type
        )
        try:
            return worker(ctx, payload)
        finally:
            _shutdown(ctx)
    if world_size == 1:
        torch_device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        if device_type == "cuda":
            torch.cuda.set_device(torch_device)
        return worker(DistContext(0, 1, 0, torch_device), payload)
    if device_type == "cuda" and world_size > torch.cuda.device_count():
        raise UserError(
            f"--world-size {world_size} needs {world_size} GPUs but only "
            f"{torch.cuda.device_count()} are visible; lower --world-size"
        )
    return _spawn(worker, payload, world_size, device_type)


def _spawn(
    worker: Callable[[DistContext, P], T], payload: P, world_size: int, device_type: str
) -> T:
    # The children inherit the rendezvous address through the environment; what we set for this
    # launch is taken back afterwards so that a second launch in the same process gets a new port.
    added = {k: v for k, v in (("MASTER_ADDR", "127.0.0.1"),) if k not in os.environ}
    given_port = os.environ.get("MASTER_PORT")
    if given_port is None or not port_is_free(
        os.environ.get("MASTER_ADDR", "127.0.0.1"), given_port
    ):
        if given_port is not None:
            Reporter().warn(f"MASTER_PORT {given_port} is busy or invalid; using a free port")
        added["MASTER_PORT"] = str(free_port())
    saved = {k: os.environ[k] for k in added if k in os.environ}
    os.environ.update(added)
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    # torch logs each survivor it stops; mlkd says once, below, what happened and what to do.
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    try:
        with _ForwardSignals():
            mp.spawn(
                _spawned_entry,
                args=(worker, payload, world_size, device_type, results),
                nprocs=world_size,
                join=True,
            )
    except mp.ProcessExitedException as exc:
        reported = _first_report(results)
        if reported is not None:
            _raise_report(*reported)
        how = f"signal {exc.signal_name}" if exc.signal_name else f"exit code {exc.exit_code}"
        raise WorkerDied(
            f"DDP worker {exc.error_index} of {world_size} died ({how}); the others were "
            "stopped. A training run continues from its last saved state with --resume"
        ) from None
    finally:
        for key in added:
            os.environ.pop(key, None)
        os.environ.update(saved)
    status, value = results.get()
    if status != "ok":
        _raise_report(status, value)
    return value


def _raise_report(status: str, value: Any) -> None:
    if status == "user_error":
        raise UserError(value)
    if status == "interrupted":
        message, signum = value
        raise RunInterrupted(message, signum)
    raise RunStopped(value)


class _ForwardSignals:
    """While workers run, the launching process passes SIGTERM on to them and outlives SIGINT.

    Ctrl-C reaches every process of the terminal's group, the workers included, so the launcher
    only has to keep waiting while they save; a SIGTERM sent to the launcher alone (a scheduler,
    `kill`) is passed on so that the workers save and stop too.
    """

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _ForwardSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
            self.previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._forward)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _forward(self, signum: int, frame: Any) -> None:
        for child in mp.active_children():
            if child.pid is not None:
                os.kill(child.pid, signum)


def _spawned_entry(
    local_rank: int,
    worker: Callable[[DistContext, Any], Any],
    payload: Any,
    world_size: int,
    device_type: str,
    results: Any,
) -> None:
    # The launcher ignores SIGINT while waiting and its children inherit that; the worker's
    # training loop installs its own handler, everything else should die on Ctrl-C as usual.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ctx = _init_process(local_rank, world_size, local_rank, device_type)
    try:
        value = worker(ctx, payload)
    except UserError as exc:
        results.put(("user_error", str(exc)))
        raise SystemExit(2) from None
    except RunInterrupted as exc:
        # Every rank says so: the launcher may see any of them end first.
        results.put(("interrupted", (str(exc), exc.signum)))
        raise SystemExit(128 + exc.signum) from None
    except RunStopped as exc:
        results.put(("stopped", str(exc)))
        raise SystemExit(1) from None
    finally:
        _shutdown(ctx)
    if ctx.is_main:
        results.put(("ok", value))


def _init_process(rank: int, world_size: int, local_rank: int, device_type: str) -> DistContext:
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        # N workers on one machine share its cores instead of each taking all of them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=PROCESS_GROUP_TIMEOUT,
        )
    return DistContext(rank, world_size, local_rank, device)


def _shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _first_report(results: Any) -> tuple[str, Any] | None:
    while not results.empty():
        status, value = results.get()
        if status != "ok":
            return status, value
    return None


def port_is_free(address: str, port: str) -> bool:
    """Whether a TCP port can be bound on `address` now (False for a malformed port)."""
    try:
        number = int(port)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((address, number))
    except (OSError, ValueError, OverflowError):
        return False
    return True


def free_port() -> int:
    """A TCP port that was free a moment ago on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
