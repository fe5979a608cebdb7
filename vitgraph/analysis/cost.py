"""Cost model: FLOPs (2 x multiply-adds, per image) and parameters of every node.

Counts exactly the ops ``torch.utils.flop_counter.FlopCounterMode`` counts (linear, matmul, conv,
attention), from recorded shapes, so the two agree; ``flop_counter_flops`` is the cross-check.
Each node's cost carries ``factors``: the coupled groups its FLOPs scale with. ``evaluate`` prices
the graph for any kept fraction of each group, with tensors allowed, so a budget loss can be
differentiated through it.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx

from vitgraph.analysis.ops import linear_info, op_kind, sdpa_qkv
from vitgraph.meta import COST, LEAF_FLOPS, NodeCost, shape_of


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def node_flops(node: fx.Node, gm: fx.GraphModule) -> int:
    """FLOPs of one node for the whole example batch (0 for ops FlopCounterMode does not count)."""
    kind = op_kind(node, gm)
    out = shape_of(node)
    if LEAF_FLOPS in node.meta:
        return int(node.meta[LEAF_FLOPS])
    if kind == "linear":
        info = linear_info(node, gm)
        if info is None or out is None:
            return 0
        return 2 * (_numel(out) // info.out_features) * info.in_features * info.out_features
    if kind == "conv" and out is not None:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            k = _numel(tuple(mod.kernel_size)) * (mod.in_channels // mod.groups)
        else:
            w = shape_of(node.args[1])
            k = _numel(w[1:]) if w else 0
        return 2 * _numel(out) * k
    if kind == "matmul" and out is not None:
        a = shape_of(node.args[0])
        return 2 * _numel(out) * (a[-1] if a else 0)
    if kind == "sdpa":
        q, k, v = (shape_of(t) for t in sdpa_qkv(node))
        if q is None or k is None or v is None:
            return 0
        lead = _numel(q[:-2])
        return 2 * lead * q[-2] * k[-2] * q[-1] + 2 * lead * q[-2] * k[-2] * v[-1]
    if kind == "einsum" and isinstance(node.args[0], str):
        # two operands: every index letter is looped over once, as the bmm FlopCounterMode sees
        spec = node.args[0].replace(" ", "").split("->")[0].split(",")
        shapes = [shape_of(a) for a in node.args[1:]]
        if len(spec) != 2 or any(s is None or len(s) != len(t) for s, t in zip(shapes, spec)):
            return 0
        sizes = {ch: d for t, s in zip(spec, shapes) for ch, d in zip(t, s)}
        return 2 * _numel(tuple(sizes.values()))
    return 0


def node_params(node: fx.Node, gm: fx.GraphModule, param_names: set[str]) -> int:
    if node.op == "call_module":
        return sum(p.numel() for p in gm.get_submodule(node.target).parameters())
    if node.op == "get_attr" and str(node.target) in param_names:
        return gm.get_parameter(str(node.target)).numel()
    return 0


def annotate_costs(gm: fx.GraphModule, batch: int, factors: Mapping[str, tuple[str, ...]] | None = None) -> int:
    """Write ``COST`` on every node; returns total FLOPs per image."""
    factors = factors or {}
    param_names = {n for n, _ in gm.named_parameters()}
    total = 0
    for node in gm.graph.nodes:
        flops = node_flops(node, gm) // max(1, batch)
        node.meta[COST] = NodeCost(flops, node_params(node, gm, param_names), factors.get(node.name, ()))
        total += flops
    return total


def evaluate(gm: fx.GraphModule, kept: Mapping[str, Any]) -> Any:
    """FLOPs per image when each group ``g`` keeps the fraction ``kept[g]`` (float or tensor).

    A node's FLOPs scale with the product of its factors' fractions (a factor missing from
    ``kept`` counts as 1), which is exact for widths of linears, heads of attention and MLP units.
    """
    total: Any = 0
    for node in gm.graph.nodes:
        cost: NodeCost | None = node.meta.get(COST)
        if cost is None or not cost.flops:
            continue
        term: Any = cost.flops
        for f in cost.factors:
            term = term * kept.get(f, 1.0)
        total = total + term
    return total


def flop_counter_flops(module: torch.nn.Module, example_inputs: tuple, batch: int) -> int:
    """FLOPs per image as counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(*example_inputs)
    except AssertionError:  # FlopCounterMode's module tracker can fail under no_grad; count with autograd on
        with FlopCounterMode(display=False) as counter:
            module(*example_inputs)
    return counter.get_total_flops() // max(1, batch)
