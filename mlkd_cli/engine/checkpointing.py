"""Checkpointing a training run: the training state `<name>_last.pth` that `--resume` and a
launcher restart continue from, and the files written beside it after each epoch (the best and
periodic models, the history, the curves).

`Checkpointer` is given the run's stateful parts by name (model, optimiser, schedule) and saves
each part's `state_dict` under its name, beside the loop's own bookkeeping (epoch, part-done
epoch, best, history, restarts, layout, config, card); resuming walks the same mapping, so a part
added to it is saved and restored with no other edit. The format is `TRAINING_STATE_FORMAT`
(core/checkpoint.py), each file written atomically. Like the trainer that uses it, it imports
`core` and the engine's loop, history and planning only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from torch import nn

from mlkd_cli import __version__
from mlkd_cli.core.checkpoint import (
    TRAINING_STATE_FORMAT,
    ModelCard,
    atomic_save,
    load_checkpoint,
    save_model,
)
from mlkd_cli.core.dist import DistContext
from mlkd_cli.core.errors import UserError
from mlkd_cli.core.plots import training_curves_png
from mlkd_cli.core.rng import rng_state
from mlkd_cli.engine import loop
from mlkd_cli.engine.history import History
from mlkd_cli.engine.planning import RunFiles, RunPlan
from mlkd_cli.engine.precision import Precision

# The training curves are redrawn at most this often (and after the last epoch).
CURVES_EVERY_S = 30.0
# The training state is written after an epoch at most this often (and after the last one, and
# whenever the run is stopped); see `Checkpointer.save_epoch`.
STATE_EVERY_S = 5.0
# The part the best and periodic models are taken from.
MODEL = "model"
# The training state's own keys beside the parts' state dicts: no part may take one of them.
BOOKKEEPING_KEYS = frozenset(
    {
        "format",
        "epoch",
        "partial_epoch",
        "best",
        "history",
        "restarts",
        "channels_last",
        "bf16",
        "config",
        "card",
        "mlkd_version",
    }
)


class Stateful(Protocol):
    """A part of a run whose state a training state holds (a module, optimiser, schedule)."""

    def state_dict(self) -> dict[str, Any]:
        """The part's state, as saved."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any:
        """Take back a saved state."""


class ModelFiles(Protocol):
    """What a task tells the checkpointer about the models it saves (`trainer.Task` is one)."""

    def plain_model(self, model: nn.Module) -> nn.Module:
        """The plain timm model inside what trains, as `<name>.pth` stores it."""

    def save_best(
        self, model: nn.Module, files: RunFiles, card: ModelCard, epoch: int, metrics: dict
    ) -> None:
        """Write whatever goes beside a new best model (may write nothing)."""


@dataclass
class Resumed:
    """What a training state gives back: where to start, and a part-done epoch if any."""

    epoch: int = 0
    best: dict[str, Any] = field(
        default_factory=lambda: {"top1": -1.0, "epoch": 0, "score": float("-inf")}
    )
    progress: loop.EpochProgress | None = None
    rng: dict[str, Any] | None = None
    restarts: list[dict[str, Any]] = field(default_factory=list)  # launcher restarts so far
    # Parts of this run the state holds none of (the run it continues had no model EMA).
    missing_parts: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        """Where the run continues, as the resume line and the restarts record say it."""
        if self.progress is not None:
            return f"in epoch {self.epoch + 1} after batch {self.progress.batches_done}"
        return f"after epoch {self.epoch}" if self.epoch else "the start"


def read_training_state(plan: RunPlan, ctx: DistContext) -> dict[str, Any] | None:
    """The training state this run continues (`--resume`, or a launcher restart), if any."""
    last = plan.files.last
    continuing = (plan.config.resume or ctx.restart > 0) and last.is_file()
    return load_checkpoint(last) if continuing else None


