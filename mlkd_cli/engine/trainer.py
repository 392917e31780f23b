"""Training runs: a plan (in the launching process), then `fit` (on every rank).

`fit` is the one loop behind every command that trains: data, optimiser, schedule, resume, the
epoch loop, validation and checkpoints. What differs between teacher training and distillation
is a `Task`: which module trains, what one step's loss is, how validation is scored, and which
plain model gets saved. This file holds the run's lifecycle (lock, signals, set-up, epochs,
summary); what is saved and how a run resumes is `checkpointing.Checkpointer`'s.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from mlkd_cli import __version__
from mlkd_cli.core.atomic import run_lock
from mlkd_cli.core.checkpoint import ModelCard
from mlkd_cli.core.console import Reporter
from mlkd_cli.core.cpus import cores_per_process
from mlkd_cli.core.dist import DistContext
from mlkd_cli.core.errors import RunInterrupted, RunStopped, UserError
from mlkd_cli.core.rng import seed_everything, set_rng_state
from mlkd_cli.data.device import DeviceBatches
from mlkd_cli.data.loaders import (
    ReplayedBatches,
    TrainingBatches,
    TransformedSubset,
    build_eval_loader,
    build_train_batches,
)
from mlkd_cli.data.memory import hold_splits
from mlkd_cli.data.registry import (
    DataSplits,
    load_splits,
)
from mlkd_cli.data.sources import ArraySource
from mlkd_cli.data.transforms import ImageConfig, build_eval_transform, build_train_transform
from mlkd_cli.data.views import ViewReplay
from mlkd_cli.engine import loop
from mlkd_cli.engine.checkpointing import (
    MODEL,
    Checkpointer,
    diverged_message,
    earlier_layout,
    read_training_state,
)
from mlkd_cli.engine.config import TrainConfig
from mlkd_cli.engine.ema import EMA, RAW, ModelEma, better_weights, ema_metrics
from mlkd_cli.engine.history import History
from mlkd_cli.engine.interrupt import StopRequest
from mlkd_cli.engine.launch import launch, launcher_rank
from mlkd_cli.engine.loggers import (
    MetricLogger,
    log_final,
    parse_log_to,
    run_config,
    tracking,
)
from mlkd_cli.engine.planning import (
    RunFiles,
    RunPlan,
    choose_data_pipeline,
    describe_augmentation,
)
from mlkd_cli.engine.precision import Precision, choose_layout, keep_idle_tap_convs_fp32
from mlkd_cli.models.norms import use_fast_group_norms


class Task(Protocol):
    """What a kind of training run supplies to `fit`."""

    def build(self, ctx: DistContext) -> nn.Module:
        """The module that trains (on the CPU; `fit` moves it)."""

    def prepare(
        self, ctx: DistContext, batches: TrainingBatches, precision: loop.Precision
    ) -> None:
        """Work before the first epoch, with the training data at hand (may do nothing)."""

    def start_epoch(self, epoch: int) -> None:
        """Told before each epoch (0-based), resumed ones included (may do nothing)."""

    def step(
        self,
        model: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        indices: torch.Tensor | None,
        mix: float,
    ) -> torch.Tensor:
        """One batch's loss (inside autocast); `indices` are the images' dataset positions, `mix`
        the batch's Mixup/CutMix λ (`loop.StepFn`)."""

    def evaluate(
        self, model: nn.Module, loader: DataLoader, ctx: DistContext, precision: loop.Precision
    ) -> dict[str, float]:
        """Validation metrics: `val_top1`, `val_top5`, `val_nll`, `val_images`, and any others."""

    def score(self, row: dict[str, Any]) -> float:
        """How good an epoch's validation row is (higher is better): the best model is kept."""

    def plain_model(self, model: nn.Module) -> nn.Module:
        """The plain timm model inside what trains, as `<name>.pth` stores it."""

    def save_best(
        self, model: nn.Module, files: RunFiles, card: ModelCard, epoch: int, metrics: dict
    ) -> None:
        """Write whatever goes beside a new best model (may write nothing)."""

    def report_epoch(self, report: Reporter, row: dict[str, Any], improved: bool) -> None:
        """Tell the user how the epoch went."""


