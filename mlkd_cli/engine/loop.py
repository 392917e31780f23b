"""One epoch of training and one exact evaluation pass, shared by every training command.

The step function passed in computes the loss for one batch (cross-entropy for teachers, the KD
loss for students); this module owns everything around it: accumulation, DDP gradient syncs,
autocast, the optimiser and scheduler steps, and metric reduction across ranks.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from timm.data.mixup import Mixup, mixup_target
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from mlkd_cli.core.dist import DistContext
from mlkd_cli.data.loaders import Batch
from mlkd_cli.data.sources import UnreadableImage
from mlkd_cli.engine.precision import Precision
from mlkd_cli.losses.ce import soft_cross_entropy

# (model, images, soft targets, dataset positions of the images or None, Mixup/CutMix share λ)
# -> the loss, or a dict of named losses whose "loss" entry trains (the others, e.g. "kd", "ce",
# are recorded). A mixed batch is λ of each image and 1 − λ of the batch reversed (λ = 1: none).
StepFn = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None, float],
    torch.Tensor | dict[str, torch.Tensor],
]
# Reading the loss forces a host-device sync; do it this often, not every step.
LOSS_READ_EVERY = 20


class BatchMixer:
    """Mixup/CutMix from timm, or plain label smoothing, always returning soft targets and the
    batch's λ: each image keeps a share λ of its own content and takes 1 − λ from the batch
    reversed (timm's batch mode), so that outputs stored per image can be mixed alike.

    timm's Mixup needs an even batch; an odd batch loses its last image instead of crashing.
    """

    def __init__(
        self, num_classes: int, mixup_alpha: float, cutmix_alpha: float, label_smoothing: float
    ) -> None:
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.mixup = (
            Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
            if mixup_alpha > 0 or cutmix_alpha > 0
            else None
        )

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        if self.mixup is None:
            return images, mixup_target(labels, self.num_classes, 1.0, self.label_smoothing), 1.0
        if images.shape[0] % 2:
            images, labels = images[:-1], labels[:-1]
        if images.shape[0] == 0:
            return images, labels.new_zeros((0, self.num_classes), dtype=torch.float32), 1.0
        # timm's own batch mixing (what `Mixup.__call__` does in its batch mode), kept apart so
        # that its λ (a Python float, CutMix's corrected for the box) is known: no device read.
        lam = float(self.mixup._mix_batch(images))
        return images, mixup_target(labels, self.num_classes, lam, self.label_smoothing), lam


@dataclass(frozen=True)
class GradientClip:
    """`--clip-grad` / `--clip-mode`, as timm's train.py: the gradients' total norm
    (`clip_grad_norm_`) or each of their values (`clip_grad_value_`) bounded by `limit`, after
    the last backward pass of a step (DDP has averaged them) and before the optimiser uses them.
    mlkd's mixed precision is bf16 autocast, which scales no loss: there is nothing to unscale.
    """

    limit: float
    mode: str = "norm"

    def __call__(self, model: nn.Module) -> None:
        params = [p for p in model.parameters() if p.grad is not None]
        if self.mode == "value":
            nn.utils.clip_grad_value_(params, self.limit)
        else:
            nn.utils.clip_grad_norm_(params, self.limit)


def _optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    clip: GradientClip | None,
    after_step: Callable[[], None] | None,
) -> None:
    """One optimiser step on the accumulated gradients: clipped first, then `after_step` (the
    model EMA's update)."""
    if clip is not None:
        clip(model)
    optimizer.step()
    if after_step is not None:
        after_step()


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; `batch` is the 1-based batch of the epoch where seen."""

    def __init__(self, batch: int) -> None:
        super().__init__(f"non-finite loss by batch {batch}")
        self.batch = batch


class UnreadableData(Exception):
    """An image could not be decoded and the run was told to stop on such (`--strict-data`)."""

    def __init__(self, image: UnreadableImage) -> None:
        super().__init__(f"{image.path}: {image.reason}")
        self.image = image


@dataclass
class EpochProgress:
    """How far one rank is through an epoch: what a mid-epoch checkpoint needs to continue it."""

    batches_done: int = 0
    optimizer_steps: int = 0
    nonfinite_skipped: int = 0
    loss_sum: float = 0.0
    part_sums: dict[str, float] = field(default_factory=dict)  # named losses x images
    samples: float = 0.0
    seconds: float = 0.0
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


# Called after each optimiser step with the batches done so far and a way to snapshot the
# epoch's progress (which reads device values, so only when a checkpoint is written); returns
# True to end the epoch there.
BoundaryFn = Callable[[int, Callable[[], EpochProgress]], bool]


def cross_entropy_step(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    indices: torch.Tensor | None = None,
    mix: float = 1.0,
) -> torch.Tensor:
    """The teacher-training step: soft-target cross-entropy of the model's logits."""
    return soft_cross_entropy(model(images), targets)


def compile_module(module: nn.Module, device: torch.device) -> str | None:
    """torch.compile `module` in place (its state_dict keys unchanged); None, or why it could not.

    Compilation happens at the first forward; where a backend would fail there (no C++ compiler
    for the CPU, no Triton for CUDA) the module is left as it is and the reason returned.
    """
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        return "no C++ compiler found for the CPU backend"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    try:
        module.compile()
    except Exception as exc:  # torch refuses some platforms and Python versions up front
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    # A graph the compiler still cannot handle runs eagerly rather than stopping the run.
    torch._dynamo.config.suppress_errors = True
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class _EpochSums:
    """An epoch's running sums, kept on the device: read at checkpoints and at the end only."""

    def __init__(self, done: EpochProgress, device: torch.device) -> None:
        def tensor(value: float) -> torch.Tensor:
            return torch.tensor(value, device=device, dtype=torch.float64)

        self.device = device
        self.loss = tensor(done.loss_sum)
        self.parts = {name: tensor(value) for name, value in done.part_sums.items()}
        self.samples = tensor(done.samples)
        self.nonfinite = tensor(0.0)

    def add(self, parts: dict[str, torch.Tensor], count: int, bad: torch.Tensor) -> None:
        """One batch's loss and named parts (batch means), weighted by its image count."""
        self.loss.add_(parts["loss"].detach(), alpha=count)  # in place: no new tensors a step
        for name, value in parts.items():
            if name != "loss":
                if name not in self.parts:
                    self.parts[name] = torch.zeros((), device=self.device, dtype=torch.float64)
                self.parts[name].add_(value.detach(), alpha=count)
        self.samples += count
        self.nonfinite += bad

    def read(self) -> dict[str, Any]:
        """The sums as plain numbers, for a mid-epoch checkpoint (reads the device)."""
        return {
            "loss_sum": float(self.loss),
            "part_sums": {name: float(value) for name, value in self.parts.items()},
            "samples": float(self.samples),
        }

    def reduce(
        self, ctx: DistContext, fresh_from: float
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Totals over every rank (one device read), and the named parts' totals."""
        names = sorted(self.parts)  # every rank has the same parts: the same loss ran on each
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        fresh = self.samples - fresh_from
        stacked = [self.loss, self.samples, self.nonfinite, fresh]
        stacked += [self.parts.get(name, zero) for name in names]
        values = ctx.all_reduce_sum(torch.stack(stacked)).tolist()
        keys = ("loss", "samples", "nonfinite", "fresh")
        return dict(zip(keys, values[:4], strict=True)), dict(zip(names, values[4:], strict=True))


def _unreadable(batch: Batch, strict_data: bool) -> list[tuple[str, str]]:
    """The batch's images that could not be decoded, as (path, reason); raises under strict."""
    if strict_data and batch.skipped:
        raise UnreadableData(batch.skipped[0])
    return [(image.path, image.reason) for image in batch.skipped]


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    num_batches: int,
    step_fn: StepFn,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    mixer: BatchMixer,
    ctx: DistContext,
    precision: Precision,
    accum_steps: int,
    *,
    resume_from: EpochProgress | None = None,
    on_step: Callable[[int, float | None], None] | None = None,
    at_boundary: BoundaryFn | None = None,
    skip_nonfinite: bool = False,
    strict_data: bool = False,
    clip: GradientClip | None = None,
    after_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train on `batches`, the rest of an epoch of `num_batches`; returns the epoch's metrics.

    Gradients of `accum_steps` consecutive batches are summed before each optimiser step
    (DDP syncs only on the last of them); a short final group is scaled by its own length.
    `resume_from` continues an epoch a checkpoint left part-way (at an optimiser step).
    A non-finite loss raises `NonFiniteLoss` (checked when the loss is read, every
    LOSS_READ_EVERY batches and at the end, so no step waits on the device); with
    `skip_nonfinite`, every batch is checked on every rank and a group holding a non-finite loss
    takes no optimiser step (its gradients are dropped), counted in `nonfinite_skipped`.
    Unreadable images are left out of their batch and listed, or raise `UnreadableData` under
    `strict_data`. The result's `stopped` is True when `at_boundary` ended the epoch early.
    `clip` bounds the gradients before each optimiser step; `after_step` runs after each one.
    """
    model.train()
    done = resume_from or EpochProgress()
    sums = _EpochSums(done, ctx.device)
    optimizer_steps, skipped = done.optimizer_steps, done.nonfinite_skipped
    unreadable = list(done.unreadable)
    group_bad, stopped, index = False, False, done.batches_done - 1
    start = time.perf_counter()

    def snapshot() -> EpochProgress:
        if float(sums.nonfinite) > 0:  # never checkpoint weights a NaN step may have touched
            raise NonFiniteLoss(index + 1)
        return EpochProgress(
            batches_done=index + 1,
            optimizer_steps=optimizer_steps,
            nonfinite_skipped=skipped,
            seconds=done.seconds + time.perf_counter() - start,
            unreadable=list(unreadable),
            **sums.read(),
        )

    for index, batch in enumerate(batches, start=done.batches_done):
        group_start = (index // accum_steps) * accum_steps
        group_size = min(accum_steps, num_batches - group_start)
        closes_group = index - group_start + 1 == group_size
        unreadable += _unreadable(batch, strict_data)
        images = precision.to_device(batch.images)
        labels = batch.labels.to(ctx.device, non_blocking=True)
        images, targets, mix = mixer(images, labels)
        indices = None if batch.indices is None else batch.indices[: images.shape[0]]
        if images.shape[0] > 0:
            sync = nullcontext() if closes_group or not ctx.distributed else model.no_sync()
            with sync:
                with precision.autocast():
                    out = step_fn(model, images, targets, indices, mix)
                parts = out if isinstance(out, dict) else {"loss": out}
                loss = parts["loss"]
                bad = (~torch.isfinite(loss.detach())).double()
                if skip_nonfinite and float(ctx.all_reduce_sum(bad.clone())) > 0:
                    # Every rank sees the same verdict, so every rank skips alike.
                    skipped += 1
                    group_bad = True
                    optimizer.zero_grad(set_to_none=True)
                else:
                    (loss / group_size).backward()
                    sums.add(parts, images.shape[0], bad)
        if closes_group:
            if not group_bad:
                _optimizer_step(model, optimizer, clip, after_step)
                optimizer_steps += 1
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()  # the schedule follows the data, skipped steps or not
            group_bad = False
        if index % LOSS_READ_EVERY == 0 and float(sums.nonfinite) > 0:
            raise NonFiniteLoss(index + 1)
        if on_step is not None:
            shown = loss.item() if index % LOSS_READ_EVERY == 0 and images.shape[0] else None
            on_step(index + 1, shown)
        if closes_group and at_boundary is not None and at_boundary(index + 1, snapshot):
            stopped = index + 1 < num_batches
            break
    # Images trained since this call began (not the resumed part) give the rate.
    totals, losses = sums.reduce(ctx, fresh_from=done.samples)
    if totals["nonfinite"] > 0:
        raise NonFiniteLoss(index + 1)
    running = time.perf_counter() - start
    seen = totals["samples"]
    return {
        "train_loss": totals["loss"] / max(seen, 1.0),
        "losses": {name: value / max(seen, 1.0) for name, value in losses.items()},
        "train_images": int(seen),
        "optimizer_steps": optimizer_steps,
        "nonfinite_skipped": skipped,
        "unreadable": unreadable,
        "images_per_s": totals["fresh"] / running if running > 0 else math.nan,
        "epoch_time_s": done.seconds + running,
        "batches_done": index + 1,
        "stopped": stopped,
    }


def evaluate(
    model: nn.Module, loader: DataLoader, ctx: DistContext, precision: Precision
) -> dict[str, float]:
    """Top-1, top-5 and NLL over the loader's dataset, each image counted once across ranks."""
    return evaluate_heads(model, loader, ctx, precision)[0]


@torch.inference_mode()
def evaluate_heads(
    model: nn.Module,
    loader: DataLoader,
    ctx: DistContext,
    precision: Precision,
    extra: Callable[[Sequence[torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]
    | None = None,
) -> list[dict[str, float]]:
    """`evaluate` for every head of a model returning a tuple of logits (one dict per head).

    `extra(heads, images, labels)`, when given, returns a batch's sum of one more per-image
    measure; its mean over the split is the first head's `"extra"` entry.
    """
    model = unwrap(model)
    model.eval()
    # Each rank's last training forward updated its own BatchNorm statistics; evaluate rank 0's,
    # the ones that get saved, everywhere.
    for buffer in model.buffers():
        ctx.broadcast_(buffer)
    # (heads, 4): top-1 hits, top-5 hits, summed NLL, count; sized up front so that a rank with an
    # empty shard still joins the reduction with the right shape.
    totals = torch.zeros(_head_count(model), 4, device=ctx.device, dtype=torch.float64)
    extra_sum = torch.zeros((), device=ctx.device, dtype=torch.float64)
    for images, labels, *_ in loader:
        if images.shape[0] == 0:
            continue  # every image of the batch was unreadable
        images = precision.to_device(images)
        labels = labels.to(ctx.device, non_blocking=True)
        with precision.autocast():
            outputs = model(images)
        heads = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        for h, logits in enumerate(heads):
            logits = logits.float()
            topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = topk == labels[:, None]
            totals[h, 0] += hits[:, 0].sum()
            totals[h, 1] += hits.any(dim=1).sum()
            totals[h, 2] += F.cross_entropy(logits, labels, reduction="sum")
            totals[h, 3] += labels.shape[0]
        if extra is not None:
            extra_sum += extra(heads, images, labels).double()
    ctx.all_reduce_sum(totals)
    ctx.all_reduce_sum(extra_sum)
    results = []
    for top1, top5, nll, count in totals.tolist():
        if count == 0:
            results.append({"top1": math.nan, "top5": math.nan, "nll": math.nan, "count": 0})
        else:
            results.append(
                {
                    "top1": 100.0 * top1 / count,
                    "top5": 100.0 * top5 / count,
                    "nll": nll / count,
                    "count": int(count),
                }
            )
    if extra is not None and results[0]["count"]:
        results[0]["extra"] = float(extra_sum) / results[0]["count"]
    return results


def _head_count(model: nn.Module) -> int:
    # A multi-exit student has its final head plus one per exit; any other model has one.
    return len(getattr(model, "exits", ())) + 1


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups with no weight decay on biases and normalisation weights (1-d tensors)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _fused(kind: type[torch.optim.Optimizer], groups: list[dict[str, Any]], **options: Any):
    """`kind` with `fused=True` where this torch has a fused kernel for the parameters' device.

    One kernel over all parameters instead of a dozen small ops per tensor: AdamW's step over the
    ResNet-50 student on a 2-core CPU took 14 ms fused against 93 ms. CUDA has it, CPUs from torch
    2.4; elsewhere (an older torch, another device) the optimizer refuses `fused` when built, and
    the plain one is used. The arithmetic is AdamW's (or SGD's) either way.
    """
    try:
        return kind(groups, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):
        return kind(groups, **options)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over `decay_groups`, fused where the device has it."""
    return _fused(torch.optim.AdamW, decay_groups(model, weight_decay), lr=lr)


def build_adamw_everywhere(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on every parameter, biases and norms too (the original's)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return _fused(torch.optim.AdamW, [{"params": params}], lr=lr, weight_decay=weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base rate, then cosine decay to `min_lr_ratio` of it, per step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return min_lr_ratio + (1.0 - min_lr_ratio) * cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_sgd(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with Nesterov momentum 0.9 over `decay_groups`, fused where the device has it."""
    groups = decay_groups(model, weight_decay)
    return _fused(torch.optim.SGD, groups, lr=lr, momentum=0.9, nesterov=True)


def build_constant_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """The base rate at every step (the original project's schedule; warmup and decay ignored)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


# Parts a run builds by name (config keys `optimizer` and `schedule`): a new one is one entry.
OPTIMIZERS: dict[str, Callable[[nn.Module, float, float], torch.optim.Optimizer]] = {
    "adamw": build_optimizer,
    "adamw_all": build_adamw_everywhere,
    "sgd": build_sgd,
}
SCHEDULES: dict[
    str, Callable[[torch.optim.Optimizer, int, int, float], torch.optim.lr_scheduler.LRScheduler]
] = {
    "cosine": build_scheduler,
    "constant": build_constant_schedule,
}
