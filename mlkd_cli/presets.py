"""YAML presets shipped in the package, merged under the command-line flags the user gave."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import yaml

from mlkd_cli.console import UserError

# The repository's presets/ folder, installed inside the package under this name.
PRESET_PACKAGE = "mlkd_cli.shipped_presets"


def available_presets() -> list[str]:
    """Names of the presets shipped with mlkd."""
    folder = importlib.resources.files(PRESET_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_path: str) -> tuple[dict[str, Any], str]:
    """A preset's contents and where it came from: a shipped name or a YAML file path."""
    shipped = importlib.resources.files(PRESET_PACKAGE).joinpath(f"{name_or_path}.yaml")
    if shipped.is_file():
        text, origin = shipped.read_text(encoding="utf-8"), f"preset {name_or_path}"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            known = ", ".join(available_presets())
            raise UserError(
                f"no preset {name_or_path!r}: not a shipped preset ({known}) nor a file"
            )
        text, origin = path.read_text(encoding="utf-8"), str(path)
    try:
        content = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UserError(
            f"{origin} is not valid YAML ({exc.__class__.__name__}); fix the file"
        ) from exc
    if not isinstance(content, dict):
        raise UserError(f"{origin} must be a mapping of settings, not a {type(content).__name__}")
    return content, origin


def preset_section(name_or_path: str | None, section: str, allowed: set[str]) -> dict[str, Any]:
    """The settings a preset gives one command: shared top-level keys plus its own section.

    Unknown keys are refused, naming the key and the file, so a typo never silently does nothing.
    """
    if name_or_path is None:
        return {}
    content, origin = load_preset(name_or_path)
    shared = {k: v for k, v in content.items() if not isinstance(v, dict)}
    own = content.get(section) or {}
    if not isinstance(own, dict):
        raise UserError(f"{origin}: section {section!r} must be a mapping")
    merged = {k.replace("-", "_"): v for k, v in {**shared, **own}.items()}
    unknown = sorted(set(merged) - allowed)
    if unknown:
        raise UserError(
            f"{origin}: unknown key {unknown[0]!r} for `{section}`; remove or rename it"
        )
    return merged
