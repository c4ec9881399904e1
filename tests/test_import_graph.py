"""The import graph of `star_elastic` has no cycle, counting imports inside functions too.

Built from the source with `ast` (nothing is imported): every `import` / `from ... import` anywhere
in a module, relative imports resolved, `from package import module` counted as an edge to the
module. Importing a module also runs its parents' `__init__`; that implicit edge is not counted
(a package's `__init__` re-exporting its own submodules would otherwise always close a loop).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "star_elastic"


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name → source file, for every module of the package in folder `root`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute name `from <...> import` refers to (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    """Package modules that `module` imports, at module level or inside functions."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(node, module, is_package)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.add(sub if sub in modules else source)
    return {name for name in found if name in modules and name != module}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module → the package modules it imports."""
    files = module_files(root)
    return {module: imports_of(module, path, set(files)) for module, path in files.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The modules of each strongly connected component with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def closed_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest loop through the component's first module (breadth-first within the component)."""
    start = min(component)
    parent = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def test_graph_sees_function_level_and_relative_imports(tmp_path):
    """The parser against a hand-written package: every import form gives the edge it should."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import X\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from .. import top\n")
    (pkg / "top.py").write_text("import os\nimport pkg.sub\n\ndef g():\n    from pkg.sub import leaf\n")
    (pkg / "other.py").write_text("from pkg.sub import X\n")
    graph = import_graph(pkg)
    assert graph == {"pkg": set(), "pkg.sub": {"pkg.sub.leaf"}, "pkg.sub.leaf": {"pkg.top"},
                     "pkg.top": {"pkg.sub", "pkg.sub.leaf"}, "pkg.other": {"pkg.sub"}}
    assert circles(graph) == [["pkg.sub", "pkg.sub.leaf", "pkg.top"]]
    assert closed_path(graph, {"pkg.sub", "pkg.sub.leaf", "pkg.top"}) == ["pkg.sub", "pkg.sub.leaf", "pkg.top", "pkg.sub"]


def test_star_elastic_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "star_elastic.hf" in graph["star_elastic.elastic.run"]  # the parser sees the package
    found = circles(graph)
    assert not found, "import circles in star_elastic:\n" + "\n".join(
        f"{', '.join(c)} (for example {' → '.join(closed_path(graph, set(c)))})" for c in found)
