"""YAML presets shipped in the package, merged under the command-line flags the user gave."""

from __future__ import annotations

import importlib.resources
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mlkd_cli.core.coerce import build_config, config_field_names
from mlkd_cli.core.constants import DEFAULT_VIEWS
from mlkd_cli.core.errors import UserError
from mlkd_cli.core.safeload import load_yaml, quote, read_text_file
from mlkd_cli.engine.config import DistillConfig, TeacherTrainConfig
from mlkd_cli.models.ensemble_config import MAX_MEMBERS

C = TypeVar("C")
# The repository's presets/ folder, installed inside the package under this name.
PRESET_PACKAGE = "mlkd_cli.shipped_presets"
# Top-level keys about the preset itself, not settings of any command.
PRESET_META_KEYS = {"description", "baseline", "soft_labels"}
# Sections a preset may hold: one per command it feeds, plus the list of teachers.
PRESET_SECTIONS = {"teacher", "teachers", "ensemble", "distill", "soft_labels", "baseline"}
# `baseline:` in a preset: `true`, `false`, or a mapping of these settings, in which the
# cross-entropy student differs from its default (the student's data and budget, augmentation
# on): a recipe whose student trains without random crops trains its baseline alike.
BASELINE_KEYS = {"augment"}
# `soft_labels:` in a preset: `true` (the defaults) or a mapping of these.
SOFT_LABEL_KEYS = {"views", "top_k"}


def available_presets() -> list[str]:
    """Names of the presets shipped with mlkd."""
    folder = importlib.resources.files(PRESET_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_path: str) -> tuple[dict[str, Any], str]:
    """A preset's contents and where it came from: a shipped name or a YAML file path.

    The file is read with the limits of `core.safeload` and its top-level layout checked, so
    every command taking `--preset` refuses a section it does not know (a typo'd `teachr:`).
    """
    shipped = importlib.resources.files(PRESET_PACKAGE).joinpath(f"{name_or_path}.yaml")
    if shipped.is_file():
        text, origin = shipped.read_text(encoding="utf-8"), f"preset {name_or_path}"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            known = ", ".join(available_presets())
            raise UserError(
                f"no preset {quote(name_or_path)}: not a shipped preset ({known}) nor a file"
            )
        text, origin = read_text_file(path, "preset"), str(path)
    content = load_yaml(text, origin) or {}
    if not isinstance(content, dict):
        raise UserError(f"{origin} must be a mapping of settings, not a {type(content).__name__}")
    _check_layout(content, origin)
    return content, origin


def _check_layout(content: dict[str, Any], origin: str) -> None:
    """Refuse top-level sections the preset format does not know."""
    settings = config_field_names(TeacherTrainConfig) | config_field_names(DistillConfig)
    for key, value in content.items():
        if not isinstance(value, (dict, list)) or key in PRESET_SECTIONS:
            continue
        if str(key).replace("-", "_") in settings:  # a real setting, only not shareable
            raise UserError(
                f"{origin}: {quote(key, 40)} holds a list or mapping, which a preset gives one "
                "command at a time: put it inside `teacher:` or `distill:` (only single values "
                "are shared at the top)"
            )
        raise UserError(
            f"{origin}: unknown section {quote(key, 40)}; sections are "
            f"{', '.join(sorted(PRESET_SECTIONS))} (settings shared by all go at the top)"
        )


def preset_section(name_or_path: str | None, section: str, allowed: set[str]) -> dict[str, Any]:
    """The settings a preset gives one command: shared top-level keys plus its own section.

    Unknown keys are refused, naming the key and the file, so a typo never silently does nothing.
    """
    if name_or_path is None:
        return {}
    content, origin = load_preset(name_or_path)
    shared = {
        k: v
        for k, v in content.items()
        if not isinstance(v, (dict, list)) and k not in PRESET_META_KEYS
    }
    own = content.get(section) or {}
    if not isinstance(own, dict):
        raise UserError(f"{origin}: section {section!r} must be a mapping")
    merged = _setting_names({**shared, **own}, origin)
    unknown = sorted(set(merged) - allowed)
    if unknown:
        raise UserError(
            f"{origin}: unknown key {quote(unknown[0], 40)} for `{section}`; remove or rename it"
        )
    return merged


def settings_config(
    cls: type[C],
    section: str,
    preset: str | None,
    flags: dict[str, Any],
    origin: str | None = None,
) -> C:
    """A command's config: the class defaults, then the preset's `section`, then `flags`.

    The one place where a preset's section and flags meet (a preset's teacher entries overlay
    its `teacher:` section the same way, in `resolve_preset`). `origin` names the values'
    source in errors (default: the preset, else "options").
    """
    values = {**preset_section(preset, section, config_field_names(cls)), **flags}
    return build_config(cls, values, origin=origin or preset or "options")


def preset_teachers(name_or_path: str) -> list[dict[str, Any]]:
    """The preset's teachers, each its `teacher` section overlaid with the entry's own keys."""
    content, origin = load_preset(name_or_path)
    entries = content.get("teachers") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise UserError(f"{origin}: 'teachers' must be a list of mappings")
    if len(entries) > MAX_MEMBERS:
        raise UserError(
            f"{origin} lists {len(entries)} teachers; an ensemble holds at most {MAX_MEMBERS}"
        )
    return [_setting_names(entry, origin) for entry in entries]


