"""Typed run configurations, with every default in one place; presets and flags fill them in."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mlkd_cli.core.console import OutputOptions
from mlkd_cli.core.constants import MAX_IMG_SIZE
from mlkd_cli.core.errors import UserError
from mlkd_cli.core.safeload import quote
from mlkd_cli.losses.registry import FORMER_NAMES, LOSSES, loss_param_problem, loss_spec

# The checks import torch and timm when they run: a config is built (and `--help` shows its
# defaults) without them. The loss registry is torch-free.

DATA_PIPELINES = ("auto", "device", "cpu")
# What --clip-grad bounds, as timm's train.py (its third mode, agc, is not offered).
CLIP_MODES = ("norm", "value")
# Loader processes per run process: a preset's `workers: 100000` would fork that many.
MAX_WORKERS = 64


@dataclass(frozen=True)
class BatchPlan:
    """One optimiser step: `accumulation` forward passes of `per_process` images on each of
    `world_size` processes.

    `--batch-size` is the most images one process takes in a forward pass (what its memory
    holds); `--effective-batch-size` is the number of images per optimiser step over all
    processes (what the learning rate is tuned for). mlkd reaches the effective batch with the
    fewest forward passes that fit: accumulation = ceil(E / (B x W)), then the per-process batch
    is lowered to ceil(E / (W x accumulation)) so the step is not larger than it needs to be.
    When E is not a multiple of W x accumulation, the step holds the next multiple above E
    (128 on 3 processes: 3 x 43 = 129 images); `global_batch` says how many, and the run prints it.
    """

    per_process: int
    accumulation: int
    world_size: int

    @property
    def global_batch(self) -> int:
        """Images per optimiser step over all processes."""
        return self.per_process * self.accumulation * self.world_size

    @classmethod
    def for_target(cls, target: int, batch_size: int, world_size: int) -> BatchPlan:
        """The plan reaching `target` images per step with at most `batch_size` per pass."""
        if target < world_size:
            raise UserError(
                f"--effective-batch-size {target} is smaller than the {world_size} processes: "
                "each needs at least one image a step; raise it or lower --world-size"
            )
        accumulation = -(-target // (batch_size * world_size))
        per_process = -(-target // (world_size * accumulation))
        return cls(per_process, accumulation, world_size)


def _check_choice(flag: str, value: str, registry: dict[str, Any]) -> None:
    """`value` names an entry of `registry`."""
    if value not in registry:
        raise UserError(f"--{flag} {quote(value, 40)} is not one of {', '.join(sorted(registry))}")


def _check_at_least_one(values: dict[str, int | None]) -> None:
    """Each given count (flag -> value; None: not set) is 1 or more."""
    for flag, value in values.items():
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be at least 1, got {value}")


def _check_finite(config: Any) -> None:
    """Every number a config holds is finite (NaN compares false, so range checks miss it)."""
    for f in fields(config):
        value = getattr(config, f.name)
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(value, tuple):
            values = [(flag, v) for v in value]
        elif isinstance(value, dict):
            values = [(f"{flag.removesuffix('s')} {k}", v) for k, v in value.items()]
        else:
            values = [(flag, value)]
        for what, number in values:
            if isinstance(number, float) and not math.isfinite(number):
                raise UserError(f"{what} must be a finite number, got {number}")


def _check_not_negative(values: dict[str, float | None]) -> None:
    """Each given value (flag -> value; None: not set) is 0 or more."""
    for flag, value in values.items():
        if value is not None and value < 0:
            raise UserError(f"--{flag} must not be negative, got {value}")


@dataclass(kw_only=True)
class TrainConfig:
    """What every training run needs: data, optimisation, launch and output (defaults here)."""

    dataset: str
    name: str | None = None
    data_dir: Path = Path("data")
    download: bool = False
    val_fraction: float = 0.1
    # A label budget: only this share of each class's training images keeps its label (the same
    # images in every run). Teacher training and plain cross-entropy train on those alone;
    # distillation learns from every training image, its cross-entropy term from those.
    label_fraction: float = 1.0
    img_size: int | None = None  # None: the dataset's own size
    epochs: int = 30
    batch_size: int = 64  # per process, per forward pass
    # Images per optimiser step over all ranks; None: one forward pass per step.
    effective_batch_size: int | None = None
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # a name in loop.OPTIMIZERS
    schedule: str = "cosine"  # a name in loop.SCHEDULES: warmup + cosine, or constant
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    # timm train.py's knobs: stochastic depth (timm's drop_path_rate; None: the architecture's
    # own), gradient clipping before each optimiser step, and an EMA of the weights (timm's
    # ModelEmaV3) validated beside them, the better of the two saved.
    drop_path: float | None = None
    clip_grad: float | None = None  # None: no clipping
    clip_mode: str = "norm"  # a name in CLIP_MODES
    model_ema: bool = False
    model_ema_decay: float = 0.9998  # timm's default
    model_ema_warmup: bool = False
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    save_frequency: int = 0  # also keep <name>_e<N>.pth every N epochs; 0: never
    skip_nonfinite: bool = False  # skip steps with a NaN/inf loss instead of stopping
    save_every_steps: int = 0  # also write the training state every N optimiser steps; 0: never
    strict_data: bool = False  # stop at an unreadable image instead of leaving it out
    # Where training images are augmented: "device" (in-memory datasets: held and augmented on
    # the run's device), "cpu" (DataLoader workers), or "auto" (device where possible).
    data_pipeline: str = "auto"
    augment: bool = True  # random crop, flip and colour jitter; off: the evaluation view
    # How training images are augmented, in timm's terms; None: the dataset's default (small or
    # grayscale images get no flip, a mild crop and no colour jitter; photos ImageNet's).
    scale: tuple[float, float] | None = None  # random resized crop: share of the area
    ratio: tuple[float, float] | None = None  # ... and aspect ratio (default 3/4 to 4/3)
    hflip: float | None = None  # horizontal flip probability
    vflip: float = 0.0  # vertical flip probability
    color_jitter: float | None = None  # brightness/contrast/saturation strength
    auto_augment: str | None = None  # timm's RandAugment/AutoAugment, e.g. rand-m9-mstd0.5
    reprob: float = 0.0  # random erasing probability
    interpolation: str | None = None  # None: bicubic
    compile: bool = False  # torch.compile the models that run each step
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower; the original's)
    seed: int = 0
    # Metric loggers fed the history's rows, comma-separated (see engine/loggers.py).
    log_to: str | None = None
    world_size: int = 1
    # Restarts of the worker processes after one dies, each from the last saved state.
    max_restarts: int = 0
    device: str = "auto"
    # bf16 autocast where the device has it natively ("auto"), or always ("bf16"), or "fp32".
    precision: str = "auto"
    workers: int | None = None
    output_dir: Path = Path("models")
    resume: bool = False
    overwrite: bool = False
    output: OutputOptions = field(default_factory=OutputOptions)

    @property
    def run_name(self) -> str:
        """The name the run's files carry: `--name`, or a default of the run's kind."""
        from mlkd_cli.data.registry import run_label  # here: data/ loads torch, help must not

        return self.name or run_label(self.dataset)

    def batch_plan(self, world_size: int) -> BatchPlan:
        """How each optimiser step is made up at this world size (see `BatchPlan`)."""
        if self.effective_batch_size is None:
            return BatchPlan(self.batch_size, 1, world_size)
        return BatchPlan.for_target(self.effective_batch_size, self.batch_size, world_size)

    def accumulation_steps(self, world_size: int) -> int:
        """Forward passes per optimiser step at this world size."""
        return self.batch_plan(world_size).accumulation

    def validate(self) -> None:
        """Refuse impossible values before any work starts."""
        from mlkd_cli.engine.launch import resolve_device
        from mlkd_cli.engine.loggers import parse_log_to
        from mlkd_cli.engine.loop import OPTIMIZERS, SCHEDULES
        from mlkd_cli.engine.precision import check_precision

        _check_finite(self)
        counts = {"epochs": self.epochs, "batch-size": self.batch_size}
        counts["world-size"] = self.world_size
        counts["effective-batch-size"] = self.effective_batch_size
        counts["img-size"] = self.img_size
        _check_at_least_one(counts)
        for flag, value, most in (
            ("img-size", self.img_size, MAX_IMG_SIZE),
            ("workers", self.workers, MAX_WORKERS),
        ):
            if value is not None and value > most:
                raise UserError(f"--{flag} is at most {most}, got {value}")
        parse_log_to(self.log_to)
        check_precision(self.precision, resolve_device(self.device))
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        _check_not_negative(
            {
                "max-restarts": self.max_restarts,
                "weight-decay": self.weight_decay,
                "warmup-epochs": self.warmup_epochs,
                "mixup-alpha": self.mixup_alpha,
                "cutmix-alpha": self.cutmix_alpha,
                "save-frequency": self.save_frequency,
                "save-every-steps": self.save_every_steps,
                "workers": self.workers,
            }
        )
        if not 0 < self.label_fraction <= 1:
            raise UserError(f"--label-fraction must be in (0, 1], got {self.label_fraction}")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        if self.data_pipeline not in DATA_PIPELINES:
            raise UserError(
                f"--data-pipeline must be one of {', '.join(DATA_PIPELINES)}, "
                f"not {quote(self.data_pipeline, 40)}"
            )
        self._check_augmentation()
        self._check_knobs()
        if (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.batch_size < 2:
            raise UserError("Mixup/CutMix mixes pairs of images: use --batch-size 2 or more")
        if self.resume and self.overwrite:
            raise UserError("--resume continues a run and --overwrite replaces it; pass one")
        self.batch_plan(self.world_size)

    def _check_knobs(self) -> None:
        """Drop-path, gradient clipping and the EMA, as timm's train.py takes them."""
        if self.drop_path is not None and not 0 <= self.drop_path < 1:
            raise UserError(
                f"--drop-path is the share of residual branches dropped and must be in [0, 1), "
                f"got {self.drop_path}"
            )
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise UserError(
                f"--clip-grad is the most a gradient's norm (or value) may be and must be "
                f"positive, got {self.clip_grad}; leave it out not to clip"
            )
        if self.clip_mode not in CLIP_MODES:
            why = " (timm's adaptive clipping is not offered)" if self.clip_mode == "agc" else ""
            raise UserError(
                f"--clip-mode must be norm or value, not {quote(self.clip_mode, 40)}{why}"
            )
        if not 0 < self.model_ema_decay < 1:
            raise UserError(
                f"--model-ema-decay is the share of the average kept each step and must be in "
                f"(0, 1), got {self.model_ema_decay}"
            )

    def _check_augmentation(self) -> None:
        for flag, value in {
            "hflip": self.hflip,
            "vflip": self.vflip,
            "reprob": self.reprob,
        }.items():
            if value is not None and not 0 <= value <= 1:
                raise UserError(f"--{flag} is a probability and must be in [0, 1], got {value}")
        if self.scale is not None and not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise UserError(
                f"--scale MIN MAX are shares of the image area with 0 < MIN <= MAX <= 1, "
                f"got {self.scale[0]:g} {self.scale[1]:g}"
            )
        if self.ratio is not None and not 0 < self.ratio[0] <= self.ratio[1]:
            raise UserError(
                f"--ratio MIN MAX are aspect ratios with 0 < MIN <= MAX, "
                f"got {self.ratio[0]:g} {self.ratio[1]:g}"
            )
        _check_not_negative({"color-jitter": self.color_jitter})

    def source_of(self, key: str) -> str:
        """Where a setting's value came from, as the run's first line words it."""
        return f"--{key.replace('_', '-')} {getattr(self, key)}"

    def to_record(self) -> dict[str, Any]:
        """Plain values for history files and checkpoints (paths as strings)."""
        record = asdict(self)
        for f in fields(self):  # the console, and bookkeeping that is not a setting
            if f.name == "output" or f.metadata.get("internal"):
                record.pop(f.name)
        return {k: str(v) if isinstance(v, Path) else v for k, v in record.items()}


