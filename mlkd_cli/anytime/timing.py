"""Speeds of a student with exits on this machine, with real early stopping.

Throughput (`time_anytime`): images/s of each head used alone and of each cascade, on timed
images held in memory, rounds interleaved, the median kept, within a time budget.

Latency (`measure_latency`): images/s and per-request latency (p50, p95) of the plain model
and of the early-exit cascade, one image a request and a batch a request, in PyTorch and, where
`mlkd export` wrote them beside the checkpoint, in onnxruntime: the plain student's
`<name>.onnx` / `<name>.int8.onnx`, and the student with exits' `<name>_exits.onnx` /
`<name>_exits.int8.onnx` (that graph computes every head; the cascade's decision is taken on its
outputs).

A request's latency is the time from its images in memory to its answers: for a batch, the time
of the whole batch, which every image in it waits for.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlkd_cli.anytime.rules import cascade_from_outputs
from mlkd_cli.anytime.staged import StagedStudent
from mlkd_cli.core.cpus import warn_int8_target
from mlkd_cli.engine.precision import Precision
from mlkd_cli.export.session import open_session

# Timing repeats each configuration this many times, interleaved, and keeps the median; a round
# lasts at least MIN_ROUND_SECONDS (whole passes over the timed images).
TIMING_ROUNDS = 3
MIN_ROUND_SECONDS = 0.3
# About how long timing may take in all; slow models are timed on fewer images (whole batches).
TIMING_BUDGET_S = 60.0

SINGLE_IMAGES = 64  # one-image requests timed per configuration and round
ROUNDS = 3  # passes over the requests, interleaved across configurations
ONNX_FILES = ((".onnx", "onnxruntime fp32"), (".int8.onnx", "onnxruntime int8"))


@dataclass(frozen=True)
class LatencyRow:
    """One configuration's figures."""

    runtime: str  # pytorch, onnxruntime fp32, onnxruntime int8
    model: str  # plain, cascade
    batch: int  # images a request
    images_per_s: float
    p50_ms: float  # per request
    p95_ms: float

    def to_record(self) -> dict[str, Any]:
        """Plain types for JSON."""
        return asdict(self)


def _timed(
    run: Callable[[Any], Any], requests: Sequence[Any], sizes: Sequence[int], sync: Callable
) -> list[float]:
    """Seconds each request of one round took."""
    seconds = []
    for request in requests:
        sync()
        start = time.perf_counter()
        run(request)
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds


def measure_latency(
    staged: StagedStudent,
    precision: Precision,
    batches: list[torch.Tensor],
    thresholds: Sequence[float],
    rule: str,
    checkpoint: Path,
) -> list[LatencyRow]:
    """Every configuration over the timing images `batches` (on the device), rounds interleaved
    so that a slow moment of the machine falls on all of them alike."""
    device = precision.device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    singles = [image[None] for batch in batches for image in batch][:SINGLE_IMAGES]
    shapes = {1: (singles, [1] * len(singles)), 0: (batches, [b.shape[0] for b in batches])}
    configurations: list[tuple[str, str, int, Callable[[Any], Any], bool]] = []
    for key in (1, 0):
        configurations.append(("pytorch", "plain", key, staged.plain, False))
        cascade = lambda x: staged.cascade(x, thresholds, rule)  # noqa: E731
        configurations.append(("pytorch", "cascade", key, cascade, False))
    plain_name = checkpoint.stem.removesuffix("_exits")
    for suffix, runtime in ONNX_FILES:
        plain = checkpoint.with_name(plain_name + suffix)
        run = _onnx_plain(plain) if plain.is_file() and plain_name != checkpoint.stem else None
        if run is not None:
            configurations += [(runtime, "plain", k, run, True) for k in (1, 0)]
        path = checkpoint.with_suffix(suffix)
        run = _onnx_cascade(path, thresholds, rule) if path.is_file() else None
        if run is not None:
            configurations += [(runtime, "cascade", k, run, True) for k in (1, 0)]
    seconds: list[list[float]] = [[] for _ in configurations]
    with torch.inference_mode(), precision.autocast():
        for _, _, key, run, on_host in configurations:  # warm-up
            request = shapes[key][0][0]
            run(request.float().cpu().numpy() if on_host else request)
        for _ in range(ROUNDS):
            for i, (_, _, key, run, on_host) in enumerate(configurations):
                requests = shapes[key][0]
                if on_host:
                    requests = [r.float().cpu().numpy() for r in requests]
                seconds[i] += _timed(run, requests, shapes[key][1], sync)
    rows = []
    for (runtime, model, key, _, _), spent in zip(configurations, seconds, strict=True):
        sizes = shapes[key][1] * ROUNDS
        rows.append(
            LatencyRow(
                runtime=runtime,
                model=model,
                batch=1 if key == 1 else max(shapes[0][1]),
                images_per_s=sum(sizes) / sum(spent),
                p50_ms=1e3 * float(np.percentile(spent, 50)),
                p95_ms=1e3 * float(np.percentile(spent, 95)),
            )
        )
    return rows


