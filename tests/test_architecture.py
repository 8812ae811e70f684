"""The one-way architecture, checked on the source: no import cycle, the wings import only downwards
(``polypythia`` never imports ``analysis``, a job never imports its driver), at most 12 top-level
modules beside the wings, no module over 350 lines and no function over 60 lines in ``polypythia`` and
``analysis``, no citation of the team's private notes."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

from helpers import REPO

PACKAGES = ("polypythia", "analysis", "hydra_plugins")
MAX_LINES = 350
MAX_FUNCTION_LINES = 60
MAX_TOP_LEVEL_MODULES = 12

# The house from the ground up: a part imports only parts on a lower floor (or itself). The ground
# floor holds the contracts every wing shares; a job runs the trainer, the driver submits jobs, and
# `analysis` reads what training wrote without the driver or the job.
FLOORS = (
    ("polypythia", "polypythia.errors", "polypythia.files", "polypythia.net", "polypythia.recipe", "polypythia.study",
     "polypythia.jobspec", "polypythia.stability", "polypythia.qknorm"),
    ("polypythia.runtime", "polypythia.data", "polypythia.model"),
    ("polypythia.tracking",),
    ("polypythia.config",),
    ("polypythia.runfolder",),
    ("polypythia.train",),
    ("polypythia.evaluate",),
    ("polypythia.job",),
    ("polypythia.driver",),
    ("analysis",),
    ("hydra_plugins",),
)  # fmt: skip


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


def part_of(module: str) -> str:
    """The part of FLOORS a module belongs to: its wing (``polypythia.driver``) or its own name."""
    parts = module.split(".")
    return parts[0] if parts[0] != "polypythia" else ".".join(parts[:2])


def floor_of(part: str) -> int:
    for floor, parts in enumerate(FLOORS):
        if part in parts:
            return floor
    raise AssertionError(f"{part} is on no floor of FLOORS: give it one in tests/test_architecture.py")


def imports_up(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a part to a part on the same or a higher floor (other than itself)."""
    return sorted(
        f"{name} -> {dep}"
        for name, deps in graph.items()
        for dep in deps
        if part_of(name) != part_of(dep)
        and name.split(".")[0] in PACKAGES
        and floor_of(part_of(dep)) >= floor_of(part_of(name))
    )


def test_the_wings_import_only_downwards():
    assert imports_up(import_graph()) == []


def test_the_direction_check_finds_an_import_up():
    graph = {"polypythia.job.run": {"polypythia.driver.progress"}, "polypythia.driver.sweep": {"polypythia.job.worker"}}
    assert imports_up(graph) == ["polypythia.job.run -> polypythia.driver.progress"]


def test_at_most_12_top_level_modules_beside_the_wings():
    modules = sorted(p.name for p in (REPO / "polypythia").glob("*.py") if p.name != "__init__.py")
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, modules


def source_files() -> list[Path]:
    return sorted(p for package in ("polypythia", "analysis") for p in (REPO / package).rglob("*.py"))


def test_no_module_over_350_lines():
    long = {str(p.relative_to(REPO)): n for p in source_files() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long


def long_functions(source: str) -> dict[str, int]:
    """Functions (methods and nested ones too) longer than MAX_FUNCTION_LINES, def line to last line."""
    return {
        node.name: node.end_lineno - node.lineno + 1
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    }


def test_no_function_over_60_lines():
    long = {
        f"{p.relative_to(REPO)}:{name}": n for p in source_files() for name, n in long_functions(p.read_text()).items()
    }
    assert not long


def test_the_length_check_finds_a_long_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(f"def f():\n{body}\n") == {"f": MAX_FUNCTION_LINES + 1}
    assert long_functions("def g():\n    return 1\n") == {}


def test_the_team_notes_are_never_cited():
    tracked = subprocess.run(["git", "grep", "-l", "reference" + ".md"], cwd=REPO, capture_output=True, text=True)
    assert tracked.stdout == ""