def _setting_names(values: dict[Any, Any], origin: str) -> dict[str, Any]:
    """The settings with `-` in their names read as `_`; a key that is not text is refused."""
    for key in values:
        if not isinstance(key, str):
            raise UserError(f"{origin}: setting names are text, not {quote(key, 40)}")
    return {k.replace("-", "_"): v for k, v in values.items()}


def check_preset_layout(name_or_path: str) -> dict[str, Any]:
    """The preset's contents, its layout checked (as `load_preset` always does)."""
    return load_preset(name_or_path)[0]


ENSEMBLE_KEYS = {"fit_temperature"}


@dataclass(frozen=True)
class SoftLabelSettings:
    """A pipeline that labels a soft-label store once and distils from it (`soft_labels:`)."""

    views: int = DEFAULT_VIEWS
    top_k: int | None = None  # None: `mlkd teacher label`'s default


def _soft_label_settings(value: Any, origin: str) -> SoftLabelSettings | None:
    """The preset's `soft_labels:`: absent or false (live teacher), true, or {views, top_k}."""
    if value is None or value is False:
        return None
    if value is True:
        return SoftLabelSettings()
    if not isinstance(value, dict) or set(value) - SOFT_LABEL_KEYS:
        raise UserError(
            f"{origin}: soft_labels must be true, false or a mapping of {sorted(SOFT_LABEL_KEYS)}"
        )
    for key, number in value.items():
        if number is not None and (isinstance(number, bool) or not isinstance(number, int)):
            raise UserError(
                f"{origin}: soft_labels.{key} must be a whole number, got {quote(number)}"
            )
    views = value.get("views", DEFAULT_VIEWS)
    if views < 1:
        raise UserError(f"{origin}: soft_labels.views must be at least 1, got {views}")
    return SoftLabelSettings(views, value.get("top_k"))


def _baseline(value: Any, origin: str) -> tuple[bool, dict[str, Any]]:
    """The preset's `baseline:`: true or false, or a mapping of BASELINE_KEYS (true)."""
    if isinstance(value, bool):
        return value, {}
    if not isinstance(value, dict) or set(value) - BASELINE_KEYS:
        raise UserError(
            f"{origin}: baseline must be true, false or a mapping of {sorted(BASELINE_KEYS)}"
        )
    for key, setting in value.items():
        if not isinstance(setting, bool):
            raise UserError(f"{origin}: baseline.{key} must be true or false")
    return True, dict(value)


@dataclass(frozen=True, kw_only=True)
class Preset:
    """A preset resolved into the checked settings of every command it feeds."""

    origin: str  # the shipped name or the file it came from
    description: str
    teachers: list[TeacherTrainConfig]
    fit_temperature: bool  # the ensemble section's setting
    distill: DistillConfig | None
    baseline: bool  # whether the pipeline also trains a cross-entropy student
    # Settings the cross-entropy student takes from `baseline: {...}` (BASELINE_KEYS).
    baseline_settings: dict[str, Any] = field(default_factory=dict)
    # The pipeline labels a store once and distils from it (None: the live teacher).
    soft_labels: SoftLabelSettings | None = None


def resolve_preset(name_or_path: str) -> Preset:
    """Every stage of a preset as the full, checked settings of the command it feeds."""

    content = check_preset_layout(name_or_path)
    origin = load_preset(name_or_path)[1]
    base = preset_section(name_or_path, "teacher", config_field_names(TeacherTrainConfig))
    teachers = []
    for entry in preset_teachers(name_or_path):
        unknown = sorted(set(entry) - config_field_names(TeacherTrainConfig))
        if unknown:
            raise UserError(f"{origin}: unknown key {quote(unknown[0], 40)} in a teacher entry")
        config = build_config(TeacherTrainConfig, {**base, **entry}, origin)
        config.validate()
        teachers.append(config)
    ensemble = content.get("ensemble") or {}
    if not isinstance(ensemble, dict) or set(ensemble) - ENSEMBLE_KEYS:
        raise UserError(f"{origin}: the ensemble section takes only {sorted(ENSEMBLE_KEYS)}")
    if not isinstance(ensemble.get("fit_temperature", False), bool):
        raise UserError(f"{origin}: ensemble.fit_temperature must be true or false")
    distill = None
    if "distill" in content:
        distill = settings_config(DistillConfig, "distill", name_or_path, {}, origin)
        distill.validate()
    baseline, baseline_settings = _baseline(content.get("baseline", False), origin)
    return Preset(
        origin=origin,
        description=str(content.get("description", "")).strip(),
        teachers=teachers,
        fit_temperature=bool(ensemble.get("fit_temperature", False)),
        distill=distill,
        baseline=baseline,
        baseline_settings=baseline_settings,
        soft_labels=_soft_label_settings(content.get("soft_labels"), origin),
    )


def resolved_record(resolved: Preset) -> dict[str, Any]:
    """A resolved preset as plain data (for `mlkd presets show`)."""
    return {
        "description": resolved.description,
        "teachers": [t.to_record() for t in resolved.teachers],
        "ensemble": {"fit_temperature": resolved.fit_temperature},
        "distill": resolved.distill.to_record() if resolved.distill else None,
        "baseline": resolved.baseline_settings or resolved.baseline,
        "soft_labels": asdict(resolved.soft_labels) if resolved.soft_labels else None,
    }
