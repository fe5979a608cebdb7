"""The house rules of the package, read from its source (no import is run): the rooms (stages of the
pipeline) in data-flow order, no import circle between modules, no import from a lower room into a higher
one, at most eight modules directly in ``vitgraph/``, modules and functions of bounded size.

The order is the one ``docs/architecture.md`` opens with; a room may import its own modules and those of
any room before it. Function-level (lazy) imports count: they are imports all the same."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
ROOT = Path(__file__).resolve().parents[1]
# (package directory, dotted name) -- passes/ and targets/ are installed as vitgraph.passes / vitgraph.targets
SOURCES = {"vitgraph": "vitgraph", "passes": "vitgraph.passes", "targets": "vitgraph.targets"}
ROOMS = [
    "vitgraph.errors", "vitgraph.meta", "vitgraph.spec",      # the ground floor: errors, typed meta, the spec
    "vitgraph.capture",     # model -> one fx dialect
    "vitgraph.targets",     # a GraphModule -> ONNX / torch.compile / .pt2, and timing them
    "vitgraph.analysis",    # the dialect -> Structure (sites, blocks, groups, costs); VitGraph
    "vitgraph.gates",       # the learnable modules a gated graph is made of
    "vitgraph.passes",      # graph rewrites: insert gates, remove what they pruned
    "vitgraph.axes",        # one axis per compression dimension: its decisions, passes and prices
    "vitgraph.cost",        # what a decision costs: FLOPs pricer, budget, latency table, profiler
    "vitgraph.gated",       # instrument / materialize: the gated model and its compact graph
    "vitgraph.train",       # the generic loop, its state, parameter groups and data
    "vitgraph.report",      # report.json views, markdown, plots, the output folder
    "vitgraph.pipeline",    # vg.compress: the stages in sequence
    "vitgraph",             # the public facade (vg.trace, vg.compress, vg.Spec, ...)
    "vitgraph.cli",         # the commands (compile, inspect, sweep, demo, ...)
    "vitgraph.__main__",    # python -m vitgraph
]
MAX_TOP_MODULES = 8
MAX_MODULE_LINES = {"vitgraph.passes": 300}
MAX_LINES, MAX_FUNCTION = 450, 80


def _modules() -> dict[str, Path]:
    found = {}
    for folder, dotted in SOURCES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((dotted, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _imports(module: str, path: Path) -> set[str]:
    """The package's modules ``module`` imports (``from a import b`` counts ``a.b`` where b is a module)."""
    out: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


GRAPH = nx.DiGraph()
for _name, _path in MODULES.items():
    GRAPH.add_node(_name)
    GRAPH.add_edges_from((_name, t) for t in _imports(_name, _path))


def test_every_module_sits_in_a_listed_room():
    assert sorted({_room(m) for m in MODULES} - set(ROOMS)) == []


def test_no_import_circle():
    cycles = list(nx.simple_cycles(GRAPH))
    assert cycles == [], "import circles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_no_import_runs_back_up():
    rank = {room: i for i, room in enumerate(ROOMS)}
    upward = [f"{a} imports {b}" for a, b in GRAPH.edges if rank[_room(b)] > rank[_room(a)]]
    assert upward == []


def test_at_most_eight_modules_directly_in_the_package():
    top = [p.name for p in (ROOT / "vitgraph").glob("*.py")]
    assert len(top) <= MAX_TOP_MODULES, sorted(top)


def test_every_room_says_what_lives_there():
    for room in ROOMS:
        path = MODULES.get(room)
        if path is not None and path.name == "__init__.py":
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert len(doc.split()) >= 20 and "import" in doc, f"{room}: say what lives here and what it may import"


def test_module_and_function_sizes():
    too_big = []
    for module, path in sorted(MODULES.items()):
        source = path.read_text()
        limit = MAX_MODULE_LINES.get(_room(module), MAX_LINES)
        if source.count("\n") > limit:
            too_big.append(f"{path.relative_to(ROOT)}: {source.count(chr(10))} lines (at most {limit})")
        too_big += [f"{path.relative_to(ROOT)}: {n.name} has {n.end_lineno - n.lineno + 1} lines"
                    for n in ast.walk(ast.parse(source))
                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and n.end_lineno - n.lineno + 1 > MAX_FUNCTION]
    assert too_big == []