def build_training_batches(
    cfg: TrainConfig,
    splits: DataSplits,
    image_config: ImageConfig,
    ctx: DistContext,
    positions: list[int] | None = None,
    replay: ViewReplay | None = None,
    pipeline: str = "cpu",
) -> TrainingBatches:
    """This rank's training batches from `pipeline` ("device" needs the training images in
    memory), over the training split's `positions` (default all of it); with `replay`, each
    image in a stored view."""
    per_process = cfg.batch_plan(ctx.world_size).per_process
    indices = splits.train_indices
    if positions is not None:
        indices = [indices[p] for p in positions]
    if pipeline == "device":
        assert isinstance(splits.train, ArraySource)
        return DeviceBatches(
            splits.train,
            indices,
            image_config,
            per_process,
            ctx,
            cfg.seed,
            cfg.augment,
            replay,
        )
    transform = (
        build_train_transform(image_config) if cfg.augment else build_eval_transform(image_config)
    )
    train_set = TransformedSubset(splits.train, indices, transform)
    return build_train_batches(train_set, per_process, ctx, cfg.seed, cfg.workers, replay)


def launch_training(worker: Any, plan: Any) -> dict[str, Any]:
    """Run a planned training `worker` on the run's processes; returns rank 0's summary.

    `plan` is any checked plan with the run's `config` (`RunPlan`, `DistillPlan`).
    """
    cfg = plan.config
    per_process = cfg.batch_plan(cfg.world_size).per_process
    with _run_lock(plan):
        return launch(
            worker,
            plan,
            cfg.world_size,
            cfg.device,
            max_restarts=cfg.max_restarts,
            memory_hint=f"lower --batch-size, now {per_process} per process",
            workers=cfg.workers,
        )


@contextlib.contextmanager
def _run_lock(plan: Any) -> Iterator[None]:
    """The run's name locked in its folder while it runs, by the launching process only (not
    by each torchrun rank): a second run of the same name is refused, a stale lock taken over."""
    files: RunFiles = plan.files if isinstance(plan, RunPlan) else plan.run.files
    if launcher_rank() != 0:
        yield
        return
    with (
        run_lock(files.lock, files.what, Reporter(plan.config.output).warn),
        _sigterm_raises(files),
    ):
        yield


@contextlib.contextmanager
def _sigterm_raises(files: RunFiles) -> Iterator[None]:
    """SIGTERM outside the training loop (setting up, finishing) ends the run with one line and
    its lock released, instead of killing the process where it stands. Inside the loop
    `StopRequest` replaces this handler and saves the state first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        resume = f" (with --resume: {files.last} exists)" if files.last.is_file() else ""
        raise RunInterrupted(
            f"stopped by {signal.Signals(signum).name} outside the training loop; run the "
            f"same command again{resume}",
            signum,
        )

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fit(ctx: DistContext, plan: RunPlan, task: Task) -> dict[str, Any]:
    """Train `task`'s module under `plan`; runs on every rank, rank 0 writes the files."""
    with contextlib.ExitStack() as closing:
        if plan.config.deterministic:
            closing.enter_context(_deterministic())
        return _fit(ctx, plan, task)


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """torch's deterministic algorithms for the run (warning where one has none), then as before."""
    before = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS needs it
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _fit(ctx: DistContext, plan: RunPlan, task: Task) -> dict[str, Any]:
    run = _Run(ctx, plan, task)
    cfg = plan.config
    names = parse_log_to(cfg.log_to) if ctx.is_main else []  # trackers: rank 0 only
    config = run_config(run.history.run_info, cfg.output_dir, ctx.world_size)
    trackers = tracking(names, cfg.output_dir, run.files.name, config, run.report.info)
    with StopRequest() as stop, trackers as loggers:
        run.loggers = loggers
        for epoch in range(run.resumed.epoch, cfg.epochs):
            metrics = run.train_epoch(epoch, stop)
            run.finish_epoch(epoch, metrics, stop)
        summary = run.summary()
        log_final(loggers, summary)
    ctx.barrier()
    run.say_weights()
    return summary


