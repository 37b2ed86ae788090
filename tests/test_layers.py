"""The package shows its layers: every module but the shared three lives in its layer's folder, and
imports only go down (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import poprt_lite

PACKAGE = Path(poprt_lite.__file__).parent
# Bottom to top; a unit may import the units of lower layers only (not its peers).
LAYERS = (
    ("errors", "vocab"),
    ("ops",),
    ("ir",),
    ("patterns", "runtime"),
    ("passes",),
    ("compiler",),
    ("compat", "apps", "tools", "bench"),
    ("cli",),
)
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str:
    """`poprt_lite.passes.registry` -> `passes`; the root package itself -> `poprt_lite`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def import_graph(package: Path) -> nx.DiGraph:
    """Which unit (root module or folder) imports which, from every import statement, function-level
    ones included; the root `__init__.py` (the public API on top of everything) is left out."""
    graph = nx.DiGraph()
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        if parts == ("__init__",):
            continue
        source = parts[0]
        graph.add_node(source)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "poprt_lite":
                # the version is defined first in the root's __init__, before it imports anything
                modules = [f"poprt_lite.{alias.name}" for alias in node.names if alias.name != "__version__"]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                modules = []
            for module in modules:
                if module.split(".")[0] == "poprt_lite" and _unit(module) != source:
                    graph.add_edge(source, _unit(module))
    return graph


def test_root_holds_only_the_public_api_errors_and_vocabulary():
    assert sorted(path.name for path in PACKAGE.glob("*.py")) == ["__init__.py", "errors.py", "vocab.py"]


def test_every_unit_has_a_layer():
    assert set(import_graph(PACKAGE).nodes) == set(RANK)


def test_imports_only_go_down():
    graph = import_graph(PACKAGE)
    assert list(nx.simple_cycles(graph)) == []
    upward = [(a, b) for a, b in graph.edges if RANK.get(b, len(LAYERS)) >= RANK[a]]
    assert upward == []


def test_an_upward_import_is_found(tmp_path):
    """The check itself: a runtime module importing a pass, even inside a function, is caught."""
    for unit in ("runtime", "passes"):
        (tmp_path / unit).mkdir()
        (tmp_path / unit / "__init__.py").write_text("")
    (tmp_path / "passes" / "p.py").write_text("from poprt_lite.runtime import modes\n")
    (tmp_path / "runtime" / "r.py").write_text("def f():\n    from poprt_lite.passes import p\n")
    graph = import_graph(tmp_path)
    assert sorted(graph.edges) == [("passes", "runtime"), ("runtime", "passes")]
    assert list(nx.simple_cycles(graph)) != []
