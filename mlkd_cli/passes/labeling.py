"""`mlkd teacher label`: a teacher's outputs for K numbered views of every training image, written
once into a soft-label store (`mlkd_cli/data/softlabels.py`) for students to replay.

The views are the ones the distillation run would draw, from the same image config and pipeline:
view v of image i is fixed by (seed, v) (`mlkd_cli/data/views.py`), so a student replays it exactly.
Every rank labels its own shards (rank r: shards r, r + W, ...), skipping those already done, so
a stopped labelling continues shard by shard.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlkd_cli.core.console import Reporter
from mlkd_cli.core.constants import SHARD_SIZE
from mlkd_cli.core.cpus import cores_per_process
from mlkd_cli.core.dist import DistContext
from mlkd_cli.core.errors import UserError
from mlkd_cli.core.safeload import clip
from mlkd_cli.data.device import DeviceAugment
from mlkd_cli.data.loaders import TransformedSubset, build_keyed_loader
from mlkd_cli.data.memory import hold_splits
from mlkd_cli.data.registry import DataSplits, load_splits
from mlkd_cli.data.softlabels import (
    MAX_SHARDS,
    MAX_VIEWS,
    StoreManifest,
    check_records,
    check_same_store,
    done_shards,
    shards_of_rank,
    start_store,
    store_image_config,
    write_shard,
)
from mlkd_cli.data.sources import ArraySource
from mlkd_cli.data.transforms import ImageConfig, build_eval_transform, build_train_transform
from mlkd_cli.data.views import ViewReplay, view_seed
from mlkd_cli.engine.config import DistillConfig
from mlkd_cli.engine.launch import launch, resolve_device
from mlkd_cli.engine.planning import check_image_config, data_pipeline, dataset_image_config
from mlkd_cli.engine.precision import Precision, check_precision, prepare_forward
from mlkd_cli.engine.provenance import teacher_identity
from mlkd_cli.models.ensemble_config import EnsembleConfig, resolve_teacher
from mlkd_cli.models.teacher import (
    InputSpec,
    TeacherEnsemble,
    build_teacher,
    combine_logits,
    input_lines,
    input_sizes,
    load_member,
)

FULL_TOP_K = 100  # class counts up to this are stored whole by default; above, their top 10


@dataclass(frozen=True)
class LabelPlan:
    """A checked labelling: the run's settings, teacher, image config, pipeline and store."""

    config: DistillConfig
    teacher: EnsembleConfig
    image_config: ImageConfig
    pipeline: str  # "cpu" or "device": the pipeline whose views are stored
    manifest: StoreManifest
    output: Path

    @property
    def complete(self) -> bool:
        """Whether every shard of the store is already written (nothing left to label)."""
        return len(done_shards(self.output, self.manifest)) == self.manifest.shard_count


def resolve_top_k(top_k: int | None, classes: int) -> int:
    """`--top-k`, or its default for `classes` classes, checked (a UserError naming the range)."""
    k = top_k if top_k is not None else (classes if classes <= FULL_TOP_K else 10)
    if not 1 <= k <= classes:
        raise UserError(f"--top-k must be between 1 and the {classes} classes, got {k}")
    return k


