"""Pass infrastructure: a pass is a small object, ``pass(gm) -> PassResult(gm, modified)``.

``requires`` runs on the input and ``ensures`` on the result; their failures raise
:class:`PreconditionError` / :class:`PostconditionError` naming the pass, so every graph a pass
hands on has been verified.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch.fx as fx

from vitgraph.errors import PostconditionError, PreconditionError
from vitgraph.meta import CARRIES, ROLE, SHAPE, Role


@dataclass(frozen=True)
class PassResult:
    gm: fx.GraphModule
    modified: bool
    counters: dict[str, int] = field(default_factory=dict)  # what the rewrite did, for tests and reports


class VitPass:
    """Base class: subclasses implement ``call`` and may tighten ``requires`` / ``ensures``."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def requires(self, gm: fx.GraphModule) -> None:
        """Raise PreconditionError when ``gm`` lacks what the pass needs."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def ensures(self, gm: fx.GraphModule) -> None:
        verify_graph(gm, self.name)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self.requires(gm)
        result = self.call(gm)
        self.ensures(result.gm)
        return result


def verify_graph(gm: fx.GraphModule, pass_name: str) -> None:
    """The graph is well formed and every call_module / get_attr target exists."""
    try:
        gm.graph.lint()
    except Exception as e:  # noqa: BLE001 - lint raises bare RuntimeError
        raise PostconditionError(f"{pass_name}: the rewritten graph is malformed: {e}") from None
    for node in gm.graph.nodes:
        if node.op == "call_module":
            try:
                gm.get_submodule(str(node.target))
            except AttributeError:
                raise PostconditionError(f"{pass_name}: {node.format_node()} calls a missing module") from None


def reroute(gm: fx.GraphModule, stream: fx.Node, target: str, args: tuple[fx.Node, ...]) -> fx.Node:
    """Call module ``target`` on ``args`` right after ``stream``; every other reader of ``stream`` reads that
    call from now on (it carries the stream's shape)."""
    with gm.graph.inserting_after(stream):
        call = gm.graph.call_module(target, args)
    stream.replace_all_uses_with(call, delete_user_cb=lambda user: user is not call)
    call.meta[SHAPE] = stream.meta.get(SHAPE)
    call.meta[CARRIES] = stream.name
    return call


def carrier(stream: fx.Node) -> fx.Node:
    """The node that carries ``stream`` now: the last of the calls earlier instrument passes rerouted it
    through (a token selector, a block gate), or ``stream`` itself."""
    node = stream
    while (nxt := next((u for u in node.users if u.meta.get(CARRIES) == stream.name), None)) is not None:
        node = nxt
    return node


def drop_root(gm: fx.GraphModule, root: str) -> None:
    """After a materialize pass has rewritten every call under ``root``: dead nodes and unused modules go,
    and so does the ``root`` container itself; the code is regenerated."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    if hasattr(gm, root):
        delattr(gm, root)
    gm.recompile()


def ensure_no_calls(gm: fx.GraphModule, root: str, pass_name: str, what: str) -> None:
    """No node calls a module under ``root`` any more (``what`` names them in the error)."""
    if any(n.op == "call_module" and str(n.target).startswith(root) for n in gm.graph.nodes):
        raise PostconditionError(f"{pass_name}: {what} calls are left in the compact graph")


def require_roles(gm: fx.GraphModule, wanted: Iterable[tuple[str, str | None]], pass_name: str) -> None:
    """Every ``(role kind, site)`` wanted is on some node (site None: any site); the analysis writes roles."""
    have = {(r.kind, r.site) for n in gm.graph.nodes if isinstance(r := n.meta.get(ROLE), Role)}
    kinds = {k for k, _ in have}
    for kind, site in sorted(wanted, key=str):
        if (kind, site) not in have if site is not None else kind not in kinds:
            where = f" at site {site}" if site is not None else ""
            raise PreconditionError(f"{pass_name}: no node has role {kind!r}{where}; roles are written by "
                                    f"vitgraph.analysis.analyse (vg.trace) - instrument a graph vg.trace returned")


def require_nodes(gm: fx.GraphModule, names: Iterable[str], pass_name: str, what: str) -> dict[str, fx.Node]:
    """Resolve node names recorded by the analysis; a missing one means the graph changed under it."""
    nodes = {n.name: n for n in gm.graph.nodes}
    missing = [n for n in names if n not in nodes]
    if missing:
        raise PreconditionError(f"{pass_name}: {what} node %{missing[0]} is not in the graph; the graph changed "
                                f"after analysis - re-run vg.trace on it first")
    return nodes