@dataclass(kw_only=True)
class TeacherTrainConfig(TrainConfig):
    """`mlkd teacher train`: one timm model fine-tuned with cross-entropy."""

    model: str
    pretrained: bool = False
    init_checkpoint: Path | None = None
    init_ema: bool = True  # --init-checkpoint from timm's train.py: its EMA weights when present

    @property
    def run_name(self) -> str:
        """`--name`, or `<dataset>_<model>`."""
        from mlkd_cli.data.registry import run_label

        return self.name or f"{run_label(self.dataset)}_{self.model}"


# The original project's distillation recipe.
ORIGINAL_EFFECTIVE_BATCH = 128
# Mixup/CutMix pay off over long schedules only; shorter runs of the mlkd recipe go without.
MIXUP_MIN_EPOCHS = 100

# What each `--recipe` sets for the settings the user leaves out (a flag or preset key wins).
RECIPES: dict[str, dict[str, Any]] = {
    # mlkd's defaults: never worse than cross-entropy training of the same student on the data
    # a user brings (BENCHMARKS.md, "Your own data").
    "mlkd": {
        "temperature": 4.0,
        "alpha": 0.9,
        "label_smoothing": 0.0,
        "schedule": "cosine",
        "warmup_epochs": 1.0,
        "optimizer": "adamw",
        "loss": "kd",
        "exit_head": "original",
        "best_by": "top1",
        "seed": 0,
        "precision": "auto",
        "deterministic": False,
        "step_per_process": False,
        "epochs": 100,
        "save_frequency": 50,
    },
    # The original project's mlkd.py, setting for setting (README, "The original's recipe").
    "original": {
        "temperature": 10.0,
        "alpha": 1.0,
        "mixup_alpha": 1.0,
        "cutmix_alpha": 1.0,
        "schedule": "constant",
        "warmup_epochs": 0.0,
        "optimizer": "adamw_all",
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "loss": "original",
        "exit_head": "original",
        "best_by": "val_kd_loss",
        "seed": 53303,
        "precision": "fp32",
        "deterministic": True,
        "step_per_process": True,
        "epochs": 1000,
        "save_frequency": 50,
        "batch_size": 64,
        "hflip": 0.5,
        "scale": (0.08, 1.0),
        "color_jitter": 0.4,
    },
}


