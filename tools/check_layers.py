"""Check the package's shape: no import cycle among its modules, and no
module reading another object's underscored attributes.

    python tools/check_layers.py [PACKAGE_DIR]

Imports are followed wherever they are written: at the top, inside a
function, or under ``if TYPE_CHECKING:`` (a cycle for the type checker is a
cycle for the reader too).  An underscored attribute may be read only
through ``self`` or ``cls``; the named tuple's own API (``_replace``,
``_asdict``, ``_fields``, ``_make``) is public despite its underscore.
Exits 1 and prints each finding as ``path:line: what``; 0 when clean.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

NAMED_TUPLE_API = {"_replace", "_asdict", "_fields", "_make"}
PACKAGE = Path(__file__).resolve().parent.parent / "wschat"


def imported_modules(tree: ast.AST, package: str, modules: set[str]) -> dict[str, int]:
    """The package's modules that ``tree`` imports, each with the line of its first import."""
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or node.module == package:  # from . import x / from .x import y / from package import x
                base = node.module if node.level == 1 else None
                if base:
                    names.append(base.split(".")[0])
                else:
                    names.extend(alias.name for alias in node.names)
            elif node.module and node.module.startswith(package + "."):
                names.append(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.extend(alias.name.split(".")[1] for alias in node.names if alias.name.startswith(package + "."))
        for name in names:
            if name in modules:
                found.setdefault(name, node.lineno)
    return found


def private_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """Each ``x._name`` where ``x`` is not ``self`` or ``cls``."""
    reads = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or name.startswith("__") or name in NAMED_TUPLE_API:
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        reads.append((node.lineno, ast.unparse(node)))
    return reads


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph.get(module, {}):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return groups


def check(package_dir: Path) -> list[str]:
    """What is wrong with the package in ``package_dir``, one line each."""
    package = package_dir.name
    paths = {path.stem: path for path in sorted(package_dir.glob("*.py"))}
    modules = set(paths)
    trees = {name: ast.parse(path.read_text(encoding="utf-8"), str(path)) for name, path in paths.items()}
    problems = []
    graph = {}
    for name, tree in trees.items():
        graph[name] = {other: line for other, line in imported_modules(tree, package, modules).items() if other != name}
        problems += [f"{paths[name]}:{line}: reads another object's private attribute: {text}"
                     for line, text in private_reads(tree)]
    for group in find_cycles(graph):
        edges = ", ".join(f"{a} -> {b} ({paths[a].name}:{graph[a][b]})"
                          for a in group for b in sorted(graph[a]) if b in group)
        problems.append(f"{package_dir}: import cycle among {', '.join(group)}: {edges}")
    return problems


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", type=Path, default=PACKAGE, help="the package's folder (default: wschat)")
    problems = check(parser.parse_args(argv).package)
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
