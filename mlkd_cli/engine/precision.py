"""How models run: bf16 autocast or fp32, channels_last or contiguous (`--precision`).

`auto` (the default) means bf16 autocast on CUDA and on CPUs with native bf16 arithmetic
(AVX512-BF16, AMX, Arm's BF16 extensions), fp32 elsewhere — where bf16 is faster for the model at
hand. Neither bf16 nor a memory format wins everywhere: on a 2-core CPU test_convnext trains
faster in fp32 and resnet10t in bf16, channels_last speeds some models up and slows others down,
the answer changes with bf16, and on an H100 BiT's GroupNorm student runs faster in NCHW in eager
mode. So the engine times the model's own step in each candidate before the run starts
(`choose_layout`) and keeps the fastest: the two layouts, and under `auto` bf16 against fp32.
"""

from __future__ import annotations

import copy
import os
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from mlkd_cli.core.dist import DistContext
from mlkd_cli.core.errors import UserError

PRECISIONS = ("auto", "bf16", "fp32")
# CPU features that give native bf16 arithmetic (names as torch.cpu.get_capabilities spells them).
CPU_BF16_FEATURES = ("amx_bf16", "avx512_bf16", "sve_bf16", "bf16")
# Rounds of timing when choosing (after one warm-up step of each candidate): each round times
# one step of every candidate in turn, so that a busy moment of the machine slows all of them,
# not one; at least LAYOUT_ROUNDS, more until LAYOUT_SECONDS per candidate have been timed, at
# most LAYOUT_STEPS; each candidate's fastest step counts (a busy machine only adds time). A
# process measures a model of the same shape at the same size once (`_MEASURED`): the pipeline
# evaluates the models it trained, and its baseline is a teacher's architecture.
LAYOUT_ROUNDS = 2
LAYOUT_STEPS = 3
LAYOUT_SECONDS = 1.0
# The most images a CPU measurement runs (CUDA runs the run's batch): the verdict can change with
# the batch (BiT's ResNet-50 student in bf16: NCHW faster at 16 images, channels_last at 32), and
# more would make the start-up long.
LAYOUT_BATCH = 32
# Pins the memory format instead of measuring it (runs that must compute identically: tests,
# comparisons of separate runs): "channels_last" or "contiguous".
LAYOUT_VARIABLE = "MLKD_MEMORY_FORMAT"
# channels_last must be this much faster to be chosen: a near tie is timing noise, and keeping
# NCHW then makes repeated runs choose (and compute) the same way.
LAYOUT_MARGIN = 1.1
# A CPU measurement may cost at most this share of the images the run itself processes: a short
# run at a large size (the original's one-epoch job on 320 images at 224 px spent 190 s timing
# candidates, longer than its training) keeps the usual choice untimed, and says so.
PROBE_SHARE = 0.1
# Under --precision auto, bf16 must be this much faster than fp32 to be kept: a near tie goes to
# fp32, whose arithmetic is exact, so that auto never runs slower than fp32 by timing noise.
BF16_MARGIN = 1.05