@dataclass(kw_only=True)
class DistillConfig(TrainConfig):
    """`mlkd distill`: a multi-exit student learning from a teacher's softened outputs.

    Settings left as None are filled from `--recipe` (`RECIPES`): mlkd's defaults, or the
    original's training, setting for setting.
    """

    recipe: str = "mlkd"

    student: str = "resnetv2_50x1_bit"
    student_checkpoint: Path | None = None
    pretrained: bool = False
    teacher_model: str | None = None
    teacher_checkpoint: Path | None = None
    ensemble: Path | None = None
    # Take the EMA weights of teachers saved by timm's train.py (state_dict_ema) when present.
    teacher_ema: bool = True
    # The input size teachers run at (None: what each checkpoint records; one that records
    # none is fed what the student sees).
    teacher_img_size: int | None = None
    models_dir: Path | None = None
    exits: str | None = None  # comma-separated stage indices; None: every stage but the last
    exit_weights: str | None = None  # comma-separated; None: 1 for each exit
    exit_head: str | None = None  # a name in models.student.EXIT_HEADS; None: the recipe's
    alpha: float | None = None
    temperature: float | None = None
    name: str | None = "mlkd_student"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    label_smoothing: float | None = None  # in Mixup's targets, for the CE term
    mixup_alpha: float | None = None
    cutmix_alpha: float | None = None
    schedule: str | None = None
    warmup_epochs: float | None = None
    optimizer: str | None = None
    seed: int | None = None
    precision: str | None = None
    deterministic: bool | None = None
    save_frequency: int | None = None
    # "top1": keep the best validation top-1; "val_kd_loss": the lowest validation KD loss of the
    # final head (the original's choice).
    best_by: str | None = None
    # The original accumulated 128 images per process per step, whatever the world size.
    step_per_process: bool | None = None
    # Compute the teacher's outputs once, before training, and reuse them every epoch; needs a
    # fixed teacher input (--no-augment, no Mixup/CutMix).
    teacher_cache: bool = False
    loss: str | None = None  # a name in losses.LOSSES
    # The loss's own parameters by name (`--loss-param NAME=VALUE`); None: its defaults.
    loss_params: dict[str, float] | None = None
    # A soft-label store (`mlkd teacher label`): no teacher runs; each image replays a stored view.
    soft_labels: Path | None = None
    # The settings `__post_init__` filled from the recipe (not the user's): for `source_of`.
    recipe_filled: tuple[str, ...] = field(default=(), repr=False, metadata={"internal": True})

    def __post_init__(self) -> None:
        """Fill the settings left out from the recipe."""
        if self.recipe not in RECIPES:
            return  # `validate` names the choices
        filled = set(self.recipe_filled)  # kept by dataclasses.replace, whose values are all set
        for key, value in recipe_values(self.recipe, self).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
                filled.add(key)
        self.recipe_filled = tuple(sorted(filled))

    def source_of(self, key: str) -> str:
        """`--recipe NAME` for a setting the recipe filled, else the flag that set it."""
        return f"--recipe {self.recipe}" if key in self.recipe_filled else super().source_of(key)

    def batch_plan(self, world_size: int) -> BatchPlan:
        """One forward pass of --batch-size per process a step (mlkd's recipe, as teacher
        training: short runs get as many optimiser steps as plain training would), or
        --effective-batch-size; the original's recipe accumulates 128 images on each process.
        """
        if self.step_per_process:  # the original: 128 a step on each process
            return BatchPlan(
                self.batch_size, max(1, ORIGINAL_EFFECTIVE_BATCH // self.batch_size), world_size
            )
        return super().batch_plan(world_size)

    def _check_soft_labels(self) -> None:
        """What a run from a soft-label store cannot do (it has no teacher to run)."""
        if self.ensemble is not None or self.teacher_model or self.teacher_checkpoint:
            raise UserError(
                "--soft-labels replaces the teacher: drop --ensemble / --model / --checkpoint"
            )
        refused = {
            "--teacher-cache": self.teacher_cache,
            f"--loss {self.loss} (it needs the teacher's features)": loss_spec(
                self.loss
            ).has_features(),
            "--best-by val_kd_loss (the store holds training images only)": (
                self.best_by == "val_kd_loss"
            ),
        }
        for what, present in refused.items():
            if present:
                raise UserError(f"--soft-labels cannot be used with {what}")

    def _check_teacher(self) -> None:
        """How the teacher is named, and the input size it is given."""
        if self.ensemble is not None and (self.teacher_model or self.teacher_checkpoint):
            raise UserError("name the teacher once: --ensemble, or --checkpoint (with --model)")
        if self.teacher_model is not None and self.teacher_checkpoint is None:
            raise UserError("--model names a single teacher's architecture: add --checkpoint PATH")
        if self.teacher_img_size is not None and self.soft_labels is not None:
            raise UserError(
                "--soft-labels replays outputs the store's teacher already made: drop "
                "--teacher-img-size (label a store with it instead)"
            )
        if self.teacher_img_size is not None and not 8 <= self.teacher_img_size <= MAX_IMG_SIZE:
            raise UserError(
                f"--teacher-img-size must be between 8 and {MAX_IMG_SIZE} pixels, got "
                f"{self.teacher_img_size}"
            )

    def validate(self) -> None:
        """Refuse impossible values before any work starts."""
        from mlkd_cli.models.student import EXIT_HEADS

        _check_choice("recipe", self.recipe, RECIPES)
        super().validate()
        if self.best_by not in ("top1", "val_kd_loss"):
            raise UserError(f"best_by must be top1 or val_kd_loss, not {quote(self.best_by, 40)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(
                f"--alpha mixes KD and cross-entropy and must be in [0, 1], got {self.alpha}"
            )
        if self.loss not in FORMER_NAMES:
            _check_choice("loss", self.loss, LOSSES)
        _check_choice("exit-head", self.exit_head, EXIT_HEADS)
        problem = loss_param_problem(self.loss, self.loss_params or {})
        if problem:
            raise UserError(problem)
        if loss_spec(self.loss).adds_to_ce() and "alpha" not in self.recipe_filled:
            raise UserError(
                f"--alpha mixes kd with cross-entropy; --loss {self.loss} adds its terms to "
                "cross-entropy as its paper does: drop --alpha and set --loss-param "
                "ce_weight=W (default 1) instead"
            )
        if self.temperature <= 0:
            raise UserError(f"--temperature must be positive, got {self.temperature}")
        if self.pretrained and self.student_checkpoint is not None:
            raise UserError(
                "--pretrained and --student-checkpoint both give initial weights; pass one"
            )
        self._check_teacher()
        if self.teacher_cache and (self.augment or self.mixup_alpha > 0 or self.cutmix_alpha > 0):
            raise UserError(
                "--teacher-cache reuses the teacher's outputs, so its input must not change "
                "between epochs: add --no-augment --mixup-alpha 0 --cutmix-alpha 0"
            )
        if self.soft_labels is not None:
            self._check_soft_labels()


def recipe_values(recipe: str, config: DistillConfig) -> dict[str, Any]:
    """The recipe's settings, completed with those that depend on the others."""
    values = dict(RECIPES[recipe])
    epochs = config.epochs if config.epochs is not None else values["epochs"]
    if recipe == "mlkd":
        mixing = epochs >= MIXUP_MIN_EPOCHS
        values["mixup_alpha"] = 0.8 if mixing else 0.0
        values["cutmix_alpha"] = 1.0 if mixing else 0.0
    if recipe == "original":
        # timm's Mixup smooths its targets by 0.1; without Mixup the original used hard labels.
        mixup = config.mixup_alpha if config.mixup_alpha is not None else values["mixup_alpha"]
        cutmix = config.cutmix_alpha if config.cutmix_alpha is not None else values["cutmix_alpha"]
        values["label_smoothing"] = 0.1 if mixup > 0 or cutmix > 0 else 0.0
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    # Settings the recipe leaves alone take TrainConfig's defaults.
    for key in ("batch_size", "lr", "weight_decay"):
        values.setdefault(key, defaults[key])
    return values
