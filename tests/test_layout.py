"""The layout: the library's import graph has no cycle and never reaches into ``app/`` (which
builds on the library, not the other way round), and a loss term lives in one table."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function, relative imports resolved."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # ``from . import batch`` names a module
    return found


def library_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in (REPO / "dreamfusion").rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_library_imports_nothing_from_app():
    offenders = {str(p.relative_to(REPO)): sorted(m for m in imports_of(p) if m == "app" or m.startswith("app."))
                 for p in (REPO / "dreamfusion").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_import_graph_has_no_cycle():
    graph = library_graph()
    assert "dreamfusion.batch.run" in graph and "dreamfusion.pipeline" in graph["dreamfusion.batch.run"]
    assert "dreamfusion.pipeline" in graph["dreamfusion.cli"] and "dreamfusion.cli" not in graph["dreamfusion.batch.run"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_loss_weight_has_its_term_and_every_term_its_weight():
    """The loss table is one place: each ``*_weight`` of OptimConfig scales exactly one term of
    ``loss_terms`` and a term with weight 0 is left out."""
    from dataclasses import fields, replace

    from dreamfusion.config import OptimConfig
    from dreamfusion.losses import loss_terms

    names = [f.name for f in fields(OptimConfig) if f.name.endswith("_weight")]
    cfg = replace(OptimConfig(), orientation_ramp=0.0, **{name: 10.0 + i for i, name in enumerate(names)})
    terms = loss_terms(cfg, signed_distance=True)
    assert sorted(t.weight(1.0) for t in terms) == [10.0 + i for i in range(len(names))]
    assert {t.name: t.weight(0.5) for t in terms} == {name.removesuffix("_weight"): getattr(cfg, name) for name in names}
    assert loss_terms(replace(cfg, **{name: 0.0 for name in names}), signed_distance=True) == []
