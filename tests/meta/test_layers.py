"""The package's layers import one way only: core <- data, models, losses <- engine <- passes <-
services <- api <- commands; data/, models/ and losses/ share a layer and do not import each other.

Walks every module's imports with `ast` (those inside functions too), so the rule lasts.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Module-name prefix -> layer; the longest matching prefix wins.
LAYERS = {
    "mlkd_cli": 0,
    "mlkd_cli.core": 0,
    "mlkd_cli.data": 1,
    "mlkd_cli.models": 1,
    # Early exit is one folder across two layers. Its pure parts (the exit rules, the MACs
    # counted per part, the staged runner) are part of the models layer: the exits file format
    # (models/exits.py) records a student's rule and its counted MACs, and they need only core
    # and models.student. Its jobs (threshold search, the eval job, timing, the deploy-time
    # classifier) run passes over a split and load files: services. SIBLINGS lets models/ and
    # these parts import each other; the cycle test still holds them apart module by module.
    "mlkd_cli.anytime.rules": 1,
    "mlkd_cli.anytime.costs": 1,
    "mlkd_cli.anytime.staged": 1,
    "mlkd_cli.losses": 1,
    "mlkd_cli.engine": 2,
    # Forward-only jobs over a split (logits, evaluation, ensemble fitting, labelling): above
    # the engine, whose launcher, precision and planning helpers they reuse; training never
    # imports them.
    "mlkd_cli.passes": 3,
    "mlkd_cli.pipeline": 4,
    "mlkd_cli.study": 4,
    # Formats, int8 and the one onnxruntime session opener; anytime's jobs may open sessions
    # with it (same layer), and export uses only anytime's pure parts (layer 1): no cycle.
    "mlkd_cli.export": 4,
    "mlkd_cli.anytime": 4,
    "mlkd_cli.presets": 4,
    # A pipeline recipe chosen from the data and the machine: a preset made, not written.
    "mlkd_cli.recipes": 4,
    # The Python API: what each command does, as functions over the services; the commands call
    # it and render what it returns.
    "mlkd_cli.api": 5,
    "mlkd_cli.commands": 6,
    "mlkd_cli.shipped_presets": 6,
    "mlkd_cli.cli": 6,
    "mlkd_cli.__main__": 6,
}
NAMES = {
    0: "core",
    1: "data/models/losses",
    2: "engine",
    3: "passes",
    4: "services",
    5: "api",
    6: "commands",
}
# Layer-1 prefixes that count as one concept with models/ (others on layer 1 do not import each
# other).
SIBLINGS = {"mlkd_cli.anytime.rules", "mlkd_cli.anytime.costs", "mlkd_cli.anytime.staged"}


def module_files() -> dict[str, Path]:
    """Installed module name -> source file (commands/ installs as mlkd_cli.commands)."""
    found = {}
    for folder, package in (
        (ROOT / "mlkd_cli", "mlkd_cli"),
        (ROOT / "commands", "mlkd_cli.commands"),
    ):
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(name: str, path: Path) -> set[str]:
    """The mlkd_cli modules `name` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            targets.add(module)
            # `from mlkd_cli.engine import loop` imports the submodule mlkd_cli.engine.loop.
            targets |= {f"{module}.{a.name}" for a in node.names}
    known = module_files()
    return {t for t in targets if t in known and t != name}


def layer(name: str) -> tuple[str, int]:
    prefix = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return prefix, LAYERS[prefix]


def _family(prefix: str) -> str:
    """The concept a layer-1 prefix belongs to (early exit's pure parts go with models/)."""
    return "mlkd_cli.models" if prefix in SIBLINGS else prefix


def test_every_module_has_a_layer() -> None:
    for name in module_files():
        layer(name)  # raises ValueError (max of nothing) for a module outside every layer


def test_no_module_imports_a_higher_layer_or_a_sibling() -> None:
    wrong = []
    for name, path in module_files().items():
        home, level = layer(name)
        for target in imports_of(name, path):
            there, target_level = layer(target)
            higher = target_level > level
            # data/, models/ and losses/ share a layer but do not import each other.
            sibling = level == 1 and target_level == 1 and _family(there) != _family(home)
            if higher or sibling:
                wrong.append(f"{name} ({NAMES[level]}) imports {target} ({NAMES[target_level]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    files = module_files()
    graph = {name: imports_of(name, path) for name, path in files.items()}
    # A package's __init__ importing nothing makes `a.b -> a` edges harmless: only real ones count.
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, trail: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend([*trail[trail.index(nxt) :], nxt] if nxt in trail else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, [*trail, nxt]):
                return True
        state[node] = 2
        return False

    for name in sorted(graph):
        if state.get(name) is None and visit(name, [name]):
            break
    assert not cycle, " -> ".join(cycle)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    # The walk finds imports inside functions too (a test of the test).
    path = tmp_path / "bad.py"
    path.write_text("def f():\n    from mlkd_cli.engine import launch\n")
    assert "mlkd_cli.engine.launch" in imports_of("mlkd_cli.data.bad", path)


# The training tasks and the trainer that runs them: a forward-only pass reuses the launcher,
# precision, the config and the planning checks (whose validation knows the loss and optimiser
# names), never a task. `models/` builds the teacher a pass runs.
TRAINING = (
    "mlkd_cli.engine.checkpointing",
    "mlkd_cli.engine.distiller",
    "mlkd_cli.engine.teacher",
    "mlkd_cli.engine.trainer",
)


def test_passes_reach_no_training_task() -> None:
    files = module_files()
    graph = {name: imports_of(name, path) for name, path in files.items()}
    passes = [name for name in graph if name.startswith("mlkd_cli.passes.")]
    assert passes, "no module found under mlkd_cli/passes/"
    wrong = []
    for start in passes:
        seen, todo = set(), [start]
        while todo:  # everything the pass loads, directly or through another module
            for target in graph[todo.pop()] - seen:
                seen.add(target)
                todo.append(target)
        wrong += [f"{start} reaches {t}" for t in sorted(seen) if t.startswith(TRAINING)]
    assert not wrong, "\n".join(wrong)
