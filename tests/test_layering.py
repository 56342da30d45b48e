"""The package layering, read statically from the source: alignment < reward < annotation < serving.

Every import counts, wherever it is written (module top, inside a function, under
TYPE_CHECKING), because a lazy import is still a dependency: hiding one in a function only
moves the failure to run time. Two rules: no import runs up the layers, and no cycle between
modules.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[1]
LAYERS = ("alignment", "reward", "annotation", "serving")  # bottom to top


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (one of ours)
    where: str  # file:line


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is one of our modules (None: not ours)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    found: dict[Import, None] = {}  # ordered and deduplicated (`from m import a, b` is one edge)
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule when there is one, else a name in pkg.
            names = [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"] or [base]
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                found[Import(module, target, f"{where}:{node.lineno}")] = None
    return list(found)


def _graph() -> list[Import]:
    modules = _modules()
    return [edge for module, path in modules.items() for edge in _imports(module, path, modules)]


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_no_import_runs_up_the_layers() -> None:
    upward = [e for e in _graph() if _layer(e.target) > _layer(e.source)]
    report = "\n".join(
        f"{e.where}: {e.source} imports {e.target} ({LAYERS[_layer(e.target)]} is above {LAYERS[_layer(e.source)]})"
        for e in upward
    )
    assert not upward, f"{len(upward)} upward import(s):\n{report}"


def _cycles(edges: list[Import]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return components


def test_no_import_cycles() -> None:
    edges = _graph()
    cycles = _cycles(edges)
    lines = []
    for component in cycles:
        members = set(component)
        inside = [e for e in edges if e.source in members and e.target in members]
        lines.append(" <-> ".join(component))
        lines += [f"    {e.where}: {e.source} -> {e.target}" for e in inside]
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(lines)


def test_the_checker_sees_lazy_relative_and_from_imports(tmp_path: Path) -> None:
    """The walk itself: a function-level import, a relative import and `from pkg import module`."""
    source = (
        "def f():\n    from serving import commands\n    from . import trainer\n    import reward.scorer\n"
    )
    path = tmp_path / "mod.py"
    path.write_text(source)
    modules = _modules()
    found = {e.target for e in _imports("reward.cli", path, modules)}
    assert found == {"serving.commands", "reward.trainer", "reward.scorer"}
    assert _layer("serving.commands") > _layer("reward.cli")  # so that first one is reported as upward
    assert _cycles([Import("a", "b", ""), Import("b", "c", ""), Import("c", "a", "")]) == [["a", "b", "c"]]
