"""`--help` a user can read at 80 columns: every option name whole, options in ordered panels."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
import typer.main
import typer.rich_utils
from mlkd_cli.commands import options as opt
from mlkd_cli.commands import requests
from typer.testing import CliRunner

from mlkd_cli.cli import app

WIDTH = 80
ROOT = typer.main.get_command(app)


def _commands(group, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    """Every command and group under `group`, found from the app itself, with its path."""
    for name, command in sorted(getattr(group, "commands", {}).items()):
        yield (*path, name), command
        yield from _commands(command, (*path, name))


COMMANDS = dict(_commands(ROOT))
LEAVES = {path: c for path, c in COMMANDS.items() if not getattr(c, "commands", None)}


def _options(command) -> list:
    """The command's options, as click declares them (its help option included)."""
    ctx = command.make_context("mlkd", [], resilient_parsing=True)
    return [p for p in command.get_params(ctx) if p.param_type_name == "option"]


@pytest.fixture
def render_help(monkeypatch):
    """`mlkd PATH... --help` as rich prints it in an 80-column terminal."""
    # Typer fixes these at import from TERMINAL_WIDTH and FORCE_COLOR / GITHUB_ACTIONS; the
    # shell running the tests must not decide the width or add colour codes.
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", None)
    monkeypatch.setattr(typer.rich_utils, "FORCE_TERMINAL", False)

    def render(*path: str, width: int = WIDTH) -> str:
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(width)})
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        # rich really drew at this width: the panels' borders span it, nothing goes past it
        assert max(len(line) for line in lines) == width, result.output
        return result.output

    return render


def _panels(text: str) -> dict[str, list[str]]:
    """Panel title -> the option names on its rows, in the order the help shows them."""
    panels: dict[str, list[str]] = {}
    names: list[str] = []
    for line in text.splitlines():
        if line.startswith("╭─ "):
            names = panels.setdefault(line.removeprefix("╭─ ").split(" ─")[0], [])
        elif line.startswith("│") and line[1:6].strip():  # a row starts here, not a wrapped line
            # the name cells come before the type: `--teacher-cache  --no-teacher-cache  <bool>`
            for token in line.strip("│ ").split():
                if token.startswith("<"):
                    break
                names.append(token)
    return panels


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_every_option_name_is_shown_whole(render_help, path: tuple[str, ...]) -> None:
    text = render_help(*path)
    shown = {name for names in _panels(text).values() for name in names}
    for param in _options(COMMANDS[path]):
        if param.hidden:  # timm's names: their mlkd flag's help names them (test below)
            continue
        for name in [*param.opts, *param.secondary_opts]:
            assert name in shown, f"`mlkd {' '.join(path)} --help` cuts {name}:\n{text}"
    assert "…" not in text, f"`mlkd {' '.join(path)} --help` cuts a cell:\n{text}"


@pytest.mark.parametrize("path", list(LEAVES), ids=" ".join)
def test_every_option_has_a_panel(path: tuple[str, ...]) -> None:
    # An option added later without a panel would land, unsorted, in Typer's "Options" panel.
    for param in _options(LEAVES[path]):
        if param.name == "help":
            continue
        panel = getattr(param, "rich_help_panel", None)
        assert panel in opt.PANELS, f"{param.opts[0]} of `mlkd {' '.join(path)}`: panel {panel}"


def test_distill_panels_put_the_common_flags_first(render_help) -> None:
    panels = _panels(render_help("distill"))
    assert list(panels) == [
        "Options",  # --help alone, where Typer puts it
        opt.DATA,
        opt.TEACHER,
        opt.STUDENT,
        opt.OPTIMISATION,
        opt.MODEL_EMA,
        opt.LOSS,
        opt.AUGMENTATION,
        opt.PROCESSES,
        opt.RUN,
        opt.OUTPUT,
    ]
    assert panels[opt.DATA][:3] == ["--dataset", "-d", "--data-dir"]
    assert panels[opt.TEACHER][:4] == ["--ensemble", "--model", "-m", "--checkpoint"]
    assert "--teacher-cache" in panels[opt.TEACHER]
    assert "--no-teacher-cache" in panels[opt.TEACHER]
    assert "--effective-batch-size" in panels[opt.OPTIMISATION]
    rare = ["--save-every-steps", "--skip-nonfinite", "--stop-nonfinite", "--strict-data"]
    assert panels[opt.RUN][-6:] == [*rare, "--skip-unreadable", "--log-to"]


