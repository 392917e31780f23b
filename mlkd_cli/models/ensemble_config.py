"""Ensemble files: the original project's JSON verbatim, or an explicit members list (YAML/JSON).

Original form (names resolve to `<models dir>/<name>.pth`, the models dir defaulting to `models/`
beside the file):

    {"models": ["deit_small_distilled_patch16_224", ...], "names": ["oxford_deit", ...],
     "weights": [0.97, ...]}

Explicit form (checkpoint paths relative to the file; `model` optional when the checkpoint
records its architecture; `weight` optional):

    members:
      - checkpoint: models/a.pth
        model: resnet10t
        weight: 1.0
    temperature: 1.0

`weights` may be absent before fitting (equal weights then); `temperature` is optional in both.
`img_size` (top level, or a member's own) sets the input a member runs at; without it a member
runs at what its checkpoint records, and one that records nothing at the size of the batches it is
given (the student's, when distilling).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from mlkd_cli.core.atomic import atomic_write_text
from mlkd_cli.core.constants import MAX_IMG_SIZE
from mlkd_cli.core.errors import UserError
from mlkd_cli.core.safeload import finite_number, load_data_file, quote

# The most members an ensemble file may list: each is a model held in memory at once.
MAX_MEMBERS = 64
ORIGINAL = "original"
MEMBERS = "members"


@dataclass(frozen=True)
class MemberSpec:
    """One ensemble member as the file names it."""

    checkpoint: Path
    model: str | None = None
    weight: float = 1.0
    label: str = ""  # the original's checkpoint name, or the file's stem
    ema: bool = True  # take a timm train.py checkpoint's EMA weights (state_dict_ema)
    img_size: int | None = None  # the input it runs at (None: its checkpoint's, else the batch's)

    @property
    def name(self) -> str:
        """What tables call this member."""
        return self.label or self.checkpoint.stem


@dataclass(frozen=True)
class EnsembleConfig:
    """An ensemble file, parsed: its members, temperature, and how to write it back."""

    path: Path
    members: tuple[MemberSpec, ...]
    temperature: float = 1.0
    layout: str = MEMBERS  # ORIGINAL or MEMBERS
    syntax: str = "json"  # json or yaml
    raw: dict[str, Any] = field(default_factory=dict)
    has_weights: bool = True

    @property
    def weights(self) -> list[float]:
        """Member weights in file order."""
        return [m.weight for m in self.members]

    def with_ema(self, ema: bool) -> EnsembleConfig:
        """The same ensemble, each member taking (or not) its checkpoint's EMA weights."""
        return replace(self, members=tuple(replace(m, ema=ema) for m in self.members))

    def with_fit(self, weights: list[float], temperature: float) -> EnsembleConfig:
        """The same ensemble with fitted weights and the temperature they were fitted with."""
        members = tuple(
            replace(m, weight=float(w)) for m, w in zip(self.members, weights, strict=True)
        )
        return replace(self, members=members, temperature=float(temperature), has_weights=True)


# The ensemble file read when no teacher is named: the original project's, in the working folder.
DEFAULT_ENSEMBLE_FILE = Path("config.json")


def resolve_teacher(
    checkpoint: Path | None,
    model: str | None,
    ensemble: Path | None,
    models_dir: Path | None,
    ema: bool,
) -> EnsembleConfig:
    """The teacher the user named (`--checkpoint` with `--model`, or `--ensemble`), or
    `config.json` here, as an ensemble (of one, maybe), each member taking its EMA or not."""
    if checkpoint is not None:  # --model may be left out: the checkpoint's card names it
        member = MemberSpec(checkpoint, model, 1.0)
        return EnsembleConfig(path=checkpoint, members=(member,)).with_ema(ema)
    path = ensemble
    if path is None:
        if not DEFAULT_ENSEMBLE_FILE.is_file():
            raise UserError(
                "no teacher named and no config.json here; pass --ensemble FILE, or --model NAME "
                "--checkpoint PATH for a single teacher"
            )
        path = DEFAULT_ENSEMBLE_FILE
    return read_ensemble_config(path, models_dir).with_ema(ema)


def read_ensemble_config(path: Path, models_dir: Path | None = None) -> EnsembleConfig:
    """Parse an ensemble file, checking its shape (not yet its checkpoints)."""
    if not path.is_file():
        raise UserError(
            f"no ensemble file {path}; pass its path (the original's is config.json), "
            "or train teachers and write one"
        )
    syntax = "yaml" if path.suffix.lower() in (".yaml", ".yml") else "json"
    content = load_data_file(path, "ensemble file", syntax)
    if not isinstance(content, dict):
        raise UserError(f"{path} must hold a mapping, not a {type(content).__name__}")
    if "members" in content:
        members = _explicit_members(path, content)
        layout = MEMBERS
    elif "models" in content or "names" in content:
        members = _original_members(path, content, models_dir or path.parent / "models")
        layout = ORIGINAL
    else:
        raise UserError(
            f"{path} has neither 'members' nor 'models'/'names'; see `mlkd ensemble --help`"
        )
    temperature = _finite(path, "temperature", content.get("temperature", 1.0))
    if temperature <= 0:
        raise UserError(f"{path}: temperature must be positive, got {temperature}")
    has_weights = "weights" in content or any(
        isinstance(m, dict) and "weight" in m for m in content.get("members", [])
    )
    return EnsembleConfig(path, tuple(members), temperature, layout, syntax, content, has_weights)


