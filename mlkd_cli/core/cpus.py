"""How many CPU threads a process of a run may use: its share of the cores it may run on.

A process counts the cores its affinity mask allows (a container's, taskset's, a batch
scheduler's), not the machine's, and shares them with the other processes of its own run
(`--world-size`) and with its own data-loading workers, so that a run never starts more busy
threads than it has cores. Other programs on the machine are not counted: they are not the run's
to know about. What keeps a run fast beside them is that idle threads soon stop spinning
(`SHORT_SPIN`) on cores another process needs.
"""

from __future__ import annotations

import os

# OpenMP's idle threads spin before they sleep: libgomp (the OpenMP of PyTorch's Linux wheels)
# 300,000 times by default. Two processes whose threads spin on the same cores each ran at a
# fifth of their speed alone (two resnet18 runs on 2 cores: 89 and 90 img/s against 422 alone);
# spinning 1,000 times, libgomp's own count for a process with more threads than cores, they ran
# at 228 and 220 against 460 alone (BENCHMARKS.md, "Sharing the machine"). Read by OpenMP once,
# when torch loads: `prefer_short_spin` runs before that. A value the user set wins.
SHORT_SPIN = {"GOMP_SPINCOUNT": "1000"}


def prefer_short_spin() -> None:
    """Make OpenMP's idle threads sleep soon, unless the user set the count (before torch)."""
    for key, value in SHORT_SPIN.items():
        os.environ.setdefault(key, value)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity call on this platform
        return max(1, os.cpu_count() or 1)


def cores_per_process(local_processes: int) -> int:
    """This process's share of the usable cores when `local_processes` of a run share them."""
    return max(1, usable_cores() // max(1, local_processes))


def compute_threads(local_processes: int, loader_workers: int) -> int:
    """Intra-op threads for one process: its share of the cores less its loader workers
    (each busy on a core of its own), at least 1; an explicit OMP_NUM_THREADS wins."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    return max(1, cores_per_process(local_processes) - max(0, loader_workers))
