"""Materialize: cut each attention's value dims (UVC), splitting a fused projection where it holds v.

Runs after the heads are sliced (the surviving heads are renumbered 0..H'-1), on graphs whose unit
gates are already stripped. For one attention of a timm ViT (fused qkv, 6 heads of 64, 40 value dims
kept per head)::

    qkv = blocks.0.attn.qkv(x); reshape = qkv.reshape(b, n, 3, 6, 64); ... q, k, v = unbind(...)
    sdpa = scaled_dot_product_attention(q_norm(q), k_norm(k), v)
    proj = blocks.0.attn.proj(sdpa.transpose(1, 2).reshape(b, n, 384))

becomes::

    q = blocks.0.attn.q_cut(x).unflatten(-1, (6, 64)).transpose(1, 2)      # rows of qkv for q
    k = blocks.0.attn.k_cut(x).unflatten(-1, (6, 64)).transpose(1, 2)
    v = blocks.0.attn.v_cut(x).unflatten(-1, (6, 40)).transpose(1, 2)      # the kept value rows
    sdpa = scaled_dot_product_attention(q_norm(q), k_norm(k), v)
    proj = blocks.0.attn.proj(sdpa.transpose(1, 2).flatten(2))             # the kept columns

Where the graph allows it is decided by ``vitgraph.analysis.value_dims.value_plan`` (the same proof
on the graph being rewritten); the attention scale is untouched (it follows q/k's width).
Invariant (tests/test_value_dims.py): the gated graph in ``eval`` mode equals the result.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from vitgraph.analysis.ops import linear_info
from vitgraph.analysis.value_dims import value_plan
from vitgraph.errors import PreconditionError
from vitgraph.meta import AttentionSite
from vitgraph.passes.base import PassResult, VitPass


class PruneValueDimsPass(VitPass):
    """After: every listed attention computes q, k, v with their own projections, v and the output
    projection's columns holding only the kept value dims of each surviving head."""

    def __init__(self, sites: Sequence[AttentionSite], kept: Mapping[str, Sequence[Sequence[int]]]) -> None:
        self.sites = {s.name: s for s in sites}
        self.kept = {k: [sorted(int(j) for j in head) for head in v] for k, v in kept.items()}

    def requires(self, gm: fx.GraphModule) -> None:
        for name, heads in self.kept.items():
            if name not in self.sites:
                raise PreconditionError(f"{self.name}: no attention site named {name!r}")
            if len({len(h) for h in heads}) > 1 or any(not h for h in heads):
                raise PreconditionError(f"{self.name}: {name} keeps {[len(h) for h in heads]} value dims per head; "
                                        "every head must keep the same number, at least one")

    def call(self, gm: fx.GraphModule) -> PassResult:
        live = {n.name for n in gm.graph.nodes}
        cut = 0
        for name, heads in self.kept.items():
            site = self.sites[name]
            if site.core not in live:  # its block or branch went with an earlier rewrite
                continue
            plan = value_plan(gm, site)
            if isinstance(plan, str):
                raise PreconditionError(f"{self.name}: the value dims of {name} cannot be cut: {plan}")
            nodes = {n.name: n for n in gm.graph.nodes}
            v_cut = next(c for c in plan.roles if c.role == "v")
            if len(heads) != len(v_cut.rows):
                raise PreconditionError(f"{self.name}: {name} has {len(v_cut.rows)} heads in the graph but the "
                                        f"decision lists {len(heads)}")
            for c in plan.roles:
                rows = c.rows if c.role != "v" else [[r[j] for j in keep] for r, keep in zip(c.rows, heads)]
                _replace_role(gm, nodes[plan.producer], nodes[c.boundary], rows, f"{name}.{c.role}_cut")
            _cut_proj(gm, nodes[plan.out], nodes[plan.merge], nodes[plan.proj], heads, len(v_cut.rows[0]))
            cut += 1
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
        return PassResult(gm, modified=cut > 0, counters={"attentions_cut": cut})


def _new_linear(gm: fx.GraphModule, lin: fx.Node, rows: list[int], target: str) -> str:
    """A Linear holding ``rows`` of ``lin``'s weight and bias, registered at a free name near ``target``."""
    info = linear_info(lin, gm)
    weight = gm.get_parameter(info.weight).detach()
    bias = gm.get_parameter(info.bias).detach() if info.bias else None
    idx = torch.tensor(rows, dtype=torch.long, device=weight.device)
    mod = nn.Linear(weight.shape[1], len(rows), bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        mod.weight.copy_(weight.index_select(0, idx))
        if bias is not None:
            mod.bias.copy_(bias.index_select(0, idx))
    name, n = target, 1
    while _exists(gm, name):
        name, n = f"{target}_{n}", n + 1
    gm.add_submodule(name, mod)
    return name


def _exists(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_submodule(name)
    except AttributeError:
        return False
    return True


def _replace_role(gm: fx.GraphModule, lin: fx.Node, boundary: fx.Node, rows: list[list[int]], target: str) -> None:
    """``boundary`` (B, H, N, d) becomes ``new_linear(x).unflatten(-1, (H, d)).transpose(1, 2)``."""
    name = _new_linear(gm, lin, [r for head in rows for r in head], target)
    with gm.graph.inserting_before(boundary):
        y = gm.graph.call_module(name, (lin.args[0],))
        y = gm.graph.call_method("unflatten", (y, -1, (len(rows), len(rows[0]))))
        y = gm.graph.call_method("transpose", (y, 1, 2))
    boundary.replace_all_uses_with(y)


def _cut_proj(gm: fx.GraphModule, out: fx.Node, merge: fx.Node, proj: fx.Node, heads: list[list[int]],
              width: int) -> None:
    """The output projection reads the merged kept value dims: its columns ``h * width + j`` for kept j."""
    info = linear_info(proj, gm)
    owner, _, attr = info.weight.rpartition(".")
    module = gm.get_submodule(owner)
    old = getattr(module, attr)
    cols = torch.tensor([h * width + j for h, keep in enumerate(heads) for j in keep], dtype=torch.long,
                        device=old.device)
    setattr(module, attr, nn.Parameter(old.detach().index_select(1, cols).clone(), requires_grad=old.requires_grad))
    if isinstance(module, nn.Linear):
        module.in_features = len(cols)
    with gm.graph.inserting_before(proj):
        y = gm.graph.call_method("transpose", (out, 1, 2))
        y = gm.graph.call_method("flatten", (y, 2))
    proj.replace_input_with(merge, y)
