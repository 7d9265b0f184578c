"""The layers point one way: every import of core/, bridge/ and adapters/ obeys the rules
below (top-level imports and those inside functions alike), and the layers have no cycle."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "bridge", "adapters")

# Each layer, and the layers it may import (itself included). The longest prefix names a
# module's layer. `None`: any layer.
RULES: dict[str, frozenset[str] | None] = {
    "bridge.contract": frozenset({"bridge.contract"}),
    "core": frozenset({"core", "bridge.contract"}),
    "bridge.server": frozenset({"bridge.server", "core", "bridge.contract"}),
    "bridge.client": frozenset({"bridge.client", "bridge.contract"}),
    "adapters": frozenset({"adapters", "bridge.client", "bridge.contract"}),
    "adapters.slack": frozenset({"adapters", "bridge.client", "bridge.contract"}),
    "adapters.discord": frozenset({"adapters", "bridge.client", "bridge.contract"}),
    "bridge.standin": frozenset({"bridge.standin"}),
    "bridge.cli": None,
    "bridge": frozenset({"bridge"}),  # bridge/__init__.py only
}
# What one platform's adapter may never import of the other.
STRANGERS = {"adapters.slack": "adapters.discord", "adapters.discord": "adapters.slack"}


def layer_of(module: str) -> str | None:
    """The layer a module belongs to (the longest rule that is a prefix of it)."""
    matches = [name for name in RULES if module == name or module.startswith(name + ".")]
    return max(matches, key=len) if matches else None


def _modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def _imports(module: str, path: Path) -> Iterator[tuple[int, str]]:
    """Every module this file imports, with its line: `import a.b`, `from a import b` (as
    `a.b`, since `b` may be a module), relative imports resolved; anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def _ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _allowed(source: str, target: str) -> bool:
    allowed = RULES[source]
    if allowed is None:
        return True
    stranger = STRANGERS.get(source)
    if stranger is not None and (target == stranger or target.startswith(stranger + ".")):
        return False
    return any(target == name or target.startswith(name + ".") for name in allowed)


def _edges() -> list[tuple[str, str, str, int, str]]:
    """(source layer, target layer, file, line, imported module) for every import of ours."""
    edges = []
    for module, path in _modules():
        source = layer_of(module)
        assert source is not None, f"{path}: a module outside every layer"
        for line, name in _imports(module, path):
            if not _ours(name):
                continue
            target = layer_of(name)
            # `from bridge import x` names the package `bridge` (nothing of a layer).
            if target is None or name in PACKAGES:
                continue
            edges.append((source, target, str(path.relative_to(ROOT)), line, name))
    return edges


def test_every_import_obeys_the_layer_rules() -> None:
    broken: dict[tuple[str, int], str] = {}  # one report per import statement
    for source, target, path, line, name in _edges():
        if not _allowed(source, name):
            broken.setdefault((path, line), f"{path}:{line} ({source}) imports {name} ({target})")
    assert not broken, "imports that break the layers:\n" + "\n".join(broken.values())


def test_the_layers_have_no_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for source, target, *_ in _edges():
        if source != target:
            graph.setdefault(source, set()).add(target)

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        for nxt in sorted(graph.get(node, ())):
            found = cycle_from(nxt, [*path, node])
            if found:
                return found
        return None

    for start in sorted(graph):
        found = cycle_from(start, [])
        assert found is None, "a cycle between layers: " + " → ".join(found or [])


@pytest.mark.parametrize(
    ("source", "name", "ok"),
    [
        ("bridge.contract", "core.ids", False),
        ("core", "bridge.contract.events", True),
        ("core", "bridge.server.sse", False),
        ("bridge.client", "core.events", False),
        ("adapters.slack", "adapters.discord.follow", False),
        ("adapters.slack", "adapters.render", True),
        ("adapters", "bridge.server.app", False),
        ("bridge.standin", "bridge.contract.models", False),
        ("bridge.cli", "adapters.slack.app", True),
    ],
)
def test_the_rules_catch_what_they_should(source: str, name: str, ok: bool) -> None:
    assert _allowed(source, name) is ok