class _Run:
    """One training run's parts, built once on this rank, and its epoch-level steps.

    The parts are set up in the order the loop needs them (data, model, optimiser and schedule,
    history and resume, DDP); `train_epoch` runs one epoch of `loop.train_one_epoch`, and
    `finish_epoch` validates, records, saves and reports it.
    """

    def __init__(self, ctx: DistContext, plan: RunPlan, task: Task) -> None:
        cfg = plan.config
        self.ctx, self.plan, self.task, self.cfg, self.files = ctx, plan, task, cfg, plan.files
        self.report = Reporter(cfg.output, ctx.rank)
        self.precision = Precision.resolve(cfg.precision, ctx.device, cfg.source_of("precision"))
        # The training state this run continues (--resume, or a launcher restart), read once.
        self.continued = read_training_state(plan, ctx)
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        self._setup_history()
        if ctx.distributed:
            self.model = DistributedDataParallel(
                self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
            )
        self.mixer = loop.BatchMixer(
            plan.card.num_classes, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.label_smoothing
        )
        self.warned: set[str] = set()
        self.loggers: list[MetricLogger] = []  # `_fit` opens the run's trackers
        self._announce()

    def _setup_data(self) -> None:
        cfg, ctx, image_config = self.cfg, self.ctx, self.plan.image_config
        splits = load_splits(cfg.dataset, cfg.data_dir, False, cfg.val_fraction)
        pipeline, self.pipeline_why = choose_data_pipeline(cfg, splits, image_config)
        if pipeline == "device" and not isinstance(splits.train, ArraySource):
            splits, pipeline = self._hold_in_memory(splits)
        positions = self.plan.training_positions(len(splits.train_indices))
        self.train_batches = build_training_batches(
            cfg, splits, image_config, ctx, positions, self.plan.view_replay, pipeline
        )
        self.val_set = TransformedSubset(
            splits.val, splits.val_indices, build_eval_transform(image_config)
        )
        self.val_loader = ReplayedBatches(
            build_eval_loader(self.val_set, cfg.batch_size * 2, ctx, cfg.workers)
        )
        self.num_batches = self.train_batches.batches_per_epoch
        if self.num_batches == 0:
            raise UserError(f"{cfg.dataset} has no training batches; lower --batch-size")

    def _hold_in_memory(self, splits: DataSplits) -> tuple[DataSplits, str]:
        """The splits with the training image files decoded into memory for the device
        pipeline; where one breaks the plan's sample (another size, unreadable), timm's
        transforms instead, said in one line, unless nothing else will do."""
        held = hold_splits(splits, cores_per_process(self.ctx.world_size))
        if not isinstance(held, str):
            return held, "device"
        if self.cfg.data_pipeline == "device" or self.plan.view_replay is not None:
            asked = (
                "--data-pipeline device"
                if self.cfg.data_pipeline == "device"
                else ("replaying the store's views")
            )
            raise UserError(
                f"{asked} needs the training images in memory, and they cannot be held: "
                f"{held}; use --data-pipeline cpu (and a store labelled with it)"
            )
        self.pipeline_why = f"cpu (timm's transforms: {held})"
        return splits, "cpu"

    def _setup_model(self) -> None:
        seed_everything(self.cfg.seed, 0, -1)  # identical initial weights on every rank
        model = self.task.build(self.ctx)
        use_fast_group_norms(model)  # before the layout is timed: it changes channels_last's speed
        size = self.plan.image_config.img_size
        sample = (3, size, size)
        earlier = earlier_layout(self.continued)
        if earlier is None:
            run_images = self.cfg.epochs * self.num_batches * self.cfg.batch_size
            self.precision = choose_layout(
                self.precision,
                model,
                sample,
                self.ctx,
                train=True,
                batch=self.cfg.batch_size,
                run_images=run_images,
            )
        else:  # a resumed or restarted run computes as the run it continues did
            channels_last, bf16 = earlier
            why = f"{self.precision.why}; the layout of the run it continues"
            if self.precision.auto and bf16 is not None:
                why = f"{self.precision.why}; the arithmetic and layout of the run it continues"
            else:
                bf16 = self.precision.bf16
            self.precision = replace(
                self.precision, channels_last=channels_last, bf16=bf16, why=why
            )
        self.precision = keep_idle_tap_convs_fp32(self.precision, model, sample)
        self.precision.place(model)
        # The average copies the placed model, before compiling (a copy of a compiled module
        # would call the original's compiled forward).
        cfg = self.cfg
        self.ema = (
            ModelEma(model, cfg.model_ema_decay, cfg.model_ema_warmup) if cfg.model_ema else None
        )
        if self.cfg.compile:
            failed = loop.compile_module(model, self.ctx.device)
            if failed:
                self.report.warn(f"--compile is not available here ({failed}); training uncompiled")
        self.task.prepare(self.ctx, self.train_batches, self.precision)
        self.model = model

    def _setup_optimizer(self) -> None:
        cfg = self.cfg
        self.batch_plan = cfg.batch_plan(self.ctx.world_size)
        self.accum = self.batch_plan.accumulation
        self.steps_per_epoch = -(-self.num_batches // self.accum)
        self.optimizer = loop.OPTIMIZERS[cfg.optimizer](self.model, cfg.lr, cfg.weight_decay)
        self.scheduler = loop.SCHEDULES[cfg.schedule](
            self.optimizer,
            total_steps=cfg.epochs * self.steps_per_epoch,
            warmup_steps=int(cfg.warmup_epochs * self.steps_per_epoch),
            min_lr_ratio=cfg.min_lr_ratio,
        )
        self.clip = (
            None if cfg.clip_grad is None else loop.GradientClip(cfg.clip_grad, cfg.clip_mode)
        )

    def _setup_history(self) -> None:
        """The history, and where a resumed (or launcher-restarted) run continues from."""
        cfg, ctx, files = self.cfg, self.ctx, self.files
        self.history = History(
            cfg.output_dir,
            files.name,
            {
                "name": files.name,
                "kind": self.plan.kind,
                "mlkd_version": __version__,
                "config": cfg.to_record(),
                "provenance": self.plan.card.extra.get("provenance"),
                "model_card": asdict(self.plan.card),
            },
        )
        # The parts the training state holds, each under its key: a part added here is saved
        # and resumed with no other edit.
        parts = {
            MODEL: self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
        }
        if self.ema is not None:
            parts["ema"] = self.ema
        self.checkpoints = Checkpointer(
            self.plan, self.task, ctx, parts, self.history, self.precision
        )
        # A launcher restart (--max-restarts, or torchrun's) continues from the last saved state.
        self.resumed = self.checkpoints.restore(self.continued)
        if self.ema is not None and "ema" in self.resumed.missing_parts:
            self.ema.restart_from(loop.unwrap(self.model))
            self.report.warn(
                "the run continued had no --model-ema: the average starts from its weights now"
            )
        if self.continued is not None:
            top1 = self.resumed.best["top1"]
            self.report.info(f"resuming {files.name} {self.resumed.where} (best top-1 {top1:.2f})")
        self.best = self.resumed.best

    def _announce(self) -> None:
        cfg, ctx, plan = self.cfg, self.ctx, self.batch_plan
        line = self.precision.describe()
        self.history.run_info["precision"] = line.removeprefix("precision: ")
        self.report.precision(line, self.precision.headline())
        budget = ""
        if self.plan.labelled is not None:
            budget = f" (labels of {len(self.plan.labelled)} used: --label-fraction "
            budget += f"{cfg.label_fraction:g})"
        # Two lines that fit 80 columns: what trains on what, then how it runs.
        self.report.info(
            f"training {self.plan.card.arch} ({self.plan.kind}) on {cfg.dataset}, "
            f"{cfg.epochs} epochs: {len(self.train_batches)} train{budget} / "
            f"{len(self.val_set)} val images"
        )
        processes = f"{ctx.world_size} process" + ("es" if ctx.world_size > 1 else "")
        passes = f"{self.accum} pass" + ("es" if self.accum > 1 else "")
        self.report.info(
            f"  {processes} on {ctx.device.type}, effective batch {plan.global_batch} "
            f"({plan.per_process} each, {passes})"
        )
        self.report.info(f"  data pipeline {self.pipeline_why}")
        views, _, mixing = describe_augmentation(self.plan.image_config, cfg).rpartition("; ")
        self.report.info(views)  # within 80 columns: the views, then how images are mixed
        self.report.info(f"  {mixing}")
        knobs = _describe_knobs(cfg)
        if knobs:
            self.report.info(f"  {knobs}")

    def train_epoch(self, epoch: int, stop: StopRequest) -> dict[str, Any]:
        """One epoch (or the rest of a part-done one); raises on a stop, divergence or bad data."""
        cfg, ctx, resumed = self.cfg, self.ctx, self.resumed
        seed_everything(cfg.seed, ctx.rank, epoch)
        progress = resumed.progress if epoch == resumed.epoch else None
        if progress is not None and resumed.rng is not None:
            set_rng_state(resumed.rng, ctx.device)
        batches = self.train_batches.epoch(epoch, progress.batches_done if progress else 0)
        self.task.start_epoch(epoch)
        description = f"epoch {epoch + 1}/{cfg.epochs}"
        with self.report.step_progress(description, self.num_batches) as on_step:
            try:
                metrics = loop.train_one_epoch(
                    self.model,
                    batches,
                    self.num_batches,
                    self.task.step,
                    self.optimizer,
                    self.scheduler,
                    self.mixer,
                    ctx,
                    self.precision,
                    self.accum,
                    resume_from=progress,
                    on_step=on_step,
                    at_boundary=self._boundary(epoch, stop),
                    skip_nonfinite=cfg.skip_nonfinite,
                    strict_data=cfg.strict_data,
                    clip=self.clip,
                    after_step=self._update_ema if self.ema is not None else None,
                )
            except loop.NonFiniteLoss as exc:
                raise RunStopped(diverged_message(self.files, epoch, exc.batch)) from None
            except loop.UnreadableData as exc:
                raise UserError(
                    f"{exc.image.path} is not a readable image ({exc.image.reason}); remove "
                    "or replace it, or drop --strict-data to leave unreadable images out"
                ) from None
        if metrics["stopped"]:
            where = f"in epoch {epoch + 1} after batch {metrics['batches_done']}"
            raise _interrupted(stop, self.files, f"{where} of {self.num_batches}")
        return metrics

    def _update_ema(self) -> None:
        assert self.ema is not None
        self.ema.update(loop.unwrap(self.model))

    def _boundary(self, epoch: int, stop: StopRequest) -> loop.BoundaryFn:
        """What runs after each optimiser step: stop requests and mid-epoch saves."""
        ctx, best = self.ctx, self.best

        def at_boundary(batches_done: int, snapshot: Any) -> bool:
            step = epoch * self.steps_per_epoch + -(-batches_done // self.accum)
            # On one process the request is a flag read; across ranks it takes a collective,
            # so it is agreed every LOSS_READ_EVERY steps, not at every one.
            check = not ctx.distributed or step % loop.LOSS_READ_EVERY == 0
            stopping = check and stop.agreed(ctx) is not None
            periodic = self.cfg.save_every_steps and step % self.cfg.save_every_steps == 0
            if (stopping or periodic) and batches_done < self.num_batches:
                self.checkpoints.save_mid_epoch(epoch, snapshot(), best)
            return stopping

        return at_boundary

    def finish_epoch(self, epoch: int, metrics: dict[str, Any], stop: StopRequest) -> None:
        """Validate, record, save and report the epoch; stop here if asked to."""
        ctx = self.ctx
        unreadable = [u for part in ctx.gather_objects(metrics["unreadable"]) for u in part]
        for path, reason in unreadable:
            if path not in self.warned:
                self.warned.add(path)
                self.report.warn(f"left out unreadable image {path} ({reason})")
        row = {
            "epoch": epoch + 1,
            "train_loss": metrics["train_loss"],
            **metrics["losses"],
            **self.task.evaluate(self.model, self.val_loader, ctx, self.precision),
            "lr": self.optimizer.param_groups[0]["lr"],
            "effective_batch": self.batch_plan.global_batch,
            "optimizer_steps": metrics["optimizer_steps"],
            "nonfinite_skipped": metrics["nonfinite_skipped"],
            "unreadable_skipped": len(unreadable),
            "images_per_s": metrics["images_per_s"],
            "epoch_time_s": metrics["epoch_time_s"],
        }
        score, weights = self.task.score(row), RAW
        if self.ema is not None:
            ema_row = self.task.evaluate(self.ema.module, self.val_loader, ctx, self.precision)
            row.update({f"ema_{k}": v for k, v in ema_row.items()})
            weights = better_weights(score, self.task.score(ema_row))
            row["weights"] = weights  # the ones this epoch would save
            score = max(score, self.task.score(ema_row))
        self.history.append(row)
        for logger in self.loggers:
            logger.log_epoch(row)
        improved = score > self.best.get("score", self.best["top1"])
        chosen = row if weights == RAW else {**row, **ema_metrics(row)}
        if improved:
            self.best = {"top1": chosen["val_top1"], "epoch": epoch + 1, "score": score}
            self.best["weights"] = weights
        # Agreed before saving: a run that stops here must leave its state of this epoch.
        stopping = epoch + 1 < self.cfg.epochs and stop.agreed(ctx) is not None
        if ctx.is_main:
            module = None if weights == RAW else self.ema.module  # type: ignore[union-attr]
            self.checkpoints.save_epoch(
                self.best, chosen, improved, force_state=stopping, weights=module
            )
        self.task.report_epoch(self.report, row, improved)
        if self.ema is not None:
            kept = " (better than the raw weights)" if weights == EMA else ""
            self.report.info(f"  model EMA: top-1 {row['ema_val_top1']:.2f}{kept}")
        if stopping:
            raise _interrupted(stop, self.files, f"after epoch {epoch + 1}")

    def say_weights(self) -> None:
        """With --model-ema: one line saying which weights the best model holds, and why."""
        best = self.best
        row = self._row_of(best["epoch"])
        if self.ema is None or row is None:
            return
        where = f"{self.files.best.name} holds the"
        if "ema_val_top1" not in row:  # the best epoch came before a resume added the EMA
            self.report.info(f"{where} raw weights of epoch {best['epoch']} (no EMA then)")
            return
        ema, raw = row["ema_val_top1"], row["val_top1"]
        which = "EMA" if best.get("weights") == EMA else "raw"
        self.report.info(
            f"{where} {which} weights of epoch {best['epoch']} "
            f"(validation top-1: EMA {ema:.2f}, raw {raw:.2f})"
        )

    def _row_of(self, epoch: int) -> dict[str, Any] | None:
        return next((r for r in self.history.rows if r["epoch"] == epoch), None)

    def summary(self) -> dict[str, Any]:
        """What the command prints and returns; the best row's validation metrics are those of
        the weights saved (the EMA's, where --model-ema chose them)."""
        files, rows, best = self.files, self.history.rows, self.best
        best_row = self._row_of(best["epoch"])
        if best_row is not None and best_row.get("weights") == EMA:
            best_row = {**best_row, **ema_metrics(best_row)}
        return {
            "name": files.name,
            "kind": self.plan.kind,
            "model": self.plan.card.arch,
            "dataset": self.cfg.dataset,
            "epochs": self.cfg.epochs,
            "best_epoch": best["epoch"],
            "best_val_top1": best["top1"],
            "last": rows[-1] if rows else None,
            "best_row": best_row,
            "best_weights": best.get("weights", RAW),
            "world_size": self.ctx.world_size,
            "effective_batch": self.batch_plan.global_batch,
            "files": self.checkpoints.written(),
        }


def _describe_knobs(cfg: TrainConfig) -> str:
    """timm's knobs the run uses, in one line (empty: none)."""
    knobs = []
    if cfg.drop_path is not None:
        knobs.append(f"drop-path {cfg.drop_path:g}")
    if cfg.clip_grad is not None:
        knobs.append(f"gradients clipped to {cfg.clip_grad:g} ({cfg.clip_mode})")
    if cfg.model_ema:
        warmup = ", warmup" if cfg.model_ema_warmup else ""
        knobs.append(f"model EMA (decay {cfg.model_ema_decay:g}{warmup})")
    return ", ".join(knobs)


def _interrupted(stop: StopRequest, files: RunFiles, where: str) -> RunInterrupted:
    return RunInterrupted(
        f"stopped by {stop.name} {where}; the training state is saved in {files.last}: "
        "run the same command with --resume to continue",
        stop.signum or signal.SIGTERM,
    )
