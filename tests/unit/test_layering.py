"""Imports flow one way: data → detector / embedder / index → explain → training / pipeline → compare / demo → cli,
and no modules import each other round a circle at any level (inside a package too).

Static inspection: every ``carsearch`` module is parsed with ``ast`` and every ``carsearch.*`` import in it,
function-level (lazy) and ``TYPE_CHECKING`` ones included, must name its own unit or a lower layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "carsearch"

# Lowest layer first. A unit is a module or package; a module belongs to the longest unit that contains it.
# Units of the bottom layer may import each other; above it, a unit imports itself and lower layers only.
LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "carsearch",  # the package's own __init__ only
        "carsearch.config",
        "carsearch.config_files",
        "carsearch.data",
        "carsearch.errors",
        "carsearch.lazy",
        "carsearch.metrics",
        "carsearch.runtime",
        "carsearch.types",
    ),
    ("carsearch.detector", "carsearch.embedder", "carsearch.index"),
    ("carsearch.explain",),  # explains an embedder
    ("carsearch.embedder.training", "carsearch.pipeline"),
    ("carsearch.compare", "carsearch.demo"),
    ("carsearch.cli",),  # dispatches to everything, the demo and the experiment included
)
LAYER = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str | None:
    """The longest listed unit containing ``module`` (the root unit holds only ``carsearch`` itself)."""
    matches = [u for u in LAYER if module == u or (u != "carsearch" and module.startswith(u + "."))]
    return max(matches, key=len, default=None)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
PACKAGES = {module_name(path) for path in PACKAGE.rglob("__init__.py")}


def carsearch_imports(module: str, source: str) -> list[tuple[int, str]]:
    """(line, imported module) for every ``carsearch`` import anywhere in ``source``, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = (module if module in PACKAGES else module.rpartition(".")[0]).split(".")
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            # ``from carsearch import pipeline`` imports the sub-package; ``from x import Name`` imports x.
            found += [(node.lineno, f"{base}.{a.name}" if f"{base}.{a.name}" in SOURCES else base) for a in node.names]
    return [(line, name) for line, name in found if name == "carsearch" or name.startswith("carsearch.")]


def violations(sources: dict[str, str]) -> list[str]:
    """One line per import that points up, or sideways into another unit of the same layer (bottom excepted)."""
    problems = []
    for module, source in sources.items():
        here = unit_of(module)
        for line, target in carsearch_imports(module, source):
            there = unit_of(target)
            if here is None or there is None or there == here:
                continue
            if LAYER[there] > LAYER[here] or (LAYER[there] == LAYER[here] > 0):
                problems.append(f"{module}:{line} imports {target} (layer {LAYER[there]} from layer {LAYER[here]})")
    return problems


def test_every_module_has_a_layer():
    unplaced = [m for m in SOURCES if unit_of(m) is None]
    assert not unplaced, f"place these modules in LAYERS: {unplaced}"


def test_imports_flow_downwards():
    problems = violations({module: path.read_text() for module, path in SOURCES.items()})
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_the_check_sees_lazy_relative_and_sideways_imports():
    lazy_up = "def f():\n    from carsearch.pipeline import Pipeline\n"
    assert violations({"carsearch.data.sources": lazy_up}) == [
        "carsearch.data.sources:2 imports carsearch.pipeline (layer 3 from layer 0)"
    ]
    assert violations({"carsearch.data.cropping": "from carsearch import detector\n"})
    assert violations({"carsearch.embedder.model": "import carsearch.embedder.training.run\n"})
    assert violations({"carsearch.index.gallery": "from carsearch.embedder import Embedder\n"})  # same layer
    assert violations({"carsearch.pipeline.local_engine": "from ..compare import compare\n"})  # relative, upwards
    assert not violations({"carsearch.embedder.training.data": "from carsearch.data.cropping import plan_image\n"})
    assert not violations({"carsearch.data.cropping": "from carsearch.config import PipelineConfig\n"})


def import_circles(sources: dict[str, str]) -> list[list[str]]:
    """Every set of modules that import each other round a circle (strongly connected components of the
    import graph, lazy and ``TYPE_CHECKING`` imports included), at any level: inside a package too.

    A package ``__init__`` importing its own submodules is no circle: a submodule's import of a sibling is an
    edge to that sibling, not to the ``__init__``.
    """
    graph = {m: sorted({t for _, t in carsearch_imports(m, s) if t != m and t in sources}) for m, s in sources.items()}
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        order[node] = low[node] = len(order)
        stack.append(node)
        for target in graph[node]:
            if target not in order:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], order[target])
        if low[node] == order[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in order:
            visit(module)
    return circles


def test_no_import_circle_at_any_level():
    circles = import_circles({module: path.read_text() for module, path in SOURCES.items()})
    assert not circles, "modules that import each other round a circle:\n" + "\n".join(map(str, circles))


def test_the_circle_check_sees_a_lazy_circle_inside_a_package():
    sources = {module: path.read_text() for module, path in SOURCES.items()}
    sources["carsearch.pipeline.loaded_models"] += "\ndef f():\n    from carsearch.pipeline.pipeline import Pipeline\n"
    (circle,) = import_circles(sources)
    assert {"carsearch.pipeline.loaded_models", "carsearch.pipeline.pipeline"} <= set(circle)
    typed = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from carsearch.pipeline.index_job import IndexJob\n"
    )
    sources = {module: path.read_text() for module, path in SOURCES.items()}
    sources["carsearch.pipeline.outcomes"] += typed
    (circle,) = import_circles(sources)
    assert {"carsearch.pipeline.index_job", "carsearch.pipeline.outcomes"} <= set(circle)
