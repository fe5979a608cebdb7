"""Instrument: a :class:`BlockGate` after every skippable block, or in front of every skippable branch.

Before (one block)::

    add_1 = add + mlp_fc2
    norm1 = self.blocks.1.norm1(add_1)

After, whole-block gates::

    add_1 = add + mlp_fc2
    gate = self.vg_blocks.blocks_0(x, add_1)      # u * add_1 + (1 - u) * x
    norm1 = self.blocks.1.norm1(gate)

After, per-branch gates (``depth.per_branch``)::

    gate = self.vg_blocks.blocks_0_mlp(mlp_fc2)   # u * mlp_fc2
    add_1 = add + gate

Gates start open: the graph computes exactly what it computed before.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx

from vitgraph.errors import PreconditionError
from vitgraph.gates.units import BlockGate
from vitgraph.meta import BLOCK_GATES, SHAPE, DepthUnit
from vitgraph.passes.base import PassResult, VitPass, carrier, require_nodes, require_roles, reroute


class InsertBlockGatesPass(VitPass):
    """After: every unit's stream (block) or branch (attn / mlp) passes through its gate."""

    def __init__(self, units: Sequence[DepthUnit]) -> None:
        self.units = list(units)
        self.gates: dict[str, BlockGate] = {}

    def requires(self, gm: fx.GraphModule) -> None:
        if hasattr(gm, BLOCK_GATES):
            raise PreconditionError(f"{self.name}: the graph already has block gates ({BLOCK_GATES})")
        require_nodes(gm, [n for u in self.units for n in (u.start, u.end)], self.name, "block")
        require_roles(gm, {("residual.add", None) for u in self.units if u.kind != "block"}, self.name)

    def call(self, gm: fx.GraphModule) -> PassResult:
        if not self.units:
            return PassResult(gm, modified=False)
        gm.add_module(BLOCK_GATES, torch.nn.Module())
        nodes = {n.name: n for n in gm.graph.nodes}
        for unit in self.units:
            gate = BlockGate(unit.name, unit.kind)
            gm.add_submodule(unit.gate, gate)
            self.gates[unit.name] = gate
            start, end = nodes[unit.start], nodes[unit.end]
            if unit.kind == "block":
                # what the block reads now: block 9's gate when 9 and 10 are both gated, a token selector before it
                reroute(gm, end, unit.gate, (carrier(start), end))
            else:
                # the shortcut is what carries the branch's input now (a token selector before the block):
                # the other operand is the branch
                skip = carrier(start)
                operand = next(a for a in end.args if isinstance(a, fx.Node) and a is not skip)
                with gm.graph.inserting_before(end):
                    g = gm.graph.call_module(unit.gate, (operand,))
                end.replace_input_with(operand, g)
                g.meta[SHAPE] = operand.meta.get(SHAPE)
        gm.recompile()
        return PassResult(gm, modified=True, counters={"block_gates": len(self.gates)})