def cpu_bf16_feature() -> str | None:
    """The CPU feature that gives this machine native bf16 arithmetic, or None."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        caps = get()
        return next((name for name in CPU_BF16_FEATURES if caps.get(name)), None)
    # Older torch (before get_capabilities): its private probes for the x86 features.
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx_bf16"
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512_bf16"
    return None


def check_precision(requested: str, device_type: str) -> None:
    """Refuse an unknown `--precision`, or bf16 on a CPU without native bf16 (exit 2)."""
    if requested not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if requested == "bf16" and device_type == "cpu" and cpu_bf16_feature() is None:
        raise UserError(
            "--precision bf16 was asked for but this CPU has no native bf16 arithmetic "
            "(AVX512-BF16, AMX or Arm BF16); use --precision fp32 or auto"
        )


@dataclass(frozen=True)
class Precision:
    """The arithmetic and memory format of one run on one device."""

    device: torch.device
    bf16: bool = False
    channels_last: bool = False
    why: str = ""  # where the choice came from, for the run's first line
    fp32_convs: int = 0  # convolutions kept in fp32 under bf16 (see `keep_idle_tap_convs_fp32`)
    # bf16 came from --precision auto: `choose_layout` keeps it only where it measures faster.
    auto: bool = False

    @classmethod
    def resolve(cls, requested: str, device: torch.device, source: str = "") -> Precision:
        """The precision `requested` (auto|bf16|fp32) means on `device`, with the usual layout
        (channels_last on CUDA) until `choose_layout` measures; `source` says who asked for fp32
        (default `--precision fp32`)."""
        check_precision(requested, device.type)
        cuda = device.type == "cuda"
        if requested == "fp32":
            return cls(device, False, cuda, source or "--precision fp32")
        auto = requested == "auto"
        if cuda:
            return cls(device, True, True, "CUDA has bf16", auto=auto)
        feature = cpu_bf16_feature()
        if feature is None:  # auto on a CPU without bf16: fp32, silently
            return cls(device, False, False, "this CPU has no native bf16")
        return cls(device, True, False, f"this CPU has {feature}", auto=auto)

    @property
    def dtype(self) -> torch.dtype:
        """The autocast dtype (fp32: no autocast)."""
        return torch.bfloat16 if self.bf16 else torch.float32

    def autocast(self) -> AbstractContextManager:
        """bf16 autocast on this device, or explicitly none (fp32 even inside an outer one)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        """Move a batch to the device in the right memory format, without blocking the host."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def place(self, module: nn.Module) -> nn.Module:
        """Move a module to the device, in this precision's memory format."""
        module.to(self.device)
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        return module

    def headline(self) -> str:
        """Arithmetic, memory format and device, e.g. `fp32, channels_last on cpu`."""
        arithmetic = "bf16 autocast" if self.bf16 else "fp32"
        layout = "channels_last" if self.channels_last else "contiguous (NCHW)"
        return f"{arithmetic}, {layout} on {self.device.type}"

    def describe(self) -> str:
        """One line: precision and memory format, and why."""
        why = self.why
        if self.fp32_convs:
            why += (
                f"; {self.fp32_convs} convolution(s) whose kernel overhangs a tiny feature map "
                "kept in fp32"
            )
        return f"precision: {self.headline()} ({why})"


def choose_layout(
    precision: Precision,
    model: nn.Module,
    image_shape: tuple[int, int, int],
    ctx: DistContext,
    *,
    train: bool,
    batch: int = LAYOUT_BATCH,
    run_images: int | None = None,
) -> Precision:
    """`precision` with the memory format — and under `auto`, the arithmetic — that runs `model`
    fastest on its device.

    Rank 0 times a copy of the model (its weights, BatchNorm statistics and the RNG streams are
    left as they were) in each candidate — forward and backward when `train`, forward only
    otherwise — and every rank takes its answer, so all ranks run the same arithmetic.
    channels_last must win by LAYOUT_MARGIN, bf16 (under auto) by BF16_MARGIN. On CUDA the copy
    runs the run's batch (`batch`), on a CPU at most LAYOUT_BATCH images. On a CPU, where the
    timing would cost more than PROBE_SHARE of `run_images` (the images the run processes on this
    process), nothing is timed: NCHW, and the arithmetic `precision` already has.
    """
    pinned = os.environ.get(LAYOUT_VARIABLE)
    if pinned:
        if pinned not in ("channels_last", "contiguous"):
            raise UserError(
                f"{LAYOUT_VARIABLE} must be channels_last or contiguous, not {pinned!r}"
            )
        why = f"{precision.why}; {LAYOUT_VARIABLE}={pinned}"
        return replace(precision, channels_last=pinned == "channels_last", why=why)
    if precision.device.type == "cpu":
        batch = min(batch, LAYOUT_BATCH)
    arithmetics = (True, False) if precision.bf16 and precision.auto else (precision.bf16,)
    candidates = [(bf16, layout) for bf16 in arithmetics for layout in (False, True)]
    shape = (batch, *image_shape)
    # A timing this process already made costs nothing: used, however short the run. Only rank
    # 0 times (and remembers), so with several processes every rank decides by the numbers alone.
    known = (
        ctx.world_size == 1 and _timing_key(model, shape, precision, candidates, train) in _MEASURED
    )
    if precision.device.type == "cpu" and run_images is not None and not known:
        timed = len(candidates) * (1 + LAYOUT_STEPS) * batch  # warm-up and every round
        if timed > PROBE_SHARE * run_images:
            why = f"{precision.why}; NCHW, not timed: a run of {run_images} images is too short"
            return replace(precision, channels_last=False, why=why)
    # (channels_last, bf16, layout speed-up, bf16 speed-up): NCCL broadcasts device tensors only.
    verdict = torch.zeros(4, device=precision.device)
    if ctx.is_main:
        times = _time_candidates(model, shape, precision, candidates, train)
        verdict.copy_(torch.tensor(_verdict(times, precision.bf16)))
    ctx.broadcast_(verdict)
    channels_last, bf16 = bool(verdict[0]), bool(verdict[1])
    note = precision.why
    if len(arithmetics) == 2:
        note += f"; bf16 measured {float(verdict[3]):.2f}x the speed of fp32"
        if not bf16:
            note += " for this model, so fp32"
    note += f"; channels_last measured {float(verdict[2]):.2f}x the speed of NCHW"
    return replace(precision, channels_last=channels_last, bf16=bf16, why=note)


