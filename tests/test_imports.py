"""dsft's import graph reads one way: no cycles (counting imports inside functions, which only hide a cycle until
the function runs) and nothing imports the CLI. Read from the source (AST), nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "dsft"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST, importer: str, is_package: bool):
    """Every import statement's target module names, at any depth (functions, try blocks), except under
    ``if TYPE_CHECKING:``: those never run, so they cannot form a cycle at run time."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking_block(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importer's package
                base = importer.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield from ((module, alias.name) for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's own modules it imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps = set()
        for module, member in _imports(ast.parse(path.read_text(encoding="utf-8")), name,
                                       path.name == "__init__.py"):
            if member and f"{module}.{member}" in files:
                deps.add(f"{module}.{member}")
            elif module in files and not name.startswith(module + "."):  # a parent package is already loaded
                deps.add(module)
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_dsft_import_graph_has_no_cycle():
    graph = import_graph(PACKAGE)
    assert {"dsft.cli", "dsft.run", "dsft.config", "dsft.slurm.job"} <= set(graph)  # the walk saw the package
    assert "dsft.run" in graph["dsft.slurm.job"]  # deferred imports are counted
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_imports_the_cli():
    """The CLI is the top layer: the library, the Slurm worker, launch scripts and benchmarks use dsft.run and
    the library; only ``python -m dsft`` (dsft/__main__.py) starts the CLI. Tests may import it."""
    offenders = [name for name, deps in import_graph(PACKAGE).items() if "dsft.cli" in deps and name != "dsft.__main__"]
    for folder in ("launch", "bench"):
        for path in (REPO / folder).glob("*.py"):
            for module, member in _imports(ast.parse(path.read_text(encoding="utf-8")), path.stem, False):
                if module == "dsft.cli" or (module == "dsft" and member == "cli"):
                    offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_cycle_detection_sees_deferred_imports(tmp_path):
    """The checks above could fail: a cycle through an import inside a function is found, a TYPE_CHECKING-only
    import is not an edge, and ``from pkg import sub`` resolves to the submodule."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg import c\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == set()
    assert find_cycle(graph) is None
    (pkg / "c.py").write_text("def g():\n    from .sub.b import f\n")  # relative and deferred
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"pkg.c", "pkg.sub.b"}
