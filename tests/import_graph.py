"""The project's import graph read from source (no module is imported): edges and cycles.

Module-level imports (those that run when the module is imported, including under ``if`` and
``try`` at module level) and function-level imports (inside a ``def``, run on first call) are
collected separately: a function-level import breaks no import-time cycle, but a cycle through one
still couples two modules both ways.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("optimize", "bench")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _targets(node: ast.AST, here: str, is_pkg: bool, known: set[str]) -> list[str]:
    """Project modules an import statement names (``from a import b`` names ``a.b`` when that is a module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parent = here.split(".") if is_pkg else here.split(".")[:-1]
            parent = parent[: len(parent) - (node.level - 1)]
            base = ".".join(parent + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    out = []
    for name in names:
        while name and name not in known:  # `import a.b.c` of a non-module attribute: its module
            name = name.rpartition(".")[0]
        if name and name.split(".")[0] in PACKAGES:
            out.append(name)
    return out


def _imports(tree: ast.AST, here: str, is_pkg: bool, known: set[str]) -> tuple[set[str], set[str]]:
    top: set[str] = set()
    inner: set[str] = set()

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (inner if in_function else top).update(_targets(child, here, is_pkg, known))
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                continue  # annotations only: never imported at run time
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(tree, False)
    return top - {here}, inner - {here} - top


def _is_type_checking(test: ast.AST) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, function-level edges), each ``{module: {imported project module}}``."""
    mods = modules()
    known = set(mods)
    top, inner = {}, {}
    for name, path in mods.items():
        top[name], inner[name] = _imports(ast.parse(path.read_text()), name, path.name == "__init__.py", known)
    return top, inner


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (each is at least one cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out
