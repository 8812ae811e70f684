"""The one-way architecture, checked on the source: no import cycle, ``polypythia`` never imports
``analysis``, no module over 350 lines, no citation of the team's private notes."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

from helpers import REPO

PACKAGES = ("polypythia", "analysis", "hydra_plugins")
MAX_LINES = 350


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports anywhere in it (function-level imports count too)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    found.discard(module_name(path))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {name: imported_modules(path, modules) for name, path in modules.items()}
    # a package's __init__ is imported with any of its modules: edges to it are not design cycles
    return {name: {d for d in deps if not name.startswith(d + ".")} for name, deps in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_polypythia_never_imports_analysis():
    offenders = {
        name: sorted(d for d in deps if d.split(".")[0] == "analysis")
        for name, deps in import_graph().items()
        if name.split(".")[0] == "polypythia"
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_of_polypythia_over_350_lines():
    long = {
        str(p.relative_to(REPO)): n
        for p in (REPO / "polypythia").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long


def test_the_team_notes_are_never_cited():
    tracked = subprocess.run(["git", "grep", "-l", "reference" + ".md"], cwd=REPO, capture_output=True, text=True)
    assert tracked.stdout == ""
