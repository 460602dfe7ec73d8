"""The package's imports point one way: no cycle, nothing below the study imports it, no private name
crosses a module boundary, and no module hides an import inside a function to dodge a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "saefeatures"
STUDY = "saefeatures.study"
FACADE = {"saefeatures", "saefeatures.__main__", "saefeatures.study.cli"}
"""The public facade (typed functions that import on first call, so ``import saefeatures`` stays
light), the ``python -m`` entry point and the command line (its parser imports the commands once
the arguments parse, so help and argument errors need no torch): above everything, imported by
nothing but each other."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> list[tuple[str, list[str], bool]]:
    """(imported module, names, inside a function) for every package-internal import of ``name`` that
    runs (``if TYPE_CHECKING:`` imports, for annotations only, are left out)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    typing_only = {id(n) for f in ast.walk(tree) if isinstance(f, ast.If) and ast.unparse(f.test) == "TYPE_CHECKING"
                   for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never executed
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("saefeatures"):
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            for t in submodules or [target]:
                out.append((t, names, id(node) in local))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("saefeatures"):
                    out.append((a.name, [], id(node) in local))
    return out


GRAPH = {name: {t for t, _, _ in imports(name) if t != name} for name in MODULES}


def test_the_module_graph_is_acyclic():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt in FACADE:
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(MODULES):
        if name not in state:
            visit(name)


def test_the_cycle_check_finds_a_planted_cycle():
    GRAPH["saefeatures.errors"].add("saefeatures.files")  # files imports errors: now a cycle
    try:
        test_the_module_graph_is_acyclic()
    except AssertionError as e:
        assert "saefeatures.errors -> saefeatures.files" in str(e) or "saefeatures.files -> saefeatures.errors" in str(e)
    else:
        raise AssertionError("the planted cycle was not found")
    finally:
        GRAPH["saefeatures.errors"].discard("saefeatures.files")


def test_only_the_study_knows_the_study():
    below = {name: sorted(t for t in targets if t == STUDY or t.startswith(STUDY + "."))
             for name, targets in GRAPH.items()
             if not (name == STUDY or name.startswith(STUDY + ".")) and name not in FACADE}
    assert {k: v for k, v in below.items() if v} == {}
    assert "saefeatures.study.config" not in {t for n in MODULES if not n.startswith(STUDY) and n not in FACADE
                                              for t in GRAPH[n]}


def test_no_import_hides_in_a_function():
    hidden = [f"{name}: {target}" for name in MODULES if name not in FACADE
              for target, _, local in imports(name) if local]
    assert hidden == []


def test_no_private_name_crosses_a_module():
    crossing = [f"{name}: {target}.{n}" for name in MODULES for target, names, _ in imports(name)
                for n in names if n.startswith("_") and not n.startswith("__")]
    assert crossing == []


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}
