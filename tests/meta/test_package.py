"""The wheel carries everything `mlkd` needs and works installed, away from the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the sources: setuptools reuses a stale build/ of the checkout, which
    # would hide a package missing from pyproject's list.
    source = tmp_path_factory.mktemp("source") / "mlkd"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "runs", "__pycache__"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("mlkd-*.whl")
    return built


def test_wheel_holds_commands_presets_and_digits(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "mlkd_cli/cli.py",
        "mlkd_cli/commands/teacher.py",
        "mlkd_cli/shipped_presets/digits.yaml",
        "mlkd_cli/data/digits.csv.gz",
        "mlkd_cli/data/DIGITS.md",
    ):
        assert required in names
    # Every module of the source tree ships (a package missing from pyproject's list would not).
    sources = {
        f"mlkd_cli/{path.relative_to(ROOT / 'mlkd_cli').as_posix()}"
        for path in (ROOT / "mlkd_cli").rglob("*.py")
    } | {f"mlkd_cli/commands/{path.name}" for path in (ROOT / "commands").glob("*.py")}
    assert sources - names == set()
    # No generic top-level package lands in site-packages.
    assert {n.split("/")[0] for n in names if not n.startswith("mlkd-")} == {"mlkd_cli"}
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mlkd = mlkd_cli.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_runs_outside_the_source_tree(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = "import mlkd_cli, sys; print(mlkd_cli.__file__); from mlkd_cli.cli import main; main()"
    done = subprocess.run(
        [sys.executable, "-c", code, "data", "info", "digits", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith(str(target))
    assert '"test": 359' in done.stdout
    listed = subprocess.run(
        [sys.executable, "-c", code, "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    for group in ("teacher", "ensemble", "distill", "eval", "export", "data"):
        assert group in listed.stdout
