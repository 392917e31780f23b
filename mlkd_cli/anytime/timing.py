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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlkd_cli.anytime.costs import ExitCosts
from mlkd_cli.anytime.rules import cascade_from_outputs
from mlkd_cli.anytime.staged import StagedStudent
from mlkd_cli.core.cpus import INT8_TARGET_KEY, warn_int8_target
from mlkd_cli.core.safeload import clip
from mlkd_cli.engine.precision import Precision
from mlkd_cli.export.session import open_session
from mlkd_cli.export.staged_onnx import StagedSessions, is_staged, read_manifest, staged_folder

# Timing repeats each configuration this many times, interleaved, and keeps the median; a round
# lasts at least MIN_ROUND_SECONDS (whole passes over the timed images).
TIMING_ROUNDS = 3
MIN_ROUND_SECONDS = 0.3
# About how long timing may take in all; slow models are timed on fewer images (whole batches).
TIMING_BUDGET_S = 60.0

SINGLE_IMAGES = 64  # one-image requests timed per configuration and round
ROUNDS = 3  # passes over the requests, interleaved across configurations
# The model column's values: the plain model; the cascade run stage by stage (PyTorch, or the
# staged ONNX folder: only the images still in it reach the next segment); the one-graph ONNX
# file's cascade, which computes every head for every image and decides afterwards.
PLAIN, CASCADE, STAGED, ONE_GRAPH = "plain", "cascade", "staged cascade", "one-graph cascade"
PRECISIONS = (("fp32", ".onnx"), ("int8", ".int8.onnx"))


@dataclass(frozen=True)
class LatencyRow:
    """One configuration's figures."""

    runtime: str  # pytorch, onnxruntime fp32, onnxruntime int8
    model: str  # PLAIN, CASCADE, STAGED, ONE_GRAPH
    batch: int  # images a request
    images_per_s: float
    p50_ms: float  # per request
    p95_ms: float
    # The work its images took, in % of the plain model's MACs (counted at the training size):
    # 100 for the plain model; a cascade's mean over the timed images of what each image ran (the
    # one-graph file runs every head for every image).
    macs_pct: float

    def to_record(self) -> dict[str, Any]:
        """Plain types for JSON."""
        return asdict(self)


@dataclass(frozen=True)
class LatencySources:
    """The ONNX forms of a student with exits that `mlkd export` wrote beside its checkpoint:
    (runtime, model, path) of each found, and one line for each form not found, naming the
    export command that writes it."""

    found: tuple[tuple[str, str, Path], ...]
    missing: tuple[str, ...]


def latency_sources(checkpoint: Path) -> LatencySources:
    """The plain student's `<name>.onnx` / `<name>.int8.onnx`, the one-graph
    `<name>_exits.onnx` / `<name>_exits.int8.onnx` and the staged `<name>_exits_staged/` /
    `<name>_exits.int8_staged/` beside `checkpoint` (`<name>_exits.pth`); a staged folder's
    manifest is read (with limits) here, so that a damaged one is refused before any work."""
    try:
        import onnxruntime  # noqa: F401  (here only to say what is missing)
    except ImportError:
        return LatencySources((), ("no onnxruntime rows: pip install 'mlkd[export]'",))
    found: list[tuple[str, str, Path]] = []
    plain_name = checkpoint.stem.removesuffix("_exits")
    named = plain_name != checkpoint.stem  # the plain student is found beside <name>_exits.pth
    absent: dict[str, list[tuple[str, str]]] = {PLAIN: [], STAGED: []}
    for precision, suffix in PRECISIONS:
        runtime = f"onnxruntime {precision}"
        plain = checkpoint.with_name(plain_name + suffix)
        if named and plain.is_file():
            found.append((runtime, PLAIN, plain))
        elif named:
            absent[PLAIN].append((precision, plain.name))
        one_graph = checkpoint.with_suffix(suffix)
        if one_graph.is_file():
            found.append((runtime, ONE_GRAPH, one_graph))
        staged = staged_folder(one_graph)
        if is_staged(staged):
            read_manifest(staged)
            found.append((runtime, STAGED, staged))
        else:
            absent[STAGED].append((precision, f"{staged.name}/"))
    plain_pth = checkpoint.with_name(plain_name + ".pth")
    writes = {  # what each export writes, by precision (--int8 writes fp32 too)
        PLAIN: {p: [checkpoint.with_name(plain_name + suffix)] for p, suffix in PRECISIONS},
        STAGED: {
            p: [checkpoint.with_suffix(suffix), staged_folder(checkpoint.with_suffix(suffix))]
            for p, suffix in PRECISIONS
        },
    }
    missing = [
        _missing_line("plain", absent[PLAIN], plain_pth, writes[PLAIN]),
        _missing_line("staged", absent[STAGED], checkpoint, writes[STAGED]),
    ]
    if not named:
        missing.append(
            f"no plain onnxruntime rows: the plain student's ONNX is looked for as <name>.onnx "
            f"beside a <name>_exits.pth, and {clip(checkpoint.name)} is not named so"
        )
    return LatencySources(tuple(found), tuple(line for line in missing if line))


