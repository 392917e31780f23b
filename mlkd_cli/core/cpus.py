"""How many CPU threads a process of a run may use: its share of the cores it may run on.

A process counts the cores its affinity mask allows (a container's, taskset's, a batch
scheduler's), not the machine's, and shares them with the other processes of its own run
(`--world-size`) and with its own data-loading workers, so that a run never starts more busy
threads than it has cores. Other programs on the machine are not counted: they are not the run's
to know about. What keeps a run fast beside them is that idle threads soon stop spinning
(`SHORT_SPIN`) on cores another process needs.

It also says what the CPU offers int8 arithmetic (`detect_cpu`), for `mlkd export --int8` to
choose its target and for a loaded int8 file to be checked against it.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

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


# --- What this CPU offers int8 arithmetic ---------------------------------------------------
# onnxruntime's x86 int8 kernels multiply uint8 activations by int8 weights. Without VNNI they
# sum pairs of products into 16 bits (vpmaddubsw), which saturates on large 8-bit weights; with
# VNNI (AVX512-VNNI or AVX-VNNI) or AMX they accumulate in 32 bits and do not. Where the int8
# file's weights are 7-bit (`reduce_range`), no pair can saturate: such a file is right on every
# CPU. ARM cores widen their products too, so only an x86 CPU without VNNI saturates.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})
INT8_TARGET_KEY = "mlkd_int8_target"  # the int8 ONNX file's metadata entry naming its target
TARGETS_NEEDING_VNNI = frozenset({"vnni"})  # full 8-bit weights: right only where VNNI is


@dataclass(frozen=True)
class CpuFeatures:
    """A CPU as int8 arithmetic sees it: its architecture and, where they could be read, its
    feature flags (the names /proc/cpuinfo uses)."""

    machine: str  # platform.machine(), lower case: x86_64, aarch64, arm64, ...
    flags: frozenset[str] | None = None  # None: not read (not Linux, or no /proc)

    @property
    def is_x86(self) -> bool:
        """An x86 CPU, whose int8 kernels depend on its extensions."""
        return self.machine in X86_MACHINES

    @property
    def has_vnni(self) -> bool:
        """8-bit dot products accumulated in 32 bits (AVX512-VNNI, AVX-VNNI or AMX)."""
        return bool(self.flags and self.flags & VNNI_FLAGS)

    @property
    def has_avx512(self) -> bool:
        """AVX-512 with byte and word instructions (what int8 kernels use)."""
        return bool(self.flags and {"avx512f", "avx512bw"} <= self.flags)

    def describe(self) -> str:
        """A few words for a message: `x86_64: AVX2, no VNNI`."""
        if not self.is_x86:
            return self.machine or "unknown"
        if self.flags is None:
            return f"{self.machine}: features unknown"
        widest = "AVX-512" if self.has_avx512 else "AVX2" if "avx2" in self.flags else "no AVX2"
        return f"{self.machine}: {widest}, {'VNNI' if self.has_vnni else 'no VNNI'}"


def _cpuinfo_flags(text: str) -> frozenset[str] | None:
    """The first processor's flags in /proc/cpuinfo's text, None if it names none."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return None


@functools.cache
def detect_cpu() -> CpuFeatures:
    """This CPU (read once a process): /proc/cpuinfo on Linux; elsewhere, on x86, what torch's
    own CPU probe reports; else the architecture alone."""
    machine = platform.machine().lower()
    try:
        flags = _cpuinfo_flags(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        flags = None
    if flags is None and machine in X86_MACHINES:
        flags = _torch_flags()
    return CpuFeatures(machine, flags)


def _torch_flags() -> frozenset[str] | None:
    """The flags torch's CPU probe answers for (private functions: None if they are gone)."""
    import torch

    probes = {
        "avx2": "_is_avx2_supported",
        "avx512f": "_is_avx512_supported",
        "avx512bw": "_is_avx512_supported",
        "avx512_vnni": "_is_vnni_supported",
        "amx_int8": "_is_amx_tile_supported",
    }
    try:
        return frozenset(flag for flag, name in probes.items() if getattr(torch.cpu, name)())
    except (AttributeError, RuntimeError):
        return None


def int8_target_warning(
    metadata: Mapping[str, str], path: Path, cpu: CpuFeatures | None = None
) -> str | None:
    """The one line to print when the int8 file at `path` (its ONNX `metadata`) was quantized
    for a target this CPU lacks; None when it suits it, when the file records no target (written
    before targets were recorded) or when this CPU's features are unknown."""
    target = metadata.get(INT8_TARGET_KEY)
    if target not in TARGETS_NEEDING_VNNI:
        return None
    cpu = cpu or detect_cpu()
    if not cpu.is_x86 or cpu.flags is None or cpu.has_vnni:
        return None
    return (
        f"{path.name} is int8 for target {target}, whose 8-bit weights this CPU "
        f"({cpu.describe()}) saturates: its answers may differ from those the export checked; "
        "export with --int8-target auto on the machine that runs it"
    )


def warn_int8_target(metadata: Mapping[str, str], path: Path) -> None:
    """Print `int8_target_warning`'s line on stderr, if there is one."""
    line = int8_target_warning(metadata, path)
    if line is not None:
        print(f"warning: {line}", file=sys.stderr)
