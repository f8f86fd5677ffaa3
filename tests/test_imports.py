"""No import cycles in the package: every module's imports (function-local ones included) form
a graph without cycles, so any module can be imported first and the order never matters."""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path

import layercake

ROOT = "layercake"


def package_modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> source file (a package's ``__init__.py``)."""
    out = {ROOT: Path(layercake.__file__)}
    for info in pkgutil.walk_packages(layercake.__path__, ROOT + ".", onerror=lambda name: None):
        spec = importlib.util.find_spec(info.name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            out[info.name] = Path(spec.origin)
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _type_checking(node: ast.AST) -> bool:
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _nodes(tree: ast.AST):
    """Every node, skipping ``if TYPE_CHECKING:`` bodies (never executed)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if _type_checking(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that importing ``name`` can run: each imported module, the packages
    above it that are not above ``name`` (their ``__init__`` runs first), and for ``from X import
    y`` the module X.y when y is one."""
    is_pkg = path.name == "__init__.py"
    base = name if is_pkg else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in _nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                mod = f"{anchor}.{node.module}" if node.module else anchor
            else:
                mod = node.module or ""
            targets.add(mod)
            targets.update(f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules)
    above = set(_ancestors(name)) | {name}
    out = set()
    for t in targets:
        if t not in modules:
            continue
        out.add(t)
        out.update(p for p in _ancestors(t) if p not in above)
    out.discard(name)
    return out


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path back to its start) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    sccs: list[set[str]] = []

    def strong(v: str) -> None:  # Tarjan, recursive: the graph is a few hundred nodes
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(comp)

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return [_cycle_in(graph, comp) for comp in sccs]


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first back to it)."""
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_walks_the_whole_package():
    graph = import_graph()
    assert {"layercake.cli", "layercake.offload.executor", "layercake.pipeline.stage"} <= set(graph)
    assert "layercake.config" in graph["layercake.llm"]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_finds_a_cycle(tmp_path):
    """The checker itself: a function-local relative import closing a loop is a cycle, and
    importing a submodule counts its package's ``__init__``."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("from .b import f\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    (pkg / "sub" / "c.py").write_text("import torch\n")
    modules = {"pkg": "__init__", "pkg.a": "a", "pkg.sub": "sub/__init__", "pkg.sub.b": "sub/b",
               "pkg.sub.c": "sub/c"}  # fmt: skip
    modules = {n: tmp_path / "pkg" / f"{f}.py" for n, f in modules.items()}
    graph = {n: imports_of(n, p, modules) for n, p in modules.items()}
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.c"}
    assert graph["pkg.sub"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg", "pkg.a"}
    assert graph["pkg.sub.c"] == set()
    assert find_cycles(graph) == [["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.a"]]
    (pkg / "sub" / "__init__.py").write_text("")
    graph = {n: imports_of(n, p, modules) for n, p in modules.items()}
    assert find_cycles(graph) == []  # only through the package's __init__ was there one
