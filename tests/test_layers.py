"""Layers point one way, and no module imports itself back through others.

Every ``import`` of a medseg module (module-level and inside functions) is read from the source; a
module may import modules of its own layer or of lower layers only, and the modules' import graph has no
cycles. See docs/architecture.md for the picture.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import medseg

ROOT = Path(medseg.__file__).parent

LAYERS: list[tuple[str, set[str]]] = [
    ("core", {"_version", "errors", "units", "names", "types", "registry", "config", "labels"}),
    ("io", {"io"}),
    ("data, models, losses, metrics", {"data", "models", "losses", "metrics"}),
    ("runtime, report, evaluation", {"runtime", "report", "evaluation"}),
    ("inference", {"inference"}),
    ("training", {"training"}),
    ("cli", {"cli", "__main__", ""}),  # "" is the package itself (medseg/__init__.py)
]
RANK = {pkg: rank for rank, (_, pkgs) in enumerate(LAYERS) for pkg in pkgs}


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The medseg module an imported name lives in (``medseg.io.load_volume`` -> ``medseg.io``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module -> the medseg modules it imports (anywhere in its source)."""
    graph: dict[str, set[str]] = {}
    for mod, path in MODULES.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            targets |= {t for n in names if n.startswith("medseg") and (t := _resolve(n)) and t != mod}
        graph[mod] = targets
    return graph


def _package(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def backward_arrows(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for every import of a higher layer."""
    bad = []
    for mod, targets in sorted(graph.items()):
        for t in sorted(targets):
            if RANK[_package(t)] > RANK[_package(mod)]:
                bad.append(f"{mod} -> {t}")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_package_has_a_layer() -> None:
    assert {_package(m) for m in MODULES} <= set(RANK)


def test_no_backward_arrows() -> None:
    assert backward_arrows(import_graph()) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


@pytest.mark.parametrize(
    ("graph", "arrows", "loops"),
    [
        ({"medseg.io": {"medseg.training"}, "medseg.training": set()}, ["medseg.io -> medseg.training"], []),
        (
            {"medseg.data.a": {"medseg.data.b"}, "medseg.data.b": {"medseg.data.a"}},
            [],
            [["medseg.data.a", "medseg.data.b"]],
        ),
        ({"medseg.training": {"medseg.inference"}, "medseg.inference": set()}, [], []),
    ],
)
def test_the_checks_catch_what_they_should(
    graph: dict[str, set[str]], arrows: list[str], loops: list[list[str]]
) -> None:
    assert backward_arrows(graph) == arrows
    assert cycles(graph) == loops
