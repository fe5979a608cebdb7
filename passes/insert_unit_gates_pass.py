"""Instrument: put a :class:`UnitGate` in front of every consumer of a coupled group.

Before (one attention)::

    proj = self.blocks.0.attn.proj(merged)
    add_1 = norm_pre + proj

After::

    gate = self.vg_gates.blocks_0_attn_heads(merged)              # channels x their head's mask
    proj = self.blocks.0.attn.proj(gate)
    gate_1 = self.vg_gates.blocks_0_attn_heads(proj, branch=True)  # x 0 once no head is kept
    add_1 = norm_pre + gate_1

Where a talking-heads mix reads the logits of every head, the gate also masks them there
(``gate(x, unit_axis=1)``). Gates start open (no mask): the graph computes exactly what it computed before.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.fx as fx

from vitgraph.passes.base import PassResult, VitPass, require_nodes, require_roles
from vitgraph.analysis.blocks import removable_residual
from vitgraph.analysis.ops import linear_info
from vitgraph.errors import PreconditionError
from vitgraph.gates.units import UnitGate
from vitgraph.meta import GATES, SHAPE, Block, CoupledGroup, Linear, submodule_name

CONSUMER_ROLE = {"heads": "attn.proj", "head_dim": "attn.proj", "mlp": "mlp.fc2"}  # the linear reading a group's units, by group kind


def branch_add(blocks: Mapping[int, Block], group: CoupledGroup) -> tuple[str, str] | None:
    """(add, skip) of the residual whose branch holds only the group's site (attention for heads, the
    MLP for its units) with a plain identity shortcut; None when that branch cannot be removed."""
    r = removable_residual(blocks.get(group.block) if group.block is not None else None, group.branch)
    return None if r is None else (r.add, r.skip)


class InsertUnitGatesPass(VitPass):
    """After: each group's consumer linears read their input through the group's gate; each
    group's residual branch (when it can be removed) passes through the same gate in branch mode."""

    def __init__(self, groups: Sequence[CoupledGroup], blocks: Sequence[Block]) -> None:
        self.groups = list(groups)
        self.blocks = {b.index: b for b in blocks}
        self.gates: dict[str, UnitGate] = {}

    def requires(self, gm: fx.GraphModule) -> None:
        if not self.groups:
            raise PreconditionError(f"{self.name}: no coupled groups to gate")
        if hasattr(gm, GATES):
            raise PreconditionError(f"{self.name}: the graph already has gates ({GATES}); instrument the dense graph")
        require_roles(gm, {(CONSUMER_ROLE[g.kind], g.site) for g in self.groups if g.kind in CONSUMER_ROLE}, self.name)

    def call(self, gm: fx.GraphModule) -> PassResult:
        gm.add_module(GATES, torch.nn.Module())
        inserted = 0
        for group in self.groups:
            consumers = _consumers(gm, group)
            if not consumers:
                raise PreconditionError(f"{self.name}: group {group.name} has no consumer linear in the graph")
            branch = branch_add(self.blocks, group) if group.kind != "head_dim" else None  # value dims keep one a head
            channel_unit = _channel_units(gm, group, consumers[0][1].weight)
            axes = {info.channel_axis for _, info in consumers}
            if len(axes) != 1:
                raise PreconditionError(f"{self.name}: the consumers of {group.name} hold its channels on different "
                                        f"axes {sorted(axes)}; one gate cannot mask them all")
            gate = UnitGate(group.name, group.units, channel_unit, min_units=0 if branch else 1,
                            channel_axis=axes.pop())
            target = submodule_name(GATES, group.name)
            gm.add_submodule(target, gate)
            self.gates[group.name] = gate
            for node, _ in consumers:
                src = node.args[0]
                with gm.graph.inserting_before(node):
                    g = gm.graph.call_module(target, (src,))
                g.meta[SHAPE] = src.meta.get(SHAPE)
                node.replace_input_with(src, g)
                inserted += 1
            inserted += _mask_norms(gm, group, target, self.name)
            inserted += _mask_unit_inputs(gm, group, target, self.name)
            if branch is not None:
                add, skip = branch
                nodes = require_nodes(gm, (add, skip), self.name, "residual")
                operand = next(a for a in nodes[add].args if isinstance(a, fx.Node) and a is not nodes[skip])
                with gm.graph.inserting_before(nodes[add]):
                    g = gm.graph.call_module(target, (operand,), {"branch": True})
                g.meta[SHAPE] = operand.meta.get(SHAPE)
                nodes[add].replace_input_with(operand, g)
                inserted += 1
        gm.recompile()
        return PassResult(gm, modified=inserted > 0, counters={"gates": len(self.gates), "gate_calls": inserted})


