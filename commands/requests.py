"""Typed requests: a command's flags as the fields of one dataclass, handed to it whole.

A command declares each flag once, as a field of its request whose type is an `Annotated` Typer
option (shared ones from `options.py`); `takes(Request)` makes those fields the command's Typer
signature and calls the command with the filled request. The flag groups several commands take
(`RunFlags`, `RestartFlags`, `OutputFlags`, `TrainingFlags`) are dataclasses the requests inherit.
A training request turns itself into its run's config with `config()`: every field is a config
setting of the same name unless listed in `COMMAND_ONLY`, so adding a setting takes its config
field and one field here. timm train.py's names for settings (`--opt`, ...) are hidden fields
of their own, merged into their setting by `settings()` (`TIMM_ALIASES`). May import typer,
core/, the config dataclasses and presets.py; never torch or the engine's runtime.
"""

from __future__ import annotations

import copy
import functools
import inspect
import typing
from collections.abc import Callable, Collection
from dataclasses import MISSING, Field, dataclass, fields
from enum import Enum
from typing import Any, ClassVar, TypeVar

from typer.models import ParameterInfo

from mlkd_cli.core.console import OutputOptions
from mlkd_cli.core.errors import UserError
from mlkd_cli.core.workers import prepare_workers
from mlkd_cli.presets import settings_config

from . import options as opt

# timm train.py's names for settings mlkd names otherwise (`--opt` for `--optimizer`, ...): the
# request field of each hidden timm flag -> (its flag, the setting it gives). Each means what
# mlkd's flag means, which is what timm's does (timm's train.py, read for each).
TIMM_ALIASES: dict[str, tuple[str, str]] = {
    "timm_opt": ("--opt", "optimizer"),
    "timm_sched": ("--sched", "schedule"),
    "timm_smoothing": ("--smoothing", "label_smoothing"),
    "timm_mixup": ("--mixup", "mixup_alpha"),
    "timm_cutmix": ("--cutmix", "cutmix_alpha"),
    "timm_aa": ("--aa", "auto_augment"),
}

R = TypeVar("R")
Q = TypeVar("Q")


# --------------------------------------------------------------------------------- flag groups


@dataclass(kw_only=True)
class RunFlags:
    """Where and how processes run: every command that runs models takes these."""

    world_size: opt.WorldSize = None
    device: opt.Device = None
    precision: opt.Precision = None
    workers: opt.Workers = None


@dataclass(kw_only=True)
class RestartFlags:
    """How often dead workers are restarted: every command that trains takes this."""

    max_restarts: opt.MaxRestarts = None


@dataclass(kw_only=True)
class OutputFlags:
    """How results are shown: every command that reports takes these."""

    quiet: opt.Quiet = False
    json: opt.Json = False

    @property
    def output_options(self) -> OutputOptions:
        """--quiet / --json, as the reporter takes them."""
        return OutputOptions(quiet=self.quiet, json=self.json)


@dataclass(kw_only=True)
class TrainingFlags(OutputFlags, RestartFlags, RunFlags):
    """The flags `teacher train` and `distill` share (`study` and `teacher label` take some).

    Within a panel they are listed in this order, the ones most often changed first.
    """

    # The config whose class the request builds and whose defaults `--help` shows, and the
    # preset section it reads.
    DEFAULTS: ClassVar[Any]
    SECTION: ClassVar[str]
    # Fields the command uses itself: they are not settings of its config.
    COMMAND_ONLY: ClassVar[frozenset[str]] = frozenset()
    # Where the settings come from and what happens to the run's files, not settings themselves.
    NOT_SETTINGS: ClassVar[frozenset[str]] = frozenset(
        {"preset", "resume", "overwrite", "quiet", "json", *TIMM_ALIASES}
    )

    data_dir: opt.DataDir = None
    img_size: opt.ImgSize = None
    val_fraction: opt.ValFraction = None
    label_fraction: opt.LabelFraction = None
    download: opt.Download = None
    epochs: opt.Epochs = None
    batch_size: opt.BatchSize = None
    effective_batch_size: opt.EffectiveBatchSize = None
    lr: opt.Lr = None
    weight_decay: opt.WeightDecay = None
    warmup_epochs: opt.WarmupEpochs = None
    optimizer: opt.Optimizer = None
    schedule: opt.Schedule = None
    timm_opt: opt.TimmOpt = None
    timm_sched: opt.TimmSched = None
    timm_smoothing: opt.TimmSmoothing = None
    timm_mixup: opt.TimmMixup = None
    timm_cutmix: opt.TimmCutmix = None
    timm_aa: opt.TimmAa = None
    drop_path: opt.DropPath = None
    clip_grad: opt.ClipGrad = None
    clip_mode: opt.ClipMode = None
    model_ema: opt.ModelEma = None
    model_ema_decay: opt.ModelEmaDecay = None
    model_ema_warmup: opt.ModelEmaWarmup = None
    label_smoothing: opt.LabelSmoothing = None
    augment: opt.Augment = None
    mixup_alpha: opt.MixupAlpha = None
    cutmix_alpha: opt.CutmixAlpha = None
    scale: opt.Scale = None
    ratio: opt.Ratio = None
    hflip: opt.Hflip = None
    vflip: opt.Vflip = None
    color_jitter: opt.ColorJitter = None
    auto_augment: opt.AutoAugment = None
    reprob: opt.Reprob = None
    interpolation: opt.Interpolation = None
    data_pipeline: opt.DataPipeline = None
    compile: opt.Compile = None
    preset: opt.Preset = None
    output_dir: opt.OutputDir = None
    resume: opt.Resume = False
    overwrite: opt.Overwrite = False
    seed: opt.Seed = None
    save_frequency: opt.SaveFrequency = None
    save_every_steps: opt.SaveEverySteps = None
    skip_nonfinite: opt.SkipNonfinite = None
    strict_data: opt.StrictData = None
    log_to: opt.LogTo = None

    @classmethod
    def setting_names(cls) -> set[str]:
        """The fields that are settings of the config (all but the command's own)."""
        return flag_names(cls) - cls.COMMAND_ONLY - cls.NOT_SETTINGS

    def settings(self) -> dict[str, Any]:
        """The settings the user gave on the command line (a flag left out is None)."""
        values = {name: getattr(self, name) for name in self.setting_names()}
        given = {name: value for name, value in values.items() if value is not None}
        for field_name, (flag, setting) in TIMM_ALIASES.items():
            value = getattr(self, field_name, None)
            if value is None:
                continue
            if given.get(setting, value) != value:
                mlkd_flag = "--" + setting.replace("_", "-")
                raise UserError(f"{flag} is timm's name for {mlkd_flag}: give one of them")
            given[setting] = value
        return given

    def config(self, **computed: Any) -> Any:
        """The run's config: class defaults, then the preset's section, then every flag given.

        `computed` holds settings the command derives from its own flags (None: not given).
        """
        flags = {**self.settings(), **{k: v for k, v in computed.items() if v is not None}}
        flags.update(resume=self.resume, overwrite=self.overwrite, output=self.output_options)
        return settings_config(type(self.DEFAULTS), self.SECTION, self.preset, flags)


