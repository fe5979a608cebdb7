"""Materialize: cut the model at its chosen exit (WDPruning, methods.md §2.5).

The gated graph returns ``(final, *exits)``. After this pass it returns one tensor: the chosen
exit's logits (the blocks after it, the final norm and head and every other exit go dead and are
deleted), or the final head's when no exit was chosen (every exit is deleted).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx

from vitgraph.errors import PreconditionError
from vitgraph.meta import EXITS
from vitgraph.passes.base import PassResult, VitPass


class TruncateAtExitPass(VitPass):
    """After: the graph returns one tensor, ``exits[chosen]``'s (or the final head's); no exit modules."""

    def __init__(self, exits: Sequence[int], chosen: int | None) -> None:
        self.exits = list(exits)
        self.chosen = chosen

    def requires(self, gm: fx.GraphModule) -> None:
        if self.chosen is not None and self.chosen not in self.exits:
            raise PreconditionError(f"{self.name}: exit {self.chosen} is not one of the exits {self.exits}")
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        if not isinstance(out, tuple) or len(out) != len(self.exits) + 1:
            raise PreconditionError(f"{self.name}: the graph does not return (final, *exits); run InsertExitsPass")

    def call(self, gm: fx.GraphModule) -> PassResult:
        output = next(n for n in gm.graph.nodes if n.op == "output")
        outs = output.args[0]
        value = outs[0] if self.chosen is None else outs[1 + self.exits.index(self.chosen)]
        output.args = (value,)
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        used = any(n.op in ("call_module", "get_attr") and str(n.target).startswith(EXITS + ".") for n in gm.graph.nodes)
        if hasattr(gm, EXITS) and not used:  # (an exit of parameter-free modules, e.g. a dropout, still runs)
            delattr(gm, EXITS)
        gm.recompile()
        return PassResult(gm, modified=True, counters={"nodes_removed": before - len(gm.graph.nodes)})