def _mask_norms(gm: fx.GraphModule, group: CoupledGroup, target: str, pass_name: str) -> int:
    """Every LayerNorm over the group's channels becomes ``gate(x, eps=, weight=, bias=)``: the same norm,
    with its statistics over the kept channels once the gate has a mask."""
    nodes = require_nodes(gm, group.norms, pass_name, "LayerNorm")
    for name in group.norms:
        node = nodes[name]
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            with gm.graph.inserting_before(node):
                w = gm.graph.get_attr(f"{node.target}.weight") if mod.weight is not None else None
                b = gm.graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
            eps = mod.eps
        else:
            args = list(node.args) + [None] * (5 - len(node.args))
            w = node.kwargs.get("weight", args[2])
            b = node.kwargs.get("bias", args[3])
            eps = node.kwargs.get("eps", args[4] if args[4] is not None else 1e-5)
        with gm.graph.inserting_before(node):
            g = gm.graph.call_module(target, (node.args[0],), {"eps": float(eps), "weight": w, "bias": b})
        g.meta[SHAPE] = node.meta.get(SHAPE)
        node.replace_all_uses_with(g)
        gm.graph.erase_node(node)
    return len(group.norms)


def _mask_unit_inputs(gm: fx.GraphModule, group: CoupledGroup, target: str, pass_name: str) -> int:
    """Each input holding one entry per unit (talking heads: the logits entering the first mix) reads
    ``gate(x, unit_axis=)``: a head the mask drops adds nothing to the mixed maps, as in the sliced mix."""
    nodes = require_nodes(gm, (u.node for u in group.unit_inputs), pass_name, "unit input")
    for u in group.unit_inputs:
        node = nodes[u.node]
        src = node.args[u.arg]
        with gm.graph.inserting_before(node):
            g = gm.graph.call_module(target, (src,), {"unit_axis": u.axis})
        g.meta[SHAPE] = src.meta.get(SHAPE)
        node.update_arg(u.arg, g)
    return len(group.unit_inputs)


def _consumers(gm: fx.GraphModule, group: CoupledGroup) -> list[tuple[fx.Node, Linear]]:
    """The linear-like nodes (Linears, pointwise convs) whose input columns the group slices (not a
    talking-heads mix: its input holds one entry per head, masked by ``_mask_unit_inputs``)."""
    weights = {s.target for s in group.slices if s.what == "weight.in"}
    per_unit = {u.node for u in group.unit_inputs}
    out = []
    for node in gm.graph.nodes:
        info = linear_info(node, gm)
        if info is not None and info.weight in weights and node.name not in per_unit:
            out.append((node, info))
    return out


def _channel_units(gm: fx.GraphModule, group: CoupledGroup, weight: str) -> torch.Tensor:
    """For each input channel of the consumer: the unit that owns it (-1: none)."""
    sl = next(s for s in group.slices if s.target == weight and s.what == "weight.in")
    channels = gm.get_parameter(weight).shape[1]
    owner = torch.full((channels,), -1, dtype=torch.long)
    for u, idx in enumerate(sl.indices):
        owner[list(idx)] = u
    return owner
