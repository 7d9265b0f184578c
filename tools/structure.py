"""The code's shape, for the README's design notes: lines per package, the biggest
classes by methods, and import cycles between packages.

    python tools/structure.py [ROOT]
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOTS = ("core", "bridge", "adapters")


def package_of(module: str) -> str:
    """A module's package at the depth the layers are drawn: `bridge.server`, `core`…"""
    parts = module.split(".")
    if parts[0] == "bridge" and len(parts) > 1:
        return ".".join(parts[:2])
    if parts[0] == "adapters" and len(parts) > 1 and parts[1] in ("slack", "discord"):
        return ".".join(parts[:2])
    return parts[0]


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for top in ROOTS:
        for path in sorted((root / top).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name for name in names if name.split(".")[0] in ROOTS}


def cycles(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Pairs of packages that reach each other."""

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reached = {package: reach(package) for package in edges}
    return sorted((a, b) for a in edges for b in reached[a] if a < b and a in reached.get(b, set()))


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    lines: dict[str, int] = defaultdict(int)
    edges: dict[str, set[str]] = defaultdict(set)
    classes: list[tuple[int, str]] = []
    for name, path in modules(root).items():
        text = path.read_text()
        tree = ast.parse(text)
        package = package_of(name)
        lines[package] += len(text.splitlines())
        for target in imports(tree):
            if package_of(target) != package:
                edges[package].add(package_of(target))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                methods = [
                    n for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
                ]
                classes.append((len(methods), f"{name}.{node.name}"))
    print("| package | lines |\n|---|---|")
    for package in sorted(lines):
        print(f"| {package} | {lines[package]} |")
    print("\n| biggest classes | methods |\n|---|---|")
    for count, name in sorted(classes, reverse=True)[:6]:
        print(f"| {name} | {count} |")
    found = cycles(edges)
    print(f"\npackage cycles: {len(found)}" + "".join(f"\n- {a} <-> {b}" for a, b in found))


if __name__ == "__main__":
    main()
