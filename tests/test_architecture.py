"""The import graph of ``src/fedmoe``: no cycles, and the layers import only downwards.

The graph is built from the source with :mod:`ast` (nothing is imported): every ``import`` /
``from … import`` statement counts, at module level, inside functions and inside
``if TYPE_CHECKING:`` blocks alike (a type-only import is still a dependency a reader follows).
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``;
the implicit import of parent packages is not an edge (importing ``a.b`` runs ``a/__init__``
first, which every package does).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: package layers, low to high: a module may import its own package and lower layers only
LAYERS: dict[str, float] = {
    "fedmoe": -1,  # the package itself (__version__, process policy): importable from anywhere
    "errors": 0,
    "faultspec": 1, "quiet": 1,
    "core": 2,
    "algorithms": 3,  # its __init__ holds the algorithm registry, which config reads
    "config_keys": 3.5,  # moved-key table and value checks: read by config and by readers of stored runs
    "config": 4,
    "data": 5, "moe": 5,
    "train": 6,
    "engine": 7, "report": 7, "outdir": 7, "progress": 7,
    "flower": 8, "export": 8,
    "cli": 9, "__main__": 9,
}
#: third-party packages the pure layers must not import (model code, adapters, transport)
IMPURE = ("transformers", "peft", "flwr", "torch.nn", "accelerate", "datasets")
PURE = ("fedmoe.algorithms", "fedmoe.core")


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for f in sorted((SRC / "fedmoe").rglob("*.py")):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


MODULES = _modules()


def _imports(name: str) -> list[str]:
    """Every absolute module name imported by module ``name`` (relative imports resolved)."""
    path, is_pkg = MODULES[name]
    package = name if is_pkg else name.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            found.extend(subs if len(subs) == len(node.names) else [base, *subs])
    return found


def _owner(target: str) -> str | None:
    """The project module ``target`` names (or lies in), None for third-party names."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        graph[name] = {o for t in _imports(name) if t.startswith("fedmoe") and (o := _owner(t)) and o != name}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components of more than one module, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    return sorted(comps)


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_graph_sees_function_level_and_type_checking_imports() -> None:
    graph = import_graph()
    # a function-level import (cli imports the Flower engine lazily) and a TYPE_CHECKING one
    assert any(m.startswith("fedmoe.flower") for m in graph["fedmoe.cli"])
    assert "fedmoe.engine.protocols" in graph["fedmoe.engine.strategies.base"]


def test_no_import_cycles() -> None:
    cycles = strongly_connected(import_graph())
    assert not cycles, "import cycles (strongly connected modules): " + "; ".join(" ↔ ".join(c) for c in cycles)


def test_every_layer_imports_only_downwards() -> None:
    unknown = sorted({_layer(m) for m in MODULES} - set(LAYERS) - {"fedmoe"})
    assert not unknown, f"new top-level modules need a layer in LAYERS: {unknown}"
    bad = []
    for src, targets in import_graph().items():
        for dst in targets:
            a, b = _layer(src), _layer(dst)
            if a != b and src != "fedmoe" and LAYERS[b] >= LAYERS[a]:
                bad.append(f"{src} -> {dst}")
    assert not bad, "imports against the layering: " + ", ".join(sorted(bad))


def test_only_flower_imports_flwr() -> None:
    bad = [m for m in MODULES if not m.startswith("fedmoe.flower")
           and any(t == "flwr" or t.startswith("flwr.") for t in _imports(m))]
    assert not bad, f"only fedmoe.flower may import flwr: {bad}"


@pytest.mark.parametrize("pure", PURE)
def test_pure_layers_import_no_model_or_transport_code(pure: str) -> None:
    bad = []
    for m in MODULES:
        if m == pure or m.startswith(pure + "."):
            bad += [f"{m}: {t}" for t in _imports(m) if any(t == x or t.startswith(x + ".") for x in IMPURE)]
    assert not bad, f"{pure} must stay pure: {bad}"
