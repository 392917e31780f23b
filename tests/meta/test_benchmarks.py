"""The benchmark scripts import what exists: a move inside mlkd_cli/ updates them too (they are
not run by the suite, so nothing else would notice)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _mlkd_imports(script: Path) -> list[tuple[str, str]]:
    tree = ast.parse(script.read_text())
    return [
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlkd_cli")
        for alias in node.names
    ]


def _exists(module: str, name: str) -> bool:
    if hasattr(importlib.import_module(module), name):
        return True
    try:
        importlib.import_module(f"{module}.{name}")  # a submodule
    except ModuleNotFoundError:
        return False
    return True


@pytest.mark.parametrize("script", sorted(BENCHMARKS.glob("*.py")), ids=lambda p: p.name)
def test_every_name_a_benchmark_imports_from_mlkd_exists(script: Path) -> None:
    missing = [f"{m}.{n}" for m, n in _mlkd_imports(script) if not _exists(m, n)]
    assert not missing, f"{script.name} imports what mlkd_cli no longer has: {missing}"
