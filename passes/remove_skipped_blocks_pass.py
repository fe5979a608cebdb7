"""Materialize: strip the block gates; delete the blocks and branches they skip.

A kept unit's gate is replaced by what it passes through. A skipped block's output is replaced by
its input (reshaped when the block also changes the stream's layout), so the whole block goes dead;
a skipped branch's residual add is replaced by its shortcut. Dead nodes and unused modules go.

Invariant (tests/test_depth.py): the gated graph in ``eval`` mode equals the result.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch.fx as fx

from vitgraph.meta import BLOCK_GATES, SHAPE, shape_of
from vitgraph.passes.base import PassResult, VitPass, drop_root, ensure_no_calls


class RemoveSkippedBlocksPass(VitPass):
    """After: no block gates; ``keep[unit] == False`` units are gone from the graph."""

    def __init__(self, keep: Mapping[str, bool]) -> None:
        self.keep = dict(keep)

    def call(self, gm: fx.GraphModule) -> PassResult:
        counters = {"gates_removed": 0, "blocks_removed": 0, "branches_removed": 0}
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not str(node.target).startswith(BLOCK_GATES + "."):
                continue
            gate = gm.get_submodule(str(node.target))
            kept = self.keep.get(gate.unit, True)
            counters["gates_removed"] += 1
            if gate.kind == "block":
                x_in, x_out = node.args
                value = x_out if kept else _as_shape(gm, x_in, x_out, node)
                node.replace_all_uses_with(value)
                gm.graph.erase_node(node)
                counters["blocks_removed"] += int(not kept)
                continue
            if kept:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                continue
            (add,) = node.users  # the residual add; its other operand is the shortcut
            skip = next(a for a in add.args if isinstance(a, fx.Node) and a is not node)
            add.replace_all_uses_with(skip)
            gm.graph.erase_node(add)
            gm.graph.erase_node(node)
            counters["branches_removed"] += 1
        drop_root(gm, BLOCK_GATES)
        return PassResult(gm, modified=counters["gates_removed"] > 0, counters=counters)

    def ensures(self, gm: fx.GraphModule) -> None:
        super().ensures(gm)
        ensure_no_calls(gm, BLOCK_GATES, self.name, "block gate")


def _as_shape(gm: fx.GraphModule, x_in: fx.Node, x_out: fx.Node, where: fx.Node) -> fx.Node:
    """``x_in``, reshaped to ``x_out``'s layout when the block changed it ((B, H, W, C) -> (B, H*W, C))."""
    a, b = shape_of(x_in), shape_of(x_out)
    if a == b or a is None or b is None:
        return x_in
    with gm.graph.inserting_before(where):
        r = gm.graph.call_method("reshape", (x_in, -1, *b[1:]))
    r.meta[SHAPE] = b
    return r
