"""Planning a training run, in the launching process before any worker: where its files go,
the image config and model card derived from the data, which data pipeline runs, and the checks
that refuse a run before it starts (output files, image config). Every training command uses
these."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlkd_cli.core.atomic import check_not_running, check_writable
from mlkd_cli.core.checkpoint import (
    TRAINING_STATE_FORMAT,
    ModelCard,
    load_checkpoint,
)
from mlkd_cli.core.console import Reporter
from mlkd_cli.core.errors import UserError
from mlkd_cli.core.safeload import shown
from mlkd_cli.data.device import device_unsupported
from mlkd_cli.data.memory import why_not_held
from mlkd_cli.data.registry import (
    HOLDOUT_SEED,
    DataSplits,
    augmentation_defaults,
    get_dataset_spec,
    labelled_positions,
)
from mlkd_cli.data.sources import ArraySource
from mlkd_cli.data.transforms import ImageConfig, build_train_transform
from mlkd_cli.data.views import ViewReplay
from mlkd_cli.engine.config import TrainConfig
from mlkd_cli.engine.launch import launcher_rank
from mlkd_cli.engine.provenance import run_provenance


@dataclass(frozen=True)
class RunFiles:
    """Where a run named `name` writes, all inside the output folder."""

    output_dir: Path
    name: str

    def __post_init__(self) -> None:
        check_run_name(self.name)

    @property
    def what(self) -> str:
        """The run as an error line names it."""
        return f"run {self.name!r} in {shown(self.output_dir)}"

    @property
    def lock(self) -> Path:
        """Held while the run goes (pid, host, start time), so that a second is refused."""
        return self.output_dir / f"{self.name}.lock"

    @property
    def best(self) -> Path:
        """The best model by validation top-1 (a plain timm checkpoint)."""
        return self.output_dir / f"{self.name}.pth"

    @property
    def last(self) -> Path:
        """The full training state, for --resume."""
        return self.output_dir / f"{self.name}_last.pth"

    @property
    def exits(self) -> Path:
        """A distilled student with its exits, beside the best model (anytime inference)."""
        return self.output_dir / f"{self.name}_exits.pth"

    def periodic(self, epoch: int) -> Path:
        """The plain model as it was after `epoch` (with --save-frequency)."""
        return self.output_dir / f"{self.name}_e{epoch}.pth"

    @property
    def history_json(self) -> Path:
        """Per-epoch metrics as JSON."""
        return self.output_dir / f"{self.name}_history.json"

    @property
    def history_csv(self) -> Path:
        """Per-epoch metrics as CSV."""
        return self.output_dir / f"{self.name}_history.csv"

    @property
    def curves(self) -> Path:
        """Loss and validation top-1 per epoch, drawn."""
        return self.output_dir / f"{self.name}_curves.png"


# Longer names make file names (<name>_history.json, ...) that some filesystems refuse.
MAX_NAME_CHARS = 200


def check_run_name(name: str) -> None:
    """A run's name becomes its file names in --output-dir: a plain file name, so that every
    file stays inside that folder."""
    if name in ("", ".", "..") or any(c in name for c in ("/", "\\", "\0")):
        raise UserError(
            f"--name {shown(repr(name))} is not a plain file name (no /, \\ or .., not empty); "
            "a run's files go into --output-dir: choose the folder there"
        )
    if len(name) > MAX_NAME_CHARS:
        raise UserError(
            f"--name {shown(name)} is {len(name)} characters long; use at most {MAX_NAME_CHARS}"
        )
    if not name.isprintable():
        raise UserError(f"--name {shown(repr(name))} holds control characters; choose another")


@dataclass(frozen=True)
class RunPlan:
    """A checked run: the config plus what was derived from the data, sent to every worker."""

    config: TrainConfig
    card: ModelCard
    image_config: ImageConfig
    files: RunFiles
    kind: str  # "teacher" or "student": what the history files say the run made
    # Under a label budget, the positions in the training split whose labels the run may use
    # (None: every label). A task that learns from unlabelled images too (distillation) trains
    # on the whole split; any other trains on these images alone.
    labelled: tuple[int, ...] | None = None
    learns_from_unlabelled: bool = False
    # Distilling from a soft-label store: the stored views the pipeline replays (None: drawn).
    view_replay: ViewReplay | None = None

    def training_positions(self, total: int) -> list[int]:
        """The positions in the training split this run trains on."""
        if self.labelled is None or self.learns_from_unlabelled:
            return list(range(total))
        return list(self.labelled)


def make_card(
    cfg: TrainConfig,
    arch: str,
    splits: DataSplits,
    image_config: ImageConfig,
    teacher: dict[str, Any] | None = None,
) -> ModelCard:
    """The model card a run's checkpoints carry, with the run's provenance (`teacher`: the
    identity of what taught it, None for a run on labels alone)."""
    extra: dict[str, Any] = {
        "val_fraction": cfg.val_fraction,
        "holdout_seed": HOLDOUT_SEED,
        "provenance": run_provenance(cfg.dataset, cfg.data_dir, splits, teacher),
    }
    if get_dataset_spec(cfg.dataset).reads_files:
        # eval and export --int8 read this folder when --data-dir is not given.
        extra["data_dir"] = str(Path(cfg.data_dir).resolve())
    return ModelCard(
        arch=arch,
        num_classes=splits.num_classes,
        class_names=list(splits.class_names),
        dataset=cfg.dataset,
        img_size=image_config.img_size,
        crop_pct=image_config.crop_pct,
        mean=list(image_config.mean),
        std=list(image_config.std),
        interpolation=image_config.interpolation,
        extra=extra,
    )


def make_plan(
    cfg: TrainConfig,
    arch: str,
    splits: DataSplits,
    image_config: ImageConfig,
    kind: str,
    learns_from_unlabelled: bool = False,
    teacher: dict[str, Any] | None = None,
) -> RunPlan:
    """The checked plan of a run: its card and files, and under a label budget the labelled
    images (refusing a budget that leaves less than one batch to train on)."""
    labelled = None
    if cfg.label_fraction < 1.0:
        labelled = tuple(labelled_positions(splits, cfg.label_fraction))
    plan = RunPlan(
        cfg,
        make_card(cfg, arch, splits, image_config, teacher),
        image_config,
        RunFiles(cfg.output_dir, cfg.run_name),
        kind,
        labelled,
        learns_from_unlabelled,
    )
    images = len(plan.training_positions(len(splits.train_indices)))
    per_process = cfg.batch_plan(cfg.world_size).per_process
    if images // cfg.world_size < per_process:
        budget, fix = "", "lower --batch-size"
        if labelled is not None:
            budget = f" (--label-fraction {cfg.label_fraction:g})"
            fix += " or raise --label-fraction"
        raise UserError(
            f"{images} training images{budget} make less than one batch of {per_process} on "
            f"each of {cfg.world_size} process(es); {fix}"
        )
    return plan


def dataset_image_config(cfg: TrainConfig, splits: DataSplits) -> ImageConfig:
    """The run's image config: the dataset's size and augmentation, then the flags given."""
    spec = splits.spec
    default = augmentation_defaults(spec, splits.train)
    base = ImageConfig(img_size=cfg.img_size or spec.img_size, crop_pct=spec.crop_pct)
    return ImageConfig(
        img_size=base.img_size,
        crop_pct=base.crop_pct,
        interpolation=cfg.interpolation or base.interpolation,
        hflip=default.hflip if cfg.hflip is None else cfg.hflip,
        vflip=cfg.vflip,
        crop_scale=cfg.scale or default.crop_scale,
        crop_ratio=cfg.ratio or base.crop_ratio,
        color_jitter=default.color_jitter if cfg.color_jitter is None else cfg.color_jitter,
        auto_augment=cfg.auto_augment,
        reprob=cfg.reprob,
    )


def describe_augmentation(image_config: ImageConfig, cfg: TrainConfig) -> str:
    """One line: how training images are augmented (and mixed)."""
    if not cfg.augment:
        parts = ["none (--no-augment): the evaluation view"]
    else:
        low, high = image_config.crop_scale
        parts = [
            f"crop {low:g}-{high:g} of the area",
            f"hflip {image_config.hflip:g}",
            f"vflip {image_config.vflip:g}",
            f"colour jitter {image_config.color_jitter:g}",
        ]
        if image_config.auto_augment:
            parts.append(f"auto-augment {image_config.auto_augment}")
        if image_config.reprob:
            parts.append(f"random erasing {image_config.reprob:g}")
    mixing = f"Mixup {cfg.mixup_alpha:g}, CutMix {cfg.cutmix_alpha:g}"
    return f"augmentation: {', '.join(parts)}; {mixing}"


def check_image_config(image_config: ImageConfig) -> None:
    """Build the training transform once, so that a bad knob is refused before any work."""
    try:
        build_train_transform(image_config)
    except Exception as exc:  # timm raises assorted errors for a spec it cannot parse
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"timm cannot build this augmentation ({detail}); check --auto-augment (e.g. "
            "rand-m9-mstd0.5, augmix-m5, v0) and --interpolation (bicubic, bilinear, random)"
        ) from None


def check_output_files(cfg: TrainConfig, files: RunFiles, identity: tuple[str, ...]) -> None:
    """Refuse to overwrite a run by accident, or to resume one that is absent or different.

    `identity` names the settings a resumed run must share with the one it continues.
    """
    check_writable(files.output_dir)
    # Under torchrun every rank plans, and rank 0 may hold the lock already: only it looks.
    if launcher_rank() == 0:
        check_not_running(files.lock, files.what)
    if cfg.resume:
        if not files.last.is_file():
            raise UserError(
                f"nothing to resume: {files.last} does not exist; drop --resume to start the run"
            )
        state = load_checkpoint(files.last)
        if state.get("format") != TRAINING_STATE_FORMAT:
            raise UserError(f"{files.last} is not an mlkd training state; drop --resume")
        before = state.get("config", {})
        now = cfg.to_record()
        for key in identity:
            if before.get(key) != now.get(key):
                flag = key.replace("_", "-")
                raise UserError(
                    f"{files.last} was trained with --{flag} {before.get(key)}, not "
                    f"{now.get(key)}; resume with the same --{flag} or choose another --name"
                )
        changed = [
            f"{k} {now[k]} (was {before[k]})"
            for k in sorted(now)
            if k in before and k not in ("resume", "overwrite") and before[k] != now[k]
        ]
        if changed:
            Reporter(cfg.output).warn("resuming with changed settings: " + ", ".join(changed))
        return
    existing = [p for p in (files.best, files.last, files.exits) if p.exists()]
    if existing and not cfg.overwrite:
        raise UserError(
            f"{shown(existing[0])} already exists; pass --resume to continue that run, --overwrite "
            "to replace it, or another --name"
        )


def data_pipeline(cfg: TrainConfig, splits: DataSplits, image_config: ImageConfig) -> str:
    """Which training pipeline a run uses: "device" or "cpu" (refusing what cannot work)."""
    return choose_data_pipeline(cfg, splits, image_config)[0]


def choose_data_pipeline(
    cfg: TrainConfig, splits: DataSplits, image_config: ImageConfig
) -> tuple[str, str]:
    """The training pipeline ("device" or "cpu") and why, in words for the run's line.

    The device pipeline needs the training images in memory: CIFAR and digits are; image files
    of one small size are decoded into memory first (`data.memory`).
    """
    not_held = why_not_held(splits.train, image_config.img_size, cfg.world_size)
    if cfg.data_pipeline == "device" and not_held:
        raise UserError(
            f"--data-pipeline device needs the training images in memory, and {cfg.dataset} "
            f"cannot be held: {not_held}; use --data-pipeline cpu"
        )
    missing = device_unsupported(image_config) if cfg.augment else []
    if cfg.data_pipeline == "device" and missing:
        raise UserError(
            f"the device data pipeline does not do {', '.join(missing)}; use --data-pipeline "
            "cpu (timm's transforms on loader workers) or drop them"
        )
    held = "" if isinstance(splits.train, ArraySource) else ", image files held in memory"
    if cfg.data_pipeline == "cpu":
        return "cpu", "cpu (--data-pipeline cpu)"
    if cfg.data_pipeline == "device":
        return "device", f"device (--data-pipeline device{held})"
    # In memory, one batched pass beats per-image transforms on any device: on a 2-core CPU
    # test_convnext at 32 px trained at 2,000+ img/s this way against 570 through timm's
    # per-image transforms in the main process (BENCHMARKS.md, "Small models").
    if missing:
        return "cpu", f"cpu (timm's transforms: the device pipeline lacks {missing[0]})"
    if not_held:
        return "cpu", f"cpu (timm's transforms: {not_held})"
    return "device", f"device (batched augmentation{held})"
