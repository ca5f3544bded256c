"""The package's layering, read from the source: the runtime imports nothing from the simulator or the
bench harness (the cost model both share lives in ``moecache.cost``), and no two modules import each
other, directly or around a circle, counting function-local imports too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"moecache": ROOT / "moecache", "moecache.policies": ROOT / "policies",
                "moecache.predictors": ROOT / "predictors"}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for prefix, base in PACKAGE_DIRS.items():
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            if prefix == "moecache" and parts and parts[0] in ("policies", "predictors"):
                continue  # installed from the top-level folders
            out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of this package that ``name`` imports anywhere in its body (resolved to the deepest module)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names
                       if f"{mod}.{a.name}" != "moecache._C"]  # the compiled extension: no Python source
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {n: _imports(n, p, modules) for n, p in modules.items()}


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for m in graph[todo.pop()]:
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_runtime_imports_nothing_from_the_simulator_or_the_bench():
    graph = _graph()
    for name in graph:
        if name.startswith("moecache.runtime"):
            bad = sorted(m for m in _reach(graph, name) if m.startswith(("moecache.sim", "moecache.bench")))
            assert not bad, f"{name} reaches {bad}"


def test_no_import_circles():
    graph = _graph()
    circles = sorted(name for name in graph if name in _reach(graph, name))
    assert not circles, f"modules on an import circle: {circles}"
