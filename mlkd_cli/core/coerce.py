"""Typed configs from loose values: a preset's YAML and the flags, merged, become a config
dataclass, each value checked against its field's type (bool, int, float, str, Path, a pair of
floats, a map of names to floats), with one line naming the setting when it does not fit."""

from __future__ import annotations

import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from mlkd_cli.core.console import OutputOptions
from mlkd_cli.core.errors import UserError
from mlkd_cli.core.safeload import quote

C = TypeVar("C")


def config_field_names(cls: type) -> set[str]:
    """The settable keys of a config class (what presets and flags may name)."""
    return {f.name for f in fields(cls) if f.name != "output" and not f.metadata.get("internal")}


def build_config(cls: type[C], values: dict[str, Any], origin: str = "settings") -> C:
    """Make a config from merged preset + flag values, checking each value's type.

    `origin` names where the values came from, for the error message.
    """
    hints = typing.get_type_hints(cls)
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key not in hints:
            raise UserError(f"{origin}: unknown setting {quote(key, 40)}")
        checked[key] = _coerce(key, value, hints[key], origin)
    missing = [f.name for f in fields(cls) if f.name not in checked and _required(f)]
    if missing:
        flag = missing[0].replace("_", "-")
        raise UserError(f"--{flag} is required (on the command line or in a --preset)")
    return cls(**checked)


def _required(f: Any) -> bool:
    from dataclasses import MISSING

    return f.default is MISSING and f.default_factory is MISSING


def _is_pair(option: Any, value: Any) -> bool:
    """`option` is tuple[float, float] and `value` two numbers (a YAML list, a flag's pair)."""
    return (
        typing.get_origin(option) is tuple
        and isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


def _is_number_map(option: Any, value: Any) -> bool:
    """`option` is dict[str, float] and `value` a mapping of names to numbers (YAML, flags)."""
    return (
        typing.get_origin(option) is dict
        and isinstance(value, dict)
        and all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in value.items()
        )
    )


def _as_float(key: str, value: float, origin: str) -> float:
    try:
        return float(value)
    except OverflowError:  # an int too large for a float (YAML reads `1000...0` as an int)
        raise UserError(f"{origin}: {key} is too large, got {quote(value, 40)}") from None


def _coerce(key: str, value: Any, hint: Any, origin: str) -> Any:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise UserError(f"{origin}: {key} must not be empty")
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return _as_float(key, value, origin)
        if option is str and isinstance(value, str):
            return value
        if option is Path and isinstance(value, (str, Path)):
            return Path(value)
        if option is OutputOptions and isinstance(value, OutputOptions):
            return value
        if _is_pair(option, value):
            return (_as_float(key, value[0], origin), _as_float(key, value[1], origin))
        if _is_number_map(option, value):
            return {str(k): _as_float(f"{key}.{k}", v, origin) for k, v in value.items()}
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise UserError(f"{origin}: {key} must be {wanted}, got {quote(value)}")