def _finite(path: Path, what: str, value: Any) -> float:
    return finite_number(value, f"{path}: {what}")


def _check_count(path: Path, count: int) -> None:
    if count > MAX_MEMBERS:
        raise UserError(
            f"{path} lists {count} members; an ensemble holds at most {MAX_MEMBERS} "
            "(each is a model in memory at once)"
        )


def _text(path: Path, what: str, value: Any) -> str:
    """A name or path from the file, which must be non-empty text."""
    if not isinstance(value, str) or not value:
        raise UserError(f"{path}: {what} must be text, got {quote(value)}")
    return value


def _img_size(path: Path, what: str, value: Any) -> int | None:
    """An `img_size` the file gives (None when absent), checked to be a usable pixel count."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 8 <= value <= MAX_IMG_SIZE:
        raise UserError(
            f"{path}: {what} must be a whole number of pixels from 8 to {MAX_IMG_SIZE}, "
            f"got {quote(value)}"
        )
    return value


def _original_members(path: Path, content: dict[str, Any], models_dir: Path) -> list[MemberSpec]:
    models, names = content.get("models"), content.get("names")
    if not isinstance(models, list) or not isinstance(names, list) or not models:
        raise UserError(f"{path}: 'models' and 'names' must be non-empty lists")
    _check_count(path, max(len(models), len(names)))
    weights = content.get("weights", [1.0] * len(models))
    if not isinstance(weights, list):
        raise UserError(f"{path}: 'weights' must be a list")
    if not len(models) == len(names) == len(weights):
        raise UserError(
            f"{path}: {len(models)} models, {len(names)} names and {len(weights)} weights; "
            "the three lists must be the same length"
        )
    img_size = _img_size(path, "img_size", content.get("img_size"))
    members = []
    for number, (model, name, weight) in enumerate(zip(models, names, weights, strict=True), 1):
        label = _text(path, f"name {number}", name)
        members.append(
            MemberSpec(
                checkpoint=models_dir / f"{label}.pth",
                model=_text(path, f"model {number}", model),
                weight=_finite(path, f"weight of {quote(label, 40)}", weight),
                label=label,
                img_size=img_size,
            )
        )
    return members


def _explicit_members(path: Path, content: dict[str, Any]) -> list[MemberSpec]:
    entries = content["members"]
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path}: 'members' must be a non-empty list")
    _check_count(path, len(entries))
    members = []
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or "checkpoint" not in entry:
            raise UserError(f"{path}: member {number} needs a 'checkpoint' path")
        unknown = [
            k for k in entry if k not in ("checkpoint", "model", "weight", "name", "img_size")
        ]
        if unknown:
            raise UserError(f"{path}: member {number} has unknown key {quote(unknown[0], 40)}")
        checkpoint = Path(_text(path, f"member {number}'s checkpoint", entry["checkpoint"]))
        model, name = entry.get("model"), entry.get("name")
        members.append(
            MemberSpec(
                checkpoint=checkpoint if checkpoint.is_absolute() else path.parent / checkpoint,
                model=None if model is None else _text(path, f"member {number}'s model", model),
                weight=_finite(path, f"weight of member {number}", entry.get("weight", 1.0)),
                label="" if name is None else _text(path, f"member {number}'s name", name),
                img_size=_img_size(
                    path,
                    f"img_size of member {number}",
                    entry.get("img_size", content.get("img_size")),
                ),
            )
        )
    return members


def write_ensemble_config(config: EnsembleConfig, destination: Path) -> None:
    """Write the ensemble back in the layout and syntax it was read in, atomically."""
    content = dict(config.raw)
    weights = [round(w, 6) for w in config.weights]
    if config.layout == ORIGINAL:
        content["weights"] = weights
    else:
        content["members"] = [
            {
                **entry,
                "checkpoint": _relative_to(
                    member.checkpoint, entry["checkpoint"], destination.parent
                ),
                "weight": w,
            }
            for entry, member, w in zip(content["members"], config.members, weights, strict=True)
        ]
    if config.temperature != 1.0 or "temperature" in content:
        content["temperature"] = round(config.temperature, 6)
    if config.syntax == "yaml":
        text = yaml.safe_dump(content, sort_keys=False)
    else:
        text = _json_text(content)
    atomic_write_text(destination, text)


def _relative_to(resolved: Path, written: str, folder: Path) -> str:
    # Relative checkpoint paths are relative to the file: a copy written into another folder
    # gets them re-expressed so they still reach the same checkpoints.
    if Path(written).is_absolute():
        return written
    return os.path.relpath(resolved.resolve(), folder.resolve())


def _json_text(content: dict[str, Any]) -> str:
    # The original's layout: one key per line, lists of names and weights kept on that line.
    def value(v: Any) -> str:
        if isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v):
            return json.dumps(v)
        if isinstance(v, list):
            return "[\n" + ",\n".join(f"        {json.dumps(x)}" for x in v) + "\n    ]"
        return json.dumps(v)

    body = ",\n".join(f"    {json.dumps(k)}: {value(v)}" for k, v in content.items())
    return "{\n" + body + "\n}\n"