def _verdict(times: dict[tuple[bool, bool], float], bf16: bool) -> list[float]:
    """[channels_last, bf16, layout speed-up, bf16 speed-up] from each candidate's step time
    ((bf16, channels_last) -> seconds); bf16 is kept only where fp32 was timed and lost."""

    def layout(arithmetic: bool) -> tuple[bool, float, float]:
        nchw, nhwc = times[(arithmetic, False)], times[(arithmetic, True)]
        faster = nchw / nhwc >= LAYOUT_MARGIN
        return faster, nhwc if faster else nchw, nchw / nhwc

    channels_last, seconds, ratio = layout(bf16)
    speedup = 1.0
    if bf16 and (False, False) in times:
        fp32_layout, fp32_seconds, fp32_ratio = layout(False)
        speedup = fp32_seconds / seconds
        if speedup < BF16_MARGIN:
            bf16, channels_last, ratio = False, fp32_layout, fp32_ratio
    return [float(channels_last), float(bf16), ratio, speedup]


def idle_taps(conv: nn.Conv2d, size: tuple[int, int]) -> bool:
    """True when some kernel tap of `conv` only ever meets padding on a `size` input map."""
    padding = conv.padding
    if isinstance(padding, str):  # "valid": no padding; "same": half the dilated kernel
        padding = tuple(
            0 if padding == "valid" else d * (k - 1) // 2
            for k, d in zip(conv.kernel_size, conv.dilation, strict=True)
        )
    for n, k, s, p, d in zip(
        size, conv.kernel_size, conv.stride, padding, conv.dilation, strict=True
    ):
        outputs = range((n + 2 * p - d * (k - 1) - 1) // s + 1)
        for tap in range(k):
            if not any(0 <= o * s - p + tap * d < n for o in outputs):
                return True
    return False


_FP32_CLASSES: dict[type, type] = {}


def _fp32_class(cls: type) -> type:
    """A subclass of a convolution class whose forward runs in fp32 under any autocast."""
    if cls not in _FP32_CLASSES:

        def forward(self: nn.Module, x: torch.Tensor, *args: object, **kwargs: object):
            with torch.autocast(x.device.type, enabled=False):
                return cls.forward(self, x.float(), *args, **kwargs)

        _FP32_CLASSES[cls] = type(f"Fp32{cls.__name__}", (cls,), {"forward": forward})
    return _FP32_CLASSES[cls]


def keep_idle_tap_convs_fp32(
    precision: Precision, model: nn.Module, image_shape: tuple[int, int, int]
) -> Precision:
    """Under bf16 on a CPU, run in fp32 the convolutions that oneDNN's bf16 kernels get wrong.

    oneDNN's bf16 weight gradient (torch 2.14, AVX512-BF16) returns uninitialised memory for a
    kernel tap that only ever meets padding — a 3x3 stride-2 convolution on a 1x1 map, as small
    images reach in a ResNet's last stage — and those values soon turn the weights into NaN. A
    forward pass at the run's image size finds such convolutions; they keep fp32 (their maps are
    tiny, so it costs nothing) and every other layer keeps bf16. The weights are unchanged.
    """
    if not precision.bf16 or precision.device.type != "cpu":
        return precision
    sizes: dict[nn.Module, tuple[int, int]] = {}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        sizes.setdefault(module, tuple(args[0].shape[-2:]))  # (a hook's return replaces args)

    hooks = [conv.register_forward_pre_hook(record) for conv in convs]
    was_training = model.training
    try:
        images = torch.zeros(1, *image_shape, device=precision.device)
        with torch.no_grad():
            model.eval()(images)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    idle = [conv for conv in convs if conv in sizes and idle_taps(conv, sizes[conv])]
    for conv in idle:
        conv.__class__ = _fp32_class(type(conv))
    return replace(precision, fp32_convs=len(idle))


def prepare_forward(
    requested: str,
    model: nn.Module,
    img_size: int,
    ctx: DistContext,
    batch: int,
    images: int | None = None,
) -> Precision:
    """Place a model that only runs forward (evaluation, logits passes) for `--precision
    requested`, in the faster layout; returns the precision its inputs must use.

    On a CPU, `auto` is fp32 here: what a forward pass measures (top-1, NLL, an ensemble's
    fitted weights) must not depend on which arithmetic a timing picked — the same checkpoint
    read 90.81 and 91.36 % top-1 in two runs whose probes chose differently. `--precision bf16`
    still runs it in bf16. `images`: how many the whole pass runs, if known (each process runs
    its share; a short pass is not worth timing: `choose_layout`).
    """
    if requested == "auto" and ctx.device.type == "cpu":
        precision = Precision.resolve(
            "fp32", ctx.device, "auto: fp32 for figures measured on a CPU (bf16: --precision bf16)"
        )
    else:
        precision = Precision.resolve(requested, ctx.device)
    shape = (3, img_size, img_size)
    precision = choose_layout(
        precision,
        model,
        shape,
        ctx,
        train=False,
        batch=batch,
        run_images=None if images is None else -(-images // ctx.world_size),
    )
    precision.place(model)
    if hasattr(model, "bf16"):  # a TeacherEnsemble runs its own autocast
        model.bf16 = precision.bf16
    return precision


def _time_candidates(
    model: nn.Module,
    shape: tuple[int, ...],
    precision: Precision,
    candidates: list[tuple[bool, bool]],
    train: bool,
) -> dict[tuple[bool, bool], float]:
    """Seconds per step of a copy of `model` in each (bf16, channels_last) candidate: the
    fastest of its timed steps, the candidates taking turns round by round (once a process for
    a model of the same kind and parameter shapes, input and candidates)."""
    key = _timing_key(model, shape, precision, candidates, train)
    if key not in _MEASURED:
        images = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        _MEASURED[key] = _measure(model, images, precision, candidates, train)
    return _MEASURED[key]


_MEASURED: dict[tuple, dict[tuple[bool, bool], float]] = {}


def _timing_key(
    model: nn.Module, shape: tuple[int, ...], precision: Precision, candidates: list, train: bool
) -> tuple:
    """What makes two timings the same: the model's kind and parameter shapes, input, mode,
    device and candidates."""
    shapes = tuple(tuple(p.shape) for p in model.parameters())
    return (
        type(model).__qualname__,
        shapes,
        shape,
        train,
        str(precision.device),
        tuple(candidates),
    )


def _measure(
    model: nn.Module,
    images: torch.Tensor,
    precision: Precision,
    candidates: list[tuple[bool, bool]],
    train: bool,
) -> dict[tuple[bool, bool], float]:
    device = precision.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        images = images.to(device)
        copies = {}
        for layout in sorted({layout for _, layout in candidates}):
            trial = copy.deepcopy(model).to(device).train(train)
            if layout:
                trial.to(memory_format=torch.channels_last)
            copies[layout] = (trial, _in_layout(images, layout))

        def step(candidate: tuple[bool, bool]) -> float:
            bf16, layout = candidate
            trial, batch = copies[layout]
            _synchronize(device)
            start = time.perf_counter()
            _one_step(trial, batch, replace(precision, bf16=bf16), train)
            _synchronize(device)
            return time.perf_counter() - start

        for candidate in candidates:
            step(candidate)  # warm-up: allocation, kernel choice
        timed: dict[tuple[bool, bool], list[float]] = {c: [] for c in candidates}
        rounds = 0
        while rounds < LAYOUT_ROUNDS or (
            rounds < LAYOUT_STEPS
            and sum(map(sum, timed.values())) < LAYOUT_SECONDS * len(candidates)
        ):
            # Alternate the order, so that no candidate always runs right after another.
            for candidate in candidates if rounds % 2 == 0 else candidates[::-1]:
                timed[candidate].append(step(candidate))
            rounds += 1
        copies.clear()  # the copies go before the run allocates
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give the copies' memory back before the run allocates
    return {candidate: min(times) for candidate, times in timed.items()}


def _in_layout(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_step(model: nn.Module, images: torch.Tensor, precision: Precision, train: bool) -> None:
    with torch.set_grad_enabled(train), precision.autocast():
        outputs = model(images)
        if train:
            sum(t.float().sum() for t in _flat_tensors(outputs)).backward()


def _flat_tensors(outputs: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output (a tensor, or lists/tuples of them, nested)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [t for part in outputs for t in _flat_tensors(part)]