def _missing_line(
    kind: str, absent: list[tuple[str, str]], source: Path, writes: dict[str, list[Path]]
) -> str:
    """One line for the `kind` forms not found ((precision, name) each), naming the export that
    writes them: with --int8 where int8 is among them (it writes fp32 too), and --overwrite
    where something it writes (`writes`, by precision) is there. Empty when nothing is absent."""
    if not absent:
        return ""
    int8 = any(precision == "int8" for precision, _ in absent)
    written = writes["fp32"] + (writes["int8"] if int8 else [])
    flags = (" --int8" if int8 else "") + (
        " --overwrite" if any(p.exists() for p in written) else ""
    )
    precisions = " and ".join(precision for precision, _ in absent)
    rows = "rows" if len(absent) > 1 else "row"
    return (
        f"no {kind} {precisions} {rows}: {', '.join(name for _, name in absent)} not found; "
        f"mlkd export {clip(str(source))} --format onnx{flags}"
    )


@dataclass(frozen=True)
class _Configuration:
    """One thing timed: how it runs a request, and what its output says of the work done."""

    runtime: str
    model: str
    key: int  # 1: one image a request; 0: a batch
    run: Callable[[Any], Any]
    on_host: bool  # takes numpy arrays (onnxruntime), not tensors on the device


@dataclass(frozen=True)
class LatencyResult:
    """The rows timed, and one line for each ONNX form not found (with the command that
    writes it)."""

    rows: list[LatencyRow]
    missing: tuple[str, ...]


def _timed(
    run: Callable[[Any], Any], requests: Sequence[Any], sync: Callable
) -> tuple[list[float], list[Any]]:
    """Seconds each request of one round took, and what each returned."""
    seconds, outputs = [], []
    for request in requests:
        sync()
        start = time.perf_counter()
        outputs.append(run(request))
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds, outputs


def _macs_pct(model: str, outputs: list[Any], costs: ExitCosts) -> float:
    """The work a configuration's requests took, in % of the plain model's MACs: a cascade's
    images each cost what they ran up to the head they left at (`taken`, its outputs' second)."""
    if model == PLAIN:
        return 100.0
    per_head = torch.tensor(costs.cascade, dtype=torch.float64)
    if model == ONE_GRAPH:  # every head computed for every image
        return 100.0 * float(per_head[-1]) / costs.plain
    taken = torch.cat([output[1].cpu() for output in outputs])
    return 100.0 * float(per_head[taken].mean()) / costs.plain