def test_teacher_train_panels(render_help) -> None:
    panels = _panels(render_help("teacher", "train"))
    assert list(panels)[:3] == ["Options", opt.DATA, opt.MODEL]
    assert list(panels)[-2:] == [opt.RUN, opt.OUTPUT]
    assert opt.TEACHER not in panels and opt.STUDENT not in panels
    assert panels[opt.MODEL][:2] == ["--model", "-m"]
    assert "--effective-batch-size" in panels[opt.OPTIMISATION]


@pytest.mark.parametrize("path", [("distill",), ("teacher", "train"), ("study",)], ids=" ".join)
def test_help_names_timm_flags_beside_mlkd_ones(render_help, path: tuple[str, ...]) -> None:
    text = re.sub(r"\s+", " ", render_help(*path, width=200))
    for flag, setting in requests.TIMM_ALIASES.values():
        mlkd_flag = "--" + setting.replace("_", "-")
        # the mlkd flag's row says timm's name, which the command takes
        row = text[text.index(f"{mlkd_flag} ") :].split("│ --")[0]
        assert f"timm: {flag})" in row, row
        assert flag in {o for p in _options(COMMANDS[path]) for o in p.opts}
    for flag in ("--lr", "--weight-decay", "--warmup-epochs", "--reprob", "--drop-path"):
        assert f"{flag} " in text  # timm's own name already
    for flag in ("--clip-grad", "--clip-mode", "--model-ema", "--model-ema-decay"):
        assert f"{flag} " in text
    assert "--model-ema-warmup" in text


def test_help_text_keeps_square_brackets(render_help) -> None:
    # rich reads `[word]` as markup; an unescaped one vanishes from the help
    text = re.sub(r"\s+", " ", render_help("distill", width=200))
    assert "pip install 'mlkd[tensorboard]'" in text


# Run in a fresh interpreter: the root app is imported, `--help` rendered for it and every command
# and group under it, and usage errors (a bad flag, a bad choice, a missing argument) refused; none
# of it may load the heavy libraries (a command loads them when it runs).
LIGHT_HELP = r"""
import json, sys
import typer.main
from typer.testing import CliRunner
from mlkd_cli.cli import app

HEAVY = ("torch", "timm", "torchvision", "numpy", "wandb", "mlflow")
def walk(group, path=()):
    yield path
    for name, command in sorted(getattr(group, "commands", {}).items()):
        yield from walk(command, (*path, name))

runner = CliRunner()
codes = {}
for path in walk(typer.main.get_command(app)):
    codes[" ".join((*path, "--help"))] = runner.invoke(app, [*path, "--help"]).exit_code
for args in (["distill", "--bad-flag"], ["export", "m.pth", "--format", "nope"],
             ["ensemble", "eval", "--split", "nope"], ["eval"]):
    codes[" ".join(args)] = runner.invoke(app, args).exit_code
loaded = [name for name in HEAVY if name in sys.modules]
print(json.dumps({"codes": codes, "loaded": loaded}))
"""


def test_help_and_usage_errors_load_no_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-c", LIGHT_HELP], capture_output=True, text=True, check=True
    )
    seen = json.loads(done.stdout.splitlines()[-1])
    helps = {args: code for args, code in seen["codes"].items() if args.endswith("--help")}
    assert len(helps) == len(COMMANDS) + 1  # the root, and every command and group under it
    assert set(helps.values()) == {0}, helps
    errors = {args: code for args, code in seen["codes"].items() if args not in helps}
    assert set(errors.values()) == {2}, errors
    assert seen["loaded"] == [], f"help or a usage error imported {seen['loaded']}"
