"""The README and the manual in docs/ hold up: every relative link (and its #anchor) points at
something that exists, and every `mlkd ...`, `make ...` and `benchmarks/...` they show names a
command, option, target or file that exists. The bad-input table's commands are left to
test_bad_inputs.py, which runs each of them (they are wrong on purpose)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer.main

from mlkd_cli.cli import app

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^ *```[^\n]*\n(.*?)^ *```", re.MULTILINE | re.DOTALL)
SPAN = re.compile(r"`([^`]+)`")
BAD_INPUT_TABLE = "## Bad input, and what you see"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


def _links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text()))


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in _links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not ours to check offline
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page: Path) -> None:
    assert _broken_links(page) == [], page


def test_the_front_page_stays_short_and_links_every_manual_page() -> None:
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 300
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _links(readme)}
    assert set(PAGES[1:]) <= linked, "a page of docs/ that the README does not link"


def test_the_link_check_finds_a_broken_link_and_anchor(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Top: `x`, y\n\n[ok](a.md#top-x-y) [no](b.md) [h](#nope)\n")
    assert _broken_links(tmp_path / "a.md") == [
        "b.md (no such file)",
        "#nope (no heading #nope in a.md)",
    ]


def _shown(page: Path) -> list[str]:
    """The command lines a page shows: lines of its code blocks, and its inline code spans."""
    text = page.read_text()
    if BAD_INPUT_TABLE in text:
        head, _, rest = text.partition(BAD_INPUT_TABLE)
        text = head + rest.partition("\n## ")[2]
    lines = []
    for block in FENCE.findall(text):
        lines += block.replace("\\\n", " ").splitlines()
    lines += [" ".join(span.split()) for span in SPAN.findall(FENCE.sub("", text))]
    return [line.strip() for line in lines]


def _words(line: str) -> list[str]:
    return [w.strip("[]") for w in shlex.split(line, comments=True)]


def _option_names(command) -> set[str]:
    ctx = command.make_context("mlkd", [], resilient_parsing=True)
    names = set()
    for param in command.get_params(ctx):
        names.update(getattr(param, "opts", []), getattr(param, "secondary_opts", []))
    return names


def _mlkd_problems(words: list[str]) -> list[str]:
    """What in `mlkd WORDS...` the app does not know: a command, or an option of that command."""
    command, path = typer.main.get_command(app), ["mlkd"]
    rest = words[1:]
    while rest and hasattr(command, "get_command") and not rest[0].startswith("-"):
        if rest[0] == "...":
            return []  # `mlkd teacher train ... --resume`: checked below once resolved
        sub = command.get_command(command.context_class(command, info_name=path[-1]), rest[0])
        if sub is None:
            return [f"{' '.join(path)} has no command {rest[0]!r}"]
        command, path, rest = sub, [*path, rest[0]], rest[1:]
    known = _option_names(command)
    problems = []
    for word in rest:
        if not re.match(r"--?[a-zA-Z]", word):
            continue
        for name in re.split(r"/(?=-)", word.partition("=")[0]):
            if name not in known:
                problems.append(f"{' '.join(path)} has no option {name}")
    return problems


def _problems(line: str) -> list[str]:
    words = _words(line)
    if not words:
        return []
    if words[0] == "mlkd":
        return _mlkd_problems(words)
    if words[0] == "make" and len(words) > 1:
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE)
        return [f"no make target {t}" for t in words[1:] if t not in targets]
    files = [w for w in words if re.match(r"(benchmarks|presets)/\S+\.\w+$", w)]
    return [f"{f} does not exist" for f in files if not (ROOT / f).exists()]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_command_shown_names_what_exists(page: Path) -> None:
    shown = [(line, _problems(line)) for line in _shown(page)]
    assert [(line, p) for line, p in shown if p] == [], page


def test_the_command_check_finds_a_wrong_command_option_and_file() -> None:
    assert _problems("mlkd distill --bad-flag 1") == ["mlkd distill has no option --bad-flag"]
    assert _problems("mlkd ensemble biuld x") == ["mlkd ensemble has no command 'biuld'"]
    assert _problems("mlkd eval m.pth --split val [--early-exit/--no-such]  # ok") == [
        "mlkd eval has no option --no-such"
    ]
    assert _problems("mlkd teacher train -d digits -m x -e 1 -Q") == [
        "mlkd teacher train has no option -Q"
    ]
    assert _problems("make demmo") == ["no make target demmo"]
    assert _problems("python benchmarks/nothing.py") == ["benchmarks/nothing.py does not exist"]
    assert _problems("mlkd teacher train ... --resume") == []