def plan_labeling(
    cfg: DistillConfig, output: Path, views: int, top_k: int | None, shard_size: int = SHARD_SIZE
) -> LabelPlan:
    """Check flags, teacher, data, image config and the store folder before any worker starts."""
    cfg.validate()
    if not 1 <= views <= MAX_VIEWS:
        raise UserError(f"--views must be from 1 to {MAX_VIEWS}, got {views}")
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    if not cfg.augment and views > 1:
        raise UserError(f"--no-augment makes every view the same image: use --views 1, not {views}")
    teacher = resolve_teacher(
        cfg.teacher_checkpoint, cfg.teacher_model, cfg.ensemble, cfg.models_dir, cfg.teacher_ema
    )
    splits = load_splits(cfg.dataset, cfg.data_dir, cfg.download, cfg.val_fraction)
    loaded = [load_member(spec, splits.num_classes) for spec in teacher.members]
    image_config = dataset_image_config(cfg, splits)
    pipeline = data_pipeline(cfg, splits, image_config)
    check_image_config(image_config)
    check_precision(cfg.precision, resolve_device(cfg.device))
    classes = splits.num_classes
    seen = InputSpec(image_config.img_size, image_config.mean, image_config.std)
    k = resolve_top_k(top_k, classes)
    images = len(splits.train_indices)
    if -(-images // shard_size) > MAX_SHARDS:
        raise UserError(
            f"--shard-size {shard_size} cuts the {images} training images into more than "
            f"{MAX_SHARDS:,} shards: use --shard-size {-(-images // MAX_SHARDS)} or more"
        )
    manifest = StoreManifest(
        dataset=cfg.dataset,
        split="train",
        images=images,
        classes=tuple(splits.class_names),
        img_size=image_config.img_size,
        # the image config, under the manifest's stored key (see StoreManifest)
        recipe=store_image_config(image_config, pipeline, cfg.augment),
        # the input each member ran at too: a store resumed at another size is another store
        teacher={
            **teacher_identity(teacher),
            "img_size": input_sizes(loaded, seen, cfg.teacher_img_size),
        },
        views=views,
        top_k=k,
        seed=cfg.seed,
        shard_size=shard_size,
    )
    if (output / "manifest.json").is_file():
        check_same_store(output, manifest)
        check_records(output, manifest)
    for line in input_lines(loaded, seen, cfg.teacher_img_size):  # all checked: said
        Reporter(cfg.output).once(line)
    return LabelPlan(cfg, teacher, image_config, pipeline, manifest, output)


def _shard_views(
    plan: LabelPlan,
    splits: DataSplits,
    subset: TransformedSubset | None,
    draws: torch.Tensor | None,
    shard: int,
    ctx: DistContext,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every view of every image of one shard, in batches: (images on the device, positions,
    views). Device pipeline: the shard's images read once, each view from its rows of `draws`
    (views, images, DRAWS_PER_IMAGE). CPU pipeline: one loader over the shard's (image, view)
    items, view by view."""
    cfg, manifest = plan.config, plan.manifest
    start, stop = manifest.shard_range(shard)
    count, batch_size = stop - start, cfg.batch_size
    if subset is None:
        assert draws is not None and isinstance(splits.train, ArraySource)
        chosen = np.asarray(splits.train_indices[start:stop], dtype=np.int64)
        raw = torch.from_numpy(splits.train.images[chosen]).permute(0, 3, 1, 2)
        images = raw.contiguous().to(ctx.device)
        augment = DeviceAugment(plan.image_config, ctx.device, cfg.augment)
        for view in range(manifest.views):
            rows = draws[view, start:stop].to(ctx.device)
            for first in range(0, count, batch_size):
                part = slice(first, first + batch_size)
                batch = augment(images[part], None, rows[part])
                positions = torch.arange(start + first, start + first + batch.shape[0])
                yield batch, positions, torch.full_like(positions, view)
        return
    seeds = [view_seed(manifest.seed, v) for v in range(manifest.views)]
    keys = [(p, seeds[v]) for v in range(manifest.views) for p in range(start, stop)]
    loader = build_keyed_loader(subset, keys, batch_size, ctx, cfg.workers)
    for b, batch in enumerate(loader):
        kept = torch.arange(len(batch.labels)) if batch.kept is None else batch.kept
        yield batch.images.to(ctx.device), batch.indices, (b * batch_size + kept) // count


def _label_shard(
    manifest: StoreManifest,
    teacher: TeacherEnsemble,
    precision: Precision,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    start: int,
    stop: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One shard's top-k logits and their classes (images, views, k), gathered on the device
    and read back once (no host sync a batch); an unreadable image's rows keep class -1.
    Refused before anything is written when a member's output or the stored (float16) logits
    are not finite: which members misbehaved is tracked on the device as the batches go."""
    shape = (stop - start, manifest.views, manifest.top_k)
    device = precision.device
    with torch.inference_mode():
        logits = torch.zeros(shape, dtype=torch.float16, device=device)
        classes = torch.full(shape, -1, dtype=torch.int32, device=device)
        broken = torch.zeros(len(teacher.members), dtype=torch.bool, device=device)
        for batch, positions, views in batches:
            each = teacher.member_logits(precision.to_device(batch))
            broken |= ~torch.isfinite(each).flatten(1).all(1)
            output = combine_logits(each, teacher.weights, teacher.temperature)
            top = output.topk(manifest.top_k, dim=1)
            rows = (positions - start).to(device, non_blocking=True)
            columns = views.to(device, non_blocking=True)
            logits[rows, columns] = top.values.half()
            classes[rows, columns] = top.indices.int()
        values, indices = logits.cpu().numpy(), classes.cpu().numpy()
    _check_outputs(teacher, broken.cpu(), values, start, stop)
    return values, indices


def _check_outputs(
    teacher: TeacherEnsemble, broken: torch.Tensor, logits: np.ndarray, start: int, stop: int
) -> None:
    """Refuse a shard whose teacher outputs are not finite, naming the members at fault (or
    the float16 range the store keeps, when every member's output was finite)."""
    if broken.any():
        names = [name for name, bad in zip(teacher.names, broken.tolist(), strict=True) if bad]
        shown = clip(", ".join(names))
        raise UserError(
            f"the teacher's output is not finite on training images {start}:{stop} (member "
            f"{shown}: NaN or infinite weights, or an overflow): check or retrain that "
            "checkpoint, or leave it out of the ensemble; nothing of this shard was written"
        )
    if not np.isfinite(logits).all():
        raise UserError(
            f"the teacher's logits on training images {start}:{stop} exceed float16's range "
            f"(±{float(np.finfo(np.float16).max):.0f}), which the store keeps: raise the "
            "ensemble's temperature or distil live from the teacher (--model/--checkpoint)"
        )


def _held(splits: DataSplits, ctx: DistContext) -> DataSplits:
    """The splits with the training image files decoded into memory (the device pipeline's
    views are drawn from them); a file that breaks the plan's sample stops the job."""
    held = hold_splits(splits, cores_per_process(ctx.world_size))
    if isinstance(held, str):
        raise UserError(
            f"the device pipeline needs the training images in memory, and they cannot be "
            f"held: {held}; label with --data-pipeline cpu"
        )
    return held


def label_worker(ctx: DistContext, plan: LabelPlan) -> dict[str, Any]:
    """The worker `mlkd teacher label` launches on every rank: label this rank's missing shards."""
    cfg, manifest = plan.config, plan.manifest
    report = Reporter(cfg.output, ctx.rank)
    splits = load_splits(cfg.dataset, cfg.data_dir, False, cfg.val_fraction)
    spec = InputSpec(plan.image_config.img_size, plan.image_config.mean, plan.image_config.std)
    teacher, _ = build_teacher(plan.teacher, splits.num_classes, spec, cfg.teacher_img_size)
    precision = prepare_forward(
        cfg.precision,
        teacher,
        plan.image_config.img_size,
        ctx,
        cfg.batch_size,
        images=manifest.views * manifest.images,  # what the whole job labels
    )
    report.precision(precision.describe(), precision.headline())
    if ctx.is_main:
        start_store(plan.output, manifest)
    ctx.barrier()
    done = done_shards(plan.output, manifest)
    mine = [s for s in shards_of_rank(manifest, ctx.rank, ctx.world_size) if s not in done]
    subset = draws = None
    if plan.pipeline == "device":
        splits = _held(splits, ctx)
        draws = ViewReplay(manifest.seed, manifest.views, manifest.images).draw_table()
    else:
        transform = build_train_transform if cfg.augment else build_eval_transform
        subset = TransformedSubset(splits.train, splits.train_indices, transform(plan.image_config))
    started, images = time.perf_counter(), 0
    with report.step_progress(f"labelling {len(mine)} shards", len(mine)) as on_step:
        for count, shard in enumerate(mine, start=1):
            start, stop = manifest.shard_range(shard)
            batches = _shard_views(plan, splits, subset, draws, shard, ctx)
            logits, classes = _label_shard(manifest, teacher, precision, batches, start, stop)
            write_shard(plan.output, manifest, shard, logits, classes)
            images += stop - start
            if on_step is not None:
                on_step(count, None)
    ctx.barrier()
    return {
        "store": str(plan.output),
        "shards": manifest.shard_count,
        "labelled_here": len(mine),
        "skipped": len(done),
        "views": manifest.views,
        "top_k": manifest.top_k,
        "images": manifest.images,
        "seconds": time.perf_counter() - started,
        "rank0_images": images,
    }


def label_store(plan: LabelPlan) -> dict[str, Any]:
    """Run the labelling on the run's processes; rank 0's summary."""
    cfg = plan.config
    return launch(
        label_worker,
        plan,
        cfg.world_size,
        cfg.device,
        max_restarts=cfg.max_restarts,
        memory_hint=f"lower --batch-size, now {cfg.batch_size} per process",
        workers=cfg.workers,
    )
