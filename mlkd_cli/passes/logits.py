"""Running a model over a dataset split on every rank: logits gathered in dataset order.

Shared by evaluation, ensemble fitting and the pipeline's comparison (one pass, one way).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mlkd_cli.core.checkpoint import ModelCard
from mlkd_cli.core.console import OutputOptions, Reporter
from mlkd_cli.core.dist import DistContext
from mlkd_cli.core.errors import UserError
from mlkd_cli.data.loaders import ShardSampler, TransformedSubset, build_eval_loader
from mlkd_cli.data.registry import DataSplits, load_splits
from mlkd_cli.data.transforms import ImageConfig, build_eval_transform
from mlkd_cli.engine.launch import launch, launcher_rank, resolve_device
from mlkd_cli.engine.precision import Precision, check_precision, prepare_forward

SPLITS = ("val", "test")


@dataclass(frozen=True, kw_only=True)
class PlannedPass:
    """A checked pass over one split: which data, how it is viewed, batched and reported."""

    dataset: str
    data_dir: Path
    split: str
    val_fraction: float
    image_config: ImageConfig
    batch_size: int = 128
    workers: int | None = None
    precision: str = "auto"  # --precision: auto, bf16 or fp32
    output: OutputOptions = field(default_factory=OutputOptions)


def split_dataset(splits: DataSplits, split: str, image_config: ImageConfig) -> TransformedSubset:
    """The evaluation-transformed images of one split ('val' or 'test')."""
    if split == "val":
        return TransformedSubset(splits.val, splits.val_indices, build_eval_transform(image_config))
    if split == "test":
        if splits.test is None:
            raise UserError(f"{splits.spec.name} has no test split here; use --split val")
        return TransformedSubset(
            splits.test, range(len(splits.test)), build_eval_transform(image_config)
        )
    raise UserError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")


def check_split(path: Path, job: PlannedPass, classes: int | None) -> None:
    """Refuse, before any worker starts, a dataset whose class count is not the model's or that
    lacks the split."""
    splits = load_splits(job.dataset, job.data_dir, False, job.val_fraction)
    if classes != splits.num_classes:
        raise UserError(
            f"{path} predicts {classes} classes but {job.dataset} has {splits.num_classes}; "
            "pass the --dataset it was trained on"
        )
    split_dataset(splits, job.split, job.image_config)  # refuses an absent split


def place_for_pass(
    job: PlannedPass, model: torch.nn.Module, ctx: DistContext, images: int
) -> tuple[Precision, Reporter]:
    """`model` placed for the pass's precision (its layout timed only where the pass over
    `images` is long enough to pay for it), and the pass's reporter, which has said it."""
    precision = prepare_forward(
        job.precision,
        model,
        job.image_config.img_size,
        ctx,
        job.batch_size,
        images=images,
    )
    report = Reporter(job.output, ctx.rank)
    report.precision(precision.describe(), precision.headline())
    return precision, report


def model_pass(
    ctx: DistContext,
    job: PlannedPass,
    build: Callable[[DataSplits], torch.nn.Module],
    label: str,
    heads: bool = False,
) -> dict:
    """The logits of `build(splits)` over the job's split on every rank, the model placed for the
    job's precision first; with `heads`, of every head of a model returning a tuple, stacked
    (heads, images, classes). `logits`, `labels`, `seconds` are complete on rank 0, beside the
    split's `class_names` and the model's `params`."""
    splits = load_splits(job.dataset, job.data_dir, False, job.val_fraction)
    dataset = split_dataset(splits, job.split, job.image_config)
    model = build(splits)
    precision, report = place_for_pass(job, model, ctx, len(dataset))
    logits, labels, seconds = split_logits(
        ctx,
        (lambda images: torch.stack(model(images))) if heads else model,
        precision,
        dataset,
        job.batch_size,
        job.workers,
        report,
        f"{label} on {job.split}",
    )
    return {
        "logits": logits,
        "labels": labels,
        "seconds": seconds,
        "class_names": splits.class_names,
        "params": sum(p.numel() for p in model.parameters()),
    }


def launch_pass(
    worker: Callable[[DistContext, PlannedPass], dict],
    job: PlannedPass,
    world_size: int,
    device: str,
) -> dict | None:
    """Run a pass worker on `world_size` processes; rank 0 gets its result with `logits` and
    `labels` as tensors, other torchrun ranks None."""
    check_precision(job.precision, resolve_device(device))
    collected = launch(
        worker,
        job,
        world_size,
        device,
        memory_hint=f"lower --batch-size, now {job.batch_size} per process",
        workers=job.workers,
    )
    if launcher_rank() != 0:
        return None
    collected["logits"] = torch.from_numpy(collected["logits"])
    collected["labels"] = torch.from_numpy(collected["labels"])
    return collected


