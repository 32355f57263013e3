"""The package's import graph has no cycle: each module imports only modules below it;
and no module unpickles, evaluates or imports code it is given at run time.

Imports inside functions count too: a deferred import that climbs back up the order
(the registry importing the blocks that register themselves in it) is a cycle that
only hides until the function runs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import attnzoo
from tests._helpers.paths import REPO

ROOT = Path(attnzoo.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(name: str) -> bool:
    return (ROOT.parent / name.replace(".", "/") / "__init__.py").is_file()


def _exists(name: str) -> bool:
    return _is_package(name) or (ROOT.parent / (name.replace(".", "/") + ".py")).is_file()


def _type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _targets(module: str, node: ast.stmt) -> set[str]:
    """The attnzoo modules that a module-level import statement runs."""
    package = module if _is_package(module) else module.rpartition(".")[0]
    found: set[str] = set()
    if isinstance(node, ast.Import):
        found = {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = package.split(".")
            base = base[:len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        found = {target} | {f"{target}.{a.name}" for a in node.names}
    out = set()
    for name in found:
        parts = name.split(".")
        # Importing a.b.c runs the package a.b on the way, unless the importer lies inside
        # it (its packages are already running, the root's too).
        for i in range(2, len(parts) + 1):
            prefix = ".".join(parts[:i])
            inside = module == prefix or module.startswith(prefix + ".")
            if prefix.startswith("attnzoo.") and _exists(prefix) and not inside:
                out.add(prefix)
    return out


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = {id(n) for node in ast.walk(tree) if _type_checking(node)
                   for n in ast.walk(node)}
        graph[name] = {target for node in ast.walk(tree) if id(node) not in skipped
                       and isinstance(node, ast.Import | ast.ImportFrom)
                       for target in _targets(name, node)}
    return graph


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


def test_the_graph_sees_the_packages_imports() -> None:
    graph = import_graph()
    assert "attnzoo.registry" in graph["attnzoo.blocks.channel"]
    assert {"attnzoo.blocks", "attnzoo.architectures"} <= graph["attnzoo"]
    assert graph["attnzoo.registry"] <= {"attnzoo.errors"}  # a leaf: names only


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_attnzoo_modules() -> None:
    cycle = find_cycle({k: v for k, v in import_graph().items() if k != "attnzoo"})
    assert cycle is None, " -> ".join(cycle)


def test_no_unpickling_eval_or_dynamic_import_in_the_package():
    banned = re.compile(r"torch\.load\(|pickle\.loads?\(|(?<![.\w])(?:eval|exec)\(|"
                        r"import_module\(|__import__\(|yaml\.load\(|yaml\.unsafe_load|"
                        r"yaml\.full_load|Loader=yaml\.(?:Full|Unsafe)?Loader\b")
    root = REPO / "attnzoo"
    for path in root.rglob("*.py"):
        hits = banned.findall(path.read_text(encoding="utf-8"))
        assert not hits, f"{path} uses {hits}"

