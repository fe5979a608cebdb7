"""Cost model: FLOPs (2 x multiply-adds, per image) and parameters of every node.

Counts exactly the ops ``torch.utils.flop_counter.FlopCounterMode`` counts (linear, matmul, conv,
attention), from recorded shapes, so the two agree; ``flop_counter_flops`` is the cross-check.
Each node's cost carries ``factors``: the coupled groups its FLOPs scale with. ``evaluate`` prices
the graph for any kept fraction of each group, with tensors allowed, so a budget loss can be
differentiated through it.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx

from vitgraph.analysis.ops import PRODUCTS, linear_info, op_kind, operands, sdpa_qkv
from vitgraph.meta import COST, LEAF_FLOPS, AttentionSite, Block, CoupledGroup, NodeCost, shape_of


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


def annotate_costs(gm: fx.GraphModule, batch: int, factors: Mapping[str, tuple[str, ...]] | None = None,
                   per_image: Mapping[str, int] | None = None) -> int:
    """Write ``COST`` on every node; returns total FLOPs per image. ``per_image``: FLOPs of one image alone
    by node name (:func:`one_image_flops`), else the example batch's FLOPs / ``batch``."""
    factors = factors or {}
    param_names = {n for n, _ in gm.named_parameters()}
    total = 0
    for node in gm.graph.nodes:
        flops = per_image[node.name] if per_image is not None else node_flops(node, gm) // max(1, batch)
        node.meta[COST] = NodeCost(flops, node_params(node, gm, param_names), factors.get(node.name, ()))
        total += flops
    return total