def earlier_layout(state: dict[str, Any] | None) -> tuple[bool, bool | None] | None:
    """(channels_last, bf16) as the training state being continued recorded them (bf16 None
    in states from before auto measured it); None: measure."""
    state = state or {}
    if state.get("channels_last") is None:
        return None
    bf16 = state.get("bf16")
    return bool(state["channels_last"]), None if bf16 is None else bool(bf16)


class Checkpointer:
    """Writes a run's files and reads its training state back into the run's parts.

    `parts` maps each key of the training state to the part whose `state_dict` it holds; the
    `MODEL` part is also what the best and periodic models are taken from.
    """

    def __init__(
        self,
        plan: RunPlan,
        task: ModelFiles,
        ctx: DistContext,
        parts: Mapping[str, Stateful],
        history: History,
        precision: Precision,
    ) -> None:
        clash = sorted(BOOKKEEPING_KEYS.intersection(parts))
        if clash or MODEL not in parts:  # a bug in the trainer, not a user's mistake
            raise ValueError(f"the parts must include {MODEL!r} and may not be named {clash}")
        self.plan, self.task, self.ctx, self.files = plan, task, ctx, plan.files
        self.parts, self.history = dict(parts), history
        # The run's arithmetic and memory format, recorded so that a resumed run reuses them.
        self.precision = precision
        self.curves_drawn = -math.inf  # when the curves were last drawn (time.monotonic)
        self.state_written = -math.inf  # when the state was last written: the first epoch writes it

    @property
    def model(self) -> nn.Module:
        """The module that trains (outside any DDP wrapper)."""
        return loop.unwrap(self.parts[MODEL])  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------ reading

    def restore(self, state: dict[str, Any] | None) -> Resumed:
        """Load `state` (None: a fresh run) into the parts and the history; record a launcher
        restart in the history's run information."""
        resumed = Resumed() if state is None else self._load(state)
        restarts = list(resumed.restarts)
        if self.ctx.restart > 0:
            restarts.append({"restart": self.ctx.restart, "resumed_from": resumed.where})
        self.history.run_info["restarts"] = restarts
        return resumed

    def _load(self, state: dict[str, Any]) -> Resumed:
        missing = [name for name in self.parts if name not in state]
        if MODEL in missing:  # every training state has the model: this is no such state
            raise UserError(f"{self.files.last} holds no model weights; drop --resume")
        for name, part in self.parts.items():
            if name not in missing:
                part.load_state_dict(state[name])
        for row in state["history"]:
            self.history.append(row)
        resumed = Resumed(int(state["epoch"]), dict(state["best"]))
        resumed.missing_parts = missing
        resumed.restarts = list(state.get("restarts", []))
        partial = state.get("partial_epoch")
        if partial is not None:
            saved_by = len(partial["progress"])
            if saved_by != self.ctx.world_size:
                raise UserError(
                    f"{self.files.last} was saved part-way through an epoch by {saved_by} "
                    f"processes, not {self.ctx.world_size}; resume with that many (--world-size "
                    f"{saved_by})"
                )
            resumed.progress = loop.EpochProgress(**partial["progress"][self.ctx.rank])
            resumed.rng = partial["rng"][self.ctx.rank]
        return resumed

    # ------------------------------------------------------------------------------ writing

    def _part_states(self) -> dict[str, Any]:
        states = {}
        for name, part in self.parts.items():
            if isinstance(part, nn.Module):  # weights are saved on the CPU, outside DDP
                part = loop.unwrap(part)
                states[name] = {k: v.detach().cpu() for k, v in part.state_dict().items()}
            else:
                states[name] = part.state_dict()
        return states

    def _write_state(self, epoch: int, best: dict[str, Any], partial: dict | None) -> None:
        precision = self.precision
        atomic_save(
            {
                "format": TRAINING_STATE_FORMAT,
                **self._part_states(),
                "epoch": epoch,
                "partial_epoch": partial,
                "best": best,
                "history": self.history.rows,
                "restarts": self.history.run_info.get("restarts", []),
                "channels_last": precision.channels_last,
                "bf16": precision.bf16,
                "config": self.plan.config.to_record(),
                "card": asdict(self.plan.card),
                "mlkd_version": __version__,
            },
            self.files.last,
        )

    def save_mid_epoch(self, epoch: int, progress: loop.EpochProgress, best: dict) -> None:
        """The state part-way through `epoch` (0-based): every rank's progress and generators.

        A collective: every rank calls it at the same step.
        """
        parts = self.ctx.gather_objects((asdict(progress), rng_state(self.ctx.device)))
        if self.ctx.is_main:
            partial = {
                "world_size": self.ctx.world_size,
                "progress": [p for p, _ in parts],
                "rng": [r for _, r in parts],
            }
            self._write_state(epoch, best, partial)
        self.ctx.barrier()

    def save_epoch(
        self,
        best: dict[str, Any],
        row: dict[str, Any],
        improved: bool,
        force_state: bool = False,
        weights: nn.Module | None = None,
    ) -> None:
        """After an epoch (rank 0 only): best and periodic models, state, history, curves.

        The models saved are `weights` (the model EMA's, where they scored better; None: the
        trained model's), with `row`'s validation metrics (theirs).

        The training state is written after the last epoch, when `force_state` (the run stops
        here), and otherwise once STATE_EVERY_S have passed since it last was: writing it takes
        ~50 ms, as long as a small model's whole epoch on a small dataset. A run killed without
        warning loses at most the epoch in progress and STATE_EVERY_S of epochs before it.
        """
        cfg, files, card = self.plan.config, self.files, self.plan.card
        model = self.model if weights is None else weights
        plain = self.task.plain_model(model)
        metrics = {k: float(v) for k, v in row.items() if k.startswith(("val_", "exit"))}
        if improved:
            save_model(files.best, plain, card, row["epoch"], metrics)
            self.task.save_best(model, files, card, row["epoch"], metrics)
        if cfg.save_frequency and row["epoch"] % cfg.save_frequency == 0:
            save_model(files.periodic(row["epoch"]), plain, card, row["epoch"], metrics)
        now = time.monotonic()
        final = row["epoch"] == cfg.epochs
        if final or force_state or now - self.state_written >= STATE_EVERY_S:
            self._write_state(row["epoch"], best, None)
            self.state_written = now
        self.history.save()
        # Drawing takes ~0.2 s: every epoch of a small model's run would spend as long drawing
        # as training. The history files are written every epoch; the figure at the end and at
        # most every CURVES_EVERY_S in between.
        if final or now - self.curves_drawn >= CURVES_EVERY_S:
            training_curves_png(
                self.history.rows, f"{files.name} ({card.arch}, {self.plan.kind})", files.curves
            )
            self.curves_drawn = now

    def written(self) -> dict[str, Any]:
        """The run's files, as the summary names them."""
        files = self.files
        return {
            "best": str(files.best),
            "last": str(files.last),
            "history_json": str(files.history_json),
            "history_csv": str(files.history_csv),
            "curves": str(files.curves),
            # Every N epochs (--save-frequency): the plain model as it was then, as found on
            # disk (a resumed run may have saved at another frequency before).
            "periodic": [
                str(files.periodic(row["epoch"]))
                for row in self.history.rows
                if files.periodic(row["epoch"]).is_file()
            ],
        }


def diverged_message(files: RunFiles, epoch: int, batch: int) -> str:
    """The line for a loss gone NaN/infinite in `epoch` (0-based): which saved state to go
    back to, if one is."""
    where = f"the loss became NaN/infinite in epoch {epoch + 1} (by batch {batch})"
    if epoch == 0 or not files.last.is_file():
        return f"{where}, before any training state was saved; lower --lr or pass --skip-nonfinite"
    return (
        f"{where}; the last good training state is {files.last} (epoch {epoch}): "
        "rerun with --resume and a lower --lr, or pass --skip-nonfinite"
    )