def _onnx_session(path: Path) -> Any:
    """An onnxruntime session on `path` (one warning line if it is an int8 file for a CPU this
    one is not); None without onnxruntime."""
    try:
        session = open_session(path)
    except ImportError:
        return None
    warn_int8_target(session.get_modelmeta().custom_metadata_map, path)
    return session


def _onnx_plain(path: Path) -> Callable[[np.ndarray], Any] | None:
    """The plain student's exported graph; None without onnxruntime."""
    session = _onnx_session(path)
    if session is None:
        return None
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})


def _onnx_cascade(
    path: Path, thresholds: Sequence[float], rule: str
) -> Callable[[np.ndarray], Any] | None:
    """The exported graph (every head) and the cascade's decision on its outputs; None where
    onnxruntime is not installed or the file is not a multi-head export."""
    session = _onnx_session(path)
    if session is None or len(session.get_outputs()) != len(thresholds) + 1:
        return None
    name = session.get_inputs()[0].name

    def run(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = session.run(None, {name: images})
        return cascade_from_outputs([torch.from_numpy(o) for o in outputs], thresholds, rule)

    return run


def time_anytime(
    timing: tuple[StagedStudent, Precision, list[torch.Tensor]],
    cascades: list[tuple[tuple[float, ...], str]],
    budget: float,
) -> dict[str, Any] | None:
    """Images per second of each head used alone and of each cascade (thresholds, rule), with
    real early stopping, on the timed images held in memory (`_timing_setup`: the model's
    compute, not data loading), in about `budget` seconds."""
    staged, precision, batches = timing
    if not batches:
        return None
    heads = [_each(staged.plain)] + [
        _each(lambda x, j=j: staged.exit_logits(x, j)) for j in range(staged.exit_count)
    ]
    runs = [(lambda b, t=t, r=r: staged.cascade_batches(b, t, r)) for t, r in cascades]
    functions = [*heads, *runs]
    batches, rounds = _fit_budget(staged, batches, precision, len(functions), budget)
    # A round of each configuration lasts MIN_ROUND_SECONDS, or less where the budget is small.
    least = min(MIN_ROUND_SECONDS, budget / (len(functions) * rounds))
    rates = _throughput(functions, batches, precision, rounds, least)
    return {
        "heads": rates[: len(heads)],
        "cascades": rates[len(heads) :],
        "images": sum(b.shape[0] for b in batches),
    }


def _fit_budget(
    staged: StagedStudent,
    batches: list[torch.Tensor],
    precision: Precision,
    configurations: int,
    budget: float | None = None,
) -> tuple[list[torch.Tensor], int]:
    """Fewer batches (at least one), then one round instead of several, so that timing every
    configuration takes about `budget` seconds (a ResNet-50 on a CPU runs ~20 img/s: 512
    images, 12 configurations and 3 rounds would take a quarter of an hour); None: the module's
    TIMING_BUDGET_S."""
    budget = TIMING_BUDGET_S if budget is None else budget
    with torch.inference_mode(), precision.autocast():
        staged.plain(batches[0])  # warm-up
        _synchronize(precision.device)
        start = time.perf_counter()
        staged.plain(batches[0])
        _synchronize(precision.device)
    per_image = (time.perf_counter() - start) / batches[0].shape[0]
    per_round = per_image * configurations  # the plain model bounds every configuration
    kept, images = [], 0
    for batch in batches:
        if kept and (images + batch.shape[0]) * per_round * TIMING_ROUNDS > budget:
            break
        kept.append(batch)
        images += batch.shape[0]
    rounds = TIMING_ROUNDS if images * per_round * TIMING_ROUNDS <= budget else 1
    return kept, rounds


def _throughput(
    functions: list[Callable[[list[torch.Tensor]], Any]],
    batches: list[torch.Tensor],
    precision: Precision,
    rounds: int = TIMING_ROUNDS,
    least: float = MIN_ROUND_SECONDS,
) -> list[float]:
    """Images per second of each function (run on the list of batches): rounds interleave the
    functions (so that a machine's slow moment is shared); in each round a function runs over
    the batches until `least` seconds have passed; each keeps the median of its rounds."""
    count = sum(b.shape[0] for b in batches)
    rates: list[list[float]] = [[] for _ in functions]
    device = precision.device
    with torch.inference_mode(), precision.autocast():
        for function in functions:
            function(batches[:1])  # warm-up: allocation, kernel choice
        for _ in range(rounds):
            for i, function in enumerate(functions):
                images, elapsed = 0, 0.0
                _synchronize(device)
                start = time.perf_counter()
                while elapsed < least:
                    function(batches)
                    images += count
                    _synchronize(device)
                    elapsed = time.perf_counter() - start
                rates[i].append(images / elapsed)
    return [statistics.median(r) for r in rates]


def _each(function: Callable[[torch.Tensor], Any]) -> Callable[[list[torch.Tensor]], None]:
    """`function` applied to each batch of a list."""

    def apply(batches: list[torch.Tensor]) -> None:
        for batch in batches:
            function(batch)

    return apply


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