def split_logits(
    ctx: DistContext,
    forward: Callable[[torch.Tensor], torch.Tensor],
    precision: Precision,
    dataset: Dataset,
    batch_size: int,
    workers: int | None,
    report: Reporter,
    description: str,
) -> tuple[np.ndarray, np.ndarray, float]:
    """`forward`'s logits over `dataset` (batch on the second-to-last axis), in dataset order.

    Each rank runs its shard (items r, r + W, ...); rank 0 reassembles them. Also returns the
    wall-clock seconds of the pass.
    """
    loader = build_eval_loader(dataset, batch_size, ctx, workers)
    chunks, unreadable = [], []
    start = time.perf_counter()
    with report.step_progress(description, len(loader)) as tick, torch.inference_mode():
        for step, batch in enumerate(loader, start=1):
            logits = None
            if batch.images.shape[0]:
                with precision.autocast():
                    logits = forward(precision.to_device(batch.images)).float().cpu()
            chunks.append((logits, batch))
            unreadable.extend(batch.skipped)
            if tick is not None:
                tick(step, None)
    seconds = time.perf_counter() - start
    shard_logits, shard_labels = _assemble_shard(chunks)
    shards = ctx.gather_objects((shard_logits, shard_labels, unreadable))
    total = sum(len(y) for _, y, _ in shards)
    template = next((x for x, _, _ in shards if x is not None), None)
    if template is None:
        raise UserError(f"no image of the split could be read ({description}); check the files")
    logits = np.zeros((*template.shape[:-2], total, template.shape[-1]), dtype=np.float32)
    ordered = np.zeros(total, dtype=np.int64)
    for rank, (shard_x, shard_y, _) in enumerate(shards):
        # The positions the loader's sampler gave this rank, in the order it gave them.
        positions = np.asarray(
            ShardSampler(total, rank, ctx.world_size, batch_size).indices, dtype=np.int64
        )
        if shard_x is not None:  # None: no image of that shard was readable
            logits[..., positions, :] = shard_x
        ordered[positions] = shard_y
    left_out = [image for _, _, part in shards for image in part]
    if left_out:
        # Unreadable images hold label -1; every pass over the split leaves out the same ones.
        for image in left_out:
            report.warn(f"left out unreadable image {image.path} ({image.reason})")
        keep = ordered >= 0
        logits, ordered = logits[..., keep, :], ordered[keep]
    return logits, ordered, seconds


def _assemble_shard(chunks: list) -> tuple[np.ndarray | None, np.ndarray]:
    """One rank's logits and labels in loader order, unreadable items as NaN rows, label -1."""
    template = next((x for x, _ in chunks if x is not None), None)
    if template is None:
        count = sum(len(b.skipped) for _, b in chunks)
        return None, np.full(count, -1, dtype=np.int64)
    rows, labels = [], []
    for logits, batch in chunks:
        size = len(batch.labels) + len(batch.skipped)
        if batch.kept is None:
            rows.append(logits)
            labels.append(batch.labels)
            continue
        full = torch.full((*template.shape[:-2], size, template.shape[-1]), float("nan"))
        full_labels = torch.full((size,), -1, dtype=torch.long)
        if logits is not None:
            full[..., batch.kept, :] = logits
            full_labels[batch.kept] = batch.labels
        rows.append(full)
        labels.append(full_labels)
    return torch.cat(rows, dim=-2).numpy(), torch.cat(labels).numpy()


# Where `--data-dir` defaults when neither the flag nor a model card names a folder.
DEFAULT_DATA_DIR = Path("data")


def data_dir_for(
    given: Path | None,
    dataset: str | None,
    card: ModelCard | None,
    path: Path,
    output: OutputOptions,
) -> Path:
    """The data folder to read: `--data-dir` when given; else the folder the model was trained
    on, as its card records it (said in one line), if that still exists and `dataset` is the
    card's; else DEFAULT_DATA_DIR."""
    if given is not None:
        return given
    recorded = card.extra.get("data_dir") if card is not None else None
    if isinstance(recorded, str) and dataset in (None, card.dataset) and Path(recorded).is_dir():
        Reporter(output, launcher_rank()).info(
            f"data from {recorded}, the folder {path.name} was trained on (--data-dir overrides)"
        )
        return Path(recorded)
    return DEFAULT_DATA_DIR


def card_image_config(card: ModelCard) -> ImageConfig:
    """The evaluation image config a model card records."""
    return ImageConfig(
        img_size=card.img_size,
        crop_pct=card.crop_pct,
        mean=tuple(card.mean),
        std=tuple(card.std),
        interpolation=card.interpolation,
    )