def flag_names(cls: type) -> set[str]:
    """The flags (field names) of a request class or flag group."""
    return {f.name for f in fields(cls)}


# ------------------------------------------------------------------- the request as a command


def panel_of(annotation: Any) -> str | None:
    """The `--help` panel an annotation declares (None: an argument, or Typer's default)."""
    for info in getattr(annotation, "__metadata__", ()):
        if isinstance(info, ParameterInfo):
            return info.rich_help_panel
    return None


def _panel_rank(name: str, annotation: Any) -> int:
    panel = panel_of(annotation)
    if panel is None:
        return -1  # Typer shows arguments and its default panel first
    if panel not in opt.PANELS:
        raise ValueError(f"--help panel {panel!r} of {name} is not in options.PANELS")
    return opt.PANELS.index(panel)


def _with_defaults(name: str, annotation: Any, defaults: Any) -> Any:
    """The annotation with `{setting}` in its help filled from the config `defaults`."""
    metadata = getattr(annotation, "__metadata__", ())
    info = next((m for m in metadata if isinstance(m, ParameterInfo)), None)
    if info is None or not info.help or "{" not in info.help:
        return annotation
    if defaults is None:
        raise TypeError(f"the help of {name} shows a default: its request needs DEFAULTS")
    filled = copy.copy(info)
    filled.help = info.help.format_map(vars(defaults))
    return typing.Annotated[annotation.__origin__, filled]


def _parameter(f: Field, annotation: Any) -> inspect.Parameter:
    # Keyword-only, so that the sort may put a parameter without a default after one with a
    # default; the request is filled by name.
    default = inspect.Parameter.empty if f.default is MISSING else f.default
    kind = inspect.Parameter.KEYWORD_ONLY
    return inspect.Parameter(f.name, kind, annotation=annotation, default=default)


def _plain(value: Any) -> Any:
    """An Enum choice as its string (what configs and the engine take); anything else as is."""
    return value.value if isinstance(value, Enum) else value


def takes(
    request: type[Q], *, without: Collection[str] = ()
) -> Callable[[Callable[[Q], R]], Callable[..., R]]:
    """Make the fields of `request` the flags of the command, which receives the filled request.

    Typer reads a command's flags from its signature, so the signature is built from the
    fields: panel by panel in `options.PANELS` order, and within a panel the request's own
    fields first, then the inherited groups' in field order. `without` names inherited flags
    the command does not take (they keep their defaults). Choices arrive as plain strings.
    """
    hints = typing.get_type_hints(request, include_extras=True)
    unknown = set(without) - flag_names(request)
    if unknown:
        raise ValueError(f"{request.__name__} has no flags {sorted(unknown)}")
    own = set(vars(request).get("__annotations__", {}))
    defaults = getattr(request, "DEFAULTS", None)
    ranked = []
    for index, f in enumerate(fields(request)):
        if f.name in without:
            continue
        annotation = _with_defaults(f.name, hints[f.name], defaults)
        rank = (_panel_rank(f.name, annotation), f.name not in own, index)
        ranked.append((rank, _parameter(f, annotation)))
    parameters = [parameter for _, parameter in sorted(ranked, key=lambda item: item[0])]

    def decorate(command: Callable[[Q], R]) -> Callable[..., R]:
        @functools.wraps(command)
        def run(**values: Any) -> R:
            filled = request(**{name: _plain(v) for name, v in values.items()})
            if isinstance(filled, RunFlags):
                # Workers' imports start now, beside the command's own (core/workers.py).
                prepare_workers(filled.world_size)
            return command(filled)

        run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        del run.__wrapped__  # Typer must see this signature, not the command's own
        return run

    return decorate
