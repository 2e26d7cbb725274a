"""The package's imports point only down the ladder declared in docs/architecture.md.

The checker reads the ladder table (one row per layer, modules in backticks, *optional* marking
modules that may be imported inside functions), walks every module's imports with ``ast``, and
reports imports that point up, function-level imports of non-optional modules, modules the table
does not place, and import cycles. It is tested on the real package and on a copy with a planted
upward import.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mmdistill"
TABLE = ROOT / "docs" / "architecture.md"


def read_ladder(table: Path) -> tuple[dict[str, int], set[str]]:
    """``({module: layer index}, optional modules)`` from the ladder table, bottom row first."""
    levels: dict[str, int] = {}
    optional: set[str] = set()
    rows = [line for line in table.read_text().splitlines() if line.startswith("| ")]
    for level, row in enumerate(rows[1:]):  # rows[0] is the header
        cells = row.split("|")[2]
        for name, mark in re.findall(r"`([\w/]+)`( \(\*optional\*\))?", cells):
            levels[name] = level
            if mark:
                optional.add(name)
    return levels, optional


def module_name(path: Path, package: Path) -> str:
    return path.relative_to(package).with_suffix("").as_posix()


def _target(node: ast.ImportFrom | ast.Import, name: str, package: Path) -> list[str]:
    """The package modules an import statement in module ``name`` reaches."""
    if isinstance(node, ast.Import):
        dotted = [a.name for a in node.names if a.name.split(".")[0] == package.name]
        return [d.split(".", 1)[1].replace(".", "/") if "." in d else "__init__" for d in dotted]
    if node.level == 0:
        if (node.module or "").split(".")[0] != package.name:
            return []
        base = (node.module or "").split(".")[1:]
    else:
        here = name.split("/")[:-1]
        if node.level > 1:
            here = here[: len(here) - (node.level - 1)]
        base = here + ((node.module or "").split(".") if node.module else [])
    found = []
    for alias in node.names:
        candidate = "/".join([*base, alias.name])
        if (package / f"{candidate}.py").exists() or (package / candidate).is_dir():
            found.append(
                candidate if (package / f"{candidate}.py").exists() else f"{candidate}/__init__"
            )
        elif base:
            stem = "/".join(base)
            found.append(stem if (package / f"{stem}.py").exists() else f"{stem}/__init__")
        else:
            found.append("__init__")
    return sorted(set(found))


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports_of(path: Path, package: Path) -> list[tuple[str, int, bool]]:
    """``(target module, line, inside a function)`` for each package import of ``path``."""
    name = module_name(path, package)
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    in_function.add(sub.lineno)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and node.lineno not in skip:
            for target in _target(node, name, package):
                if target != name:
                    found.append((target, node.lineno, node.lineno in in_function))
    return found


def ladder_violations(package: Path, table: Path) -> list[str]:
    """Every import of ``package`` that breaks the ladder in ``table``, as readable lines."""
    levels, optional = read_ladder(table)
    problems, graph = [], {}
    for path in sorted(package.rglob("*.py")):
        name = module_name(path, package)
        if name not in levels:
            problems.append(f"{name}: not placed in the ladder table")
            continue
        graph[name] = set()
        for target, line, in_function in imports_of(path, package):
            where = f"{name}.py:{line} imports {target}"
            if target not in levels:
                problems.append(f"{where}, which the ladder table does not place")
            elif levels[target] > levels[name]:
                problems.append(f"{where}, a higher layer")
            elif in_function and target not in optional:
                problems.append(f"{where} inside a function (only optional modules may be)")
            if not in_function:
                graph[name].add(target)
    problems.extend(_cycles(graph))
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    found: list[str] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append("import cycle: " + " -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_package_follows_the_ladder():
    assert ladder_violations(PACKAGE, TABLE) == []


def test_a_planted_upward_import_is_reported(tmp_path):
    copy = tmp_path / "mmdistill"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    mixer = copy / "mixer.py"
    mixer.write_text(mixer.read_text() + "\nfrom .trainer import distill  # planted\n")
    seeding = copy / "seeding.py"
    seeding.write_text(
        seeding.read_text() + "\n\ndef planted():\n    from .model import DecoderLM\n"
    )
    problems = ladder_violations(copy, TABLE)
    assert any(
        p.startswith("mixer.py:") and "imports trainer, a higher layer" in p for p in problems
    )
    assert any("seeding.py:" in p and "inside a function" in p for p in problems)
    assert any(p.startswith("import cycle:") for p in problems)


def test_an_unplaced_module_is_reported(tmp_path):
    copy = tmp_path / "mmdistill"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    (copy / "helpers.py").write_text("from .errors import DataError\n")
    assert "helpers: not placed in the ladder table" in ladder_violations(copy, TABLE)