def one_image_flops(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> dict[str, int] | None:
    """Each node's FLOPs for one image alone, from its FLOPs at the example batch B (recorded shapes) and at
    B + 1 (fake tensors): f(1) = f(B) - (B - 1) * (f(B + 1) - f(B)). An op that runs once per call whatever
    the batch (a relative-position MLP over the coordinate table, a position encoding built from the image
    size) is priced in full, one that runs per image at f(B) / B. None where B is 1 (f(B) is it), for a graph
    that serves one batch size, or where the graph does not run at B + 1."""
    from vitgraph.analysis.shapes import propagate_shapes

    batch = int(example_inputs[0].shape[0]) if example_inputs and example_inputs[0].dim() else 1
    if batch <= 1 or isinstance(getattr(gm, "serving_batch", None), int):
        return None
    nodes = list(gm.graph.nodes)
    at_b = {n.name: node_flops(n, gm) for n in nodes}
    saved = {n.name: dict(n.meta) for n in nodes}
    bigger = tuple(torch.cat([x, x[:1]]) if isinstance(x, torch.Tensor) and x.dim() else x for x in example_inputs)
    try:
        propagate_shapes(gm, bigger, fake=True)
        at_b1 = {n.name: node_flops(n, gm) for n in nodes}
    except Exception:  # noqa: BLE001 - a graph that runs at its example batch only: price per image of it
        return None
    finally:
        for n in nodes:
            n.meta.clear()
            n.meta.update(saved[n.name])
    out = {}
    for name, f in at_b.items():
        one = f - (batch - 1) * (at_b1[name] - f)
        out[name] = one if 0 <= one <= f else f // batch  # not affine in the batch: per image of the example
    return out


def assign_factors(gm: fx.GraphModule, blocks: Sequence[Block], attention: Sequence[AttentionSite],
                   groups: Sequence[CoupledGroup], stream: int) -> None:
    """Record on each node's cost which kept fractions its FLOPs scale with.

    * a coupled group (``blocks.3.attn.heads``, ``blocks.3.mlp.mlp``) on every node whose weights it
      slices, and on the attention core and its matmuls for heads;
    * ``block.<i>`` on every node of block i (1 = kept, 0 = skipped);
    * ``tokens.<i>`` (the fraction of tokens entering block i) once per token axis of the node:
      once for a linear over the tokens, twice for ``softmax(q k^T) v`` over them (the axes of the
      ``stream``'s token count in a block that only reads the stream, e.g. an attention pool).
    * a value-dim group on the output projection and v's projection, or, where v shares its projection
      (fused qkv) or its core (sdpa's attn @ v), on that share of the node's FLOPs (``NodeCost.parts``).
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    factors: dict[str, list[str]] = {}
    weight_users: dict[str, list[str]] = {}
    for n in gm.graph.nodes:
        info = linear_info(n, gm)
        if info is not None:
            weight_users.setdefault(info.weight, []).append(n.name)
        elif op_kind(n, gm) == "conv" and n.op == "call_module":  # e.g. the patch embedding (embed rows)
            weight_users.setdefault(f"{n.target}.weight", []).append(n.name)
        elif op_kind(n, gm) in PRODUCTS:  # a product with a parameter (a talking-heads mix)
            for a in operands(n):
                if isinstance(a, fx.Node) and a.op == "get_attr":
                    weight_users.setdefault(str(a.target), []).append(n.name)
    sites = {a.name: a for a in attention}
    parts: dict[str, list[tuple[int, tuple[str, ...]]]] = {}
    for g in groups:
        if g.kind == "head_dim":
            _value_factors(gm, nodes, sites[g.site], g.name, factors, parts)
            continue
        users = {u for s in g.slices for u in weight_users.get(s.target, [])}
        if g.kind == "heads":
            users |= _attention_products(gm, nodes[sites[g.site].core], skip=sites[g.site].mixes)
        for u in users:
            factors.setdefault(u, []).append(g.name)
    for b in blocks:
        for name in b.nodes:
            node = nodes[name]
            factors.setdefault(name, []).append(f"block.{b.index}")
            factors[name].extend([f"tokens.{b.index}"] * _token_axes(node, gm, b.token_axis(stream)))
    for name in set(factors) | set(parts):
        cost = nodes[name].meta.get(COST)
        if cost is not None:
            nodes[name].meta[COST] = replace(cost, factors=tuple(factors.get(name, ())),
                                             parts=tuple(parts.get(name, ())))


def _value_factors(gm: fx.GraphModule, nodes: Mapping[str, fx.Node], site: AttentionSite, group: str,
                   factors: dict[str, list[str]], parts: dict[str, list[tuple[int, tuple[str, ...]]]]) -> None:
    """Where the FLOPs of ``site``'s value dims are: v's rows of its projection, attn @ v, the projection."""
    def share(name: str, fraction: float) -> None:
        cost = nodes[name].meta.get(COST)
        if fraction >= 1.0:
            factors.setdefault(name, []).append(group)
        elif cost is not None and cost.flops:
            parts.setdefault(name, []).append((round(cost.flops * fraction), (group,)))

    v_rows = site.heads * site.v_head_dim
    info = linear_info(nodes[site.v], gm)
    if info is not None:
        share(site.v, v_rows / info.out_features)
    if site.proj is not None:
        share(site.proj, 1.0)
    core = nodes[site.core]
    if op_kind(core, gm) == "sdpa":
        share(site.core, site.v_head_dim / (site.head_dim + site.v_head_dim))
    else:
        for name in _attention_products(gm, core, sides=("after",), skip=site.mixes):
            share(name, 1.0)


def _attention_products(gm: fx.GraphModule, core: fx.Node, sides: tuple[str, ...] = ("before", "after"),
                        skip: tuple[str, ...] = ()) -> set[str]:
    """The core itself, or for an explicit softmax the q@k^T (before) and attn@v (after) matmuls around it
    (past the talking-heads mixes in ``skip``)."""
    if op_kind(core, gm) == "sdpa":
        return {core.name}
    found = set()
    steps = {"before": lambda n: n.all_input_nodes, "after": lambda n: list(n.users)}
    for step in (steps[s] for s in sides):
        frontier = [core]
        for _ in range(6):
            frontier = [m for n in frontier for m in step(n)]
            hit = next((n for n in frontier if op_kind(n, gm) in PRODUCTS and n.name not in skip), None)
            if hit is not None:
                found.add(hit.name)
                break
    return found


def _token_axes(node: fx.Node, gm: fx.GraphModule, tokens: int) -> int:
    """How many of a node's FLOP factors are the block's token count."""
    kind = op_kind(node, gm)
    if kind == "sdpa":
        q, k, _ = (shape_of(t) for t in sdpa_qkv(node))
        return int(bool(q) and q[-2] == tokens) + int(bool(k) and k[-2] == tokens)
    out = shape_of(node)
    if not out or len(out) < 2:
        return 0
    if kind == "linear":
        return int(out[-2] == tokens)
    if kind in PRODUCTS:
        if kind == "einsum":  # contracted size: an index of the first operand missing from the output
            spec = str(node.args[0]).replace(" ", "")
            ins, res = spec.split("->") if "->" in spec else (spec, "")
            a_idx, a = ins.split(",")[0], shape_of(operands(node)[0])
            contracted = next((d for ch, d in zip(a_idx, a or ()) if ch not in res), 0)
        else:
            a = shape_of(node.args[0])
            contracted = a[-1] if a else 0
        return int(out[-2] == tokens) + int(out[-1] == tokens or contracted == tokens)
    return 0


def evaluate(gm: fx.GraphModule, kept: Mapping[str, Any], nodes: set[str] | None = None) -> Any:
    """FLOPs per image when each factor ``f`` keeps the fraction ``kept[f]`` (float or tensor).

    A node's FLOPs scale with the product of its factors (a factor listed twice counts squared;
    one missing from ``kept`` counts as 1): exact for the widths of linears, attention heads, MLP
    units, skipped blocks and, for token-wise ops, the tokens kept. ``nodes`` restricts the sum.
    """
    total: Any = 0
    for node in gm.graph.nodes:
        if nodes is not None and node.name not in nodes:
            continue
        cost: NodeCost | None = node.meta.get(COST)
        if cost is None or not cost.flops:
            continue
        for flops, factors in cost.rows():
            term: Any = flops
            for f in factors:
                term = term * kept.get(f, 1.0)
            total = total + term
    return total


def flop_counter_flops(module: torch.nn.Module, example_inputs: tuple, batch: int) -> int:
    """FLOPs per image as counted by ``torch.utils.flop_counter.FlopCounterMode``, with attention on the
    math SDPA kernel: FlopCounterMode does not price the fused CPU attention kernels (it counts 0).

    Counted on the first image alone (an op that runs once per call would be shared by a batch), unless
    ``batch`` is 1 (the inputs' whole batch is counted) or the module serves one batch size only."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # no tensor may require grad: FlopCounterMode's module tracker hooks those, and fails on some of them
    if batch > 1 and not isinstance(getattr(module, "serving_batch", None), int):  # one image alone, as priced
        example_inputs, batch = tuple(x[:1] if isinstance(x, torch.Tensor) else x for x in example_inputs), 1
    params = [p for p in module.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        with sdpa_kernel(SDPBackend.MATH), torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(*example_inputs)
    finally:
        for p in params:
            p.requires_grad_(True)
    return counter.get_total_flops() // max(1, batch)