def _configurations(
    staged: StagedStudent,
    thresholds: Sequence[float],
    rule: str,
    sources: LatencySources,
) -> list[_Configuration]:
    """PyTorch's plain model and cascade, then every ONNX form found, each at 1 image and a batch
    a request."""
    configurations = []
    for key in (1, 0):
        configurations.append(_Configuration("pytorch", PLAIN, key, staged.plain, False))
        cascade = lambda x: staged.cascade(x, thresholds, rule)  # noqa: E731
        configurations.append(_Configuration("pytorch", CASCADE, key, cascade, False))
    for runtime, model, path in sources.found:
        if model == PLAIN:
            run = _onnx_plain(path)
        elif model == ONE_GRAPH:
            run = _onnx_cascade(path, thresholds, rule)
        else:
            run = _onnx_staged(path, thresholds, rule)
        if run is not None:
            configurations += [_Configuration(runtime, model, k, run, True) for k in (1, 0)]
    return configurations


def measure_latency(
    staged: StagedStudent,
    precision: Precision,
    batches: list[torch.Tensor],
    thresholds: Sequence[float],
    rule: str,
    checkpoint: Path,
    costs: ExitCosts,
) -> LatencyResult:
    """Every configuration over the timing images `batches` (on the device), rounds interleaved
    so that a slow moment of the machine falls on all of them alike; `costs`: the student's
    MACs per part, for the work each cascade's images took."""
    device = precision.device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    singles = [image[None] for batch in batches for image in batch][:SINGLE_IMAGES]
    shapes = {1: (singles, [1] * len(singles)), 0: (batches, [b.shape[0] for b in batches])}
    host = {key: [r.float().cpu().numpy() for r in shapes[key][0]] for key in shapes}
    sources = latency_sources(checkpoint)
    configurations = _configurations(staged, thresholds, rule, sources)
    seconds: list[list[float]] = [[] for _ in configurations]
    outputs: list[list[Any]] = [[] for _ in configurations]
    with torch.inference_mode(), precision.autocast():
        for c in configurations:  # warm-up
            with _torch_threads(1 if c.on_host else None):
                c.run(host[c.key][0] if c.on_host else shapes[c.key][0][0])
        for _ in range(ROUNDS):
            for i, c in enumerate(configurations):
                requests = host[c.key] if c.on_host else shapes[c.key][0]
                # onnxruntime's rows take their decisions' few torch ops on one thread, as
                # AnytimeClassifier.predict does: torch's pool would spin against onnxruntime's.
                with _torch_threads(1 if c.on_host else None):
                    spent, outputs[i] = _timed(c.run, requests, sync)  # keeps the last round's
                seconds[i] += spent
    rows = []
    for c, spent, returned in zip(configurations, seconds, outputs, strict=True):
        sizes = shapes[c.key][1] * ROUNDS
        rows.append(
            LatencyRow(
                runtime=c.runtime,
                model=c.model,
                batch=1 if c.key == 1 else max(shapes[0][1]),
                images_per_s=sum(sizes) / sum(spent),
                p50_ms=1e3 * float(np.percentile(spent, 50)),
                p95_ms=1e3 * float(np.percentile(spent, 95)),
                macs_pct=_macs_pct(c.model, returned, costs),
            )
        )
    return LatencyResult(rows, sources.missing)


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


def _onnx_staged(
    folder: Path, thresholds: Sequence[float], rule: str
) -> Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]:
    """The staged folder's segments in onnxruntime, run as the deploy-time classifier runs them:
    only the images still in the cascade reach the next segment."""
    manifest = read_manifest(folder)
    if manifest.int8_target is not None:  # an int8 folder for a CPU this one is not: one line
        warn_int8_target({INT8_TARGET_KEY: manifest.int8_target}, manifest.folder)
    sessions = StagedSessions(manifest)
    return lambda images: sessions.cascade(torch.from_numpy(images), thresholds, rule)


@contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    """torch on `count` threads in the block (None: as it is), its setting restored after."""
    threads = torch.get_num_threads()
    if count is None or count == threads:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
