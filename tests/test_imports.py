"""The shape of the package, read from the files (ast, no imports run): no import cycle between modules or
between the top-level parts of `project/`, and the core never imports the extras (the training run alone wires
them in)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

EXTRAS = ("feed", "runtime", "views", "tools", "callbacks")  # everything else under project/ is the core
WIRING = "project.training"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every project module -> the project modules it imports, at any depth (a lazy import counts)."""
    files = {module_name(p): p for p in sorted((ROOT / "project").rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                # a package re-exporting its own modules is not a cycle of design
                if target and target != name and not (target.startswith(name + ".") or name.startswith(target + ".")):
                    found.add(target)
        graph[name] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    return found


def part(module: str) -> str:
    return ".".join(module.split(".")[:2])


def is_extra(module: str) -> bool:
    return module.split(".")[1:2] in ([name] for name in EXTRAS)


def test_no_import_cycle_between_modules():
    assert cycles(import_graph()) == []


def test_no_import_cycle_between_the_parts_of_the_package():
    parts: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        parts.setdefault(part(module), set()).update(part(t) for t in targets if part(t) != part(module))
    assert cycles(parts) == []


def test_the_core_imports_no_extras_and_the_training_run_wires_them():
    graph = import_graph()
    core_into_extras = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if not is_extra(module) and module != WIRING
        for target in targets
        if is_extra(target)
    )
    assert core_into_extras == []
    assert any(is_extra(t) for t in graph[WIRING])  # the checks above do see imports


def test_the_checks_find_a_cycle_when_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
