"""The package map: no import circles between modules, and no package importing one above it.

Read from the source with `ast`, imports inside functions included, so a lazy import cannot
hide a circle. The layer order is the architecture CONTRIBUTING.md's package map draws.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
KIT = ROOT / "glmkit"

# Bottom to top: a package may import its own modules and any package listed before it.
LAYERS = ["config", "hub", "run", "model", "data", "train", "plan", "launch", "demo", "dashboard"]


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def kit_modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in KIT.rglob("*.py")}


def imports_of(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The kit modules this file imports, at any depth of the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            # `from glmkit.data import rows` names a module; `from glmkit.data.rows import Rows` names its member
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target != "glmkit":
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = kit_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def test_every_module_is_in_a_layered_package():
    loose = [name for name in kit_modules() if name != "glmkit" and package_of(name) not in LAYERS]
    assert not loose, f"modules outside the package map (tests/test_layout.py LAYERS): {loose}"


def test_no_package_imports_a_higher_one():
    upward = []
    for module, targets in import_graph().items():
        if module == "glmkit":
            continue
        mine = LAYERS.index(package_of(module))
        for target in targets:
            theirs = LAYERS.index(package_of(target))
            if theirs > mine:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports of a higher package:\n" + "\n".join(sorted(upward))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set(), "c": {"a"}}, None),
])
def test_the_circle_finder_finds_circles(graph, expected):
    assert find_cycle(graph) == expected
