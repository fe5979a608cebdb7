"""Materialize: each conv gate becomes its decision (methods.md §1.6).

* ``msa``: the gate goes; the attention stays as it was.
* ``conv3``: the attention branch is replaced by prefix split -> patches (B, C, Gh, Gw) -> Conv2d(C, d, 3,
  padding 1) with the BatchNorm folded in -> ReLU -> Conv2d(d, C, 1) -> tokens, prefix concatenated in front.
* ``conv1``: Linear(C, d) with the BatchNorm folded in -> ReLU -> Linear(d, C) on the patch tokens.
* ``skip``: the residual add becomes its shortcut; the branch is gone.

With the embedding channels gated (``stream``: their group) the layers are built at the stream's full width
and their call nodes declare the group's slices they follow (``GROUP_SLICES``: the first layer's input
channels are the value projection's input columns, the second's output channels and bias the output
projection's rows); the width axis's ``RemovePrunedUnitsPass``, which runs later, narrows them with the stream.

The tap assignment is evaluated once and baked into the new weights; q and k (and the whole attention)
of a converted site go dead and are removed, with their modules. New modules are plain ``torch.nn``
ones registered beside the attention (``<site>_conv``).

Invariant (tests/test_conv.py): the gated graph in ``eval`` mode (BatchNorm in eval) equals the result.
"""
from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from vitgraph.analysis.conv import ConvSite, stream_slices
from vitgraph.errors import PreconditionError
from vitgraph.gates.conv import AttentionConv
from vitgraph.meta import CONV_GATES, GROUP_SLICES, CoupledGroup, SliceRef, submodule_name
from vitgraph.passes.base import PassResult, VitPass, drop_root, ensure_no_calls


def _fold(weight: torch.Tensor, bias: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of ``bn(conv(x))`` as one conv: per output channel scale g / sqrt(var + eps)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return weight * scale.reshape(shape), (bias - bn.running_mean) * scale + bn.bias


def _shortcut(add: fx.Node, gate: fx.Node) -> fx.Node:
    """The operand of the residual ``add`` that does not come from the branch of ``gate`` (the stream as it is
    now: an earlier rewrite may have replaced the node the analysis named, e.g. a deleted block's output)."""
    branch, todo = set(), [gate]
    while todo:
        n = todo.pop()
        if n is not add and n not in branch:
            branch.add(n)
            todo.extend(n.users)
    return next(a for a in add.args if isinstance(a, fx.Node) and a not in branch)


class AttentionToConvPass(VitPass):
    """After: no ``vg_conv`` modules; each site computes its decision."""

    def __init__(self, sites: Sequence[ConvSite], decisions: Mapping[str, str], stream: CoupledGroup | None = None
                 ) -> None:
        self.sites = {submodule_name(CONV_GATES, s.name): s for s in sites}
        self.decisions = dict(decisions)
        self.stream = stream

    def call(self, gm: fx.GraphModule) -> PassResult:
        counters = {"msa": 0, "conv3": 0, "conv1": 0, "skip": 0}
        nodes = {n.name: n for n in gm.graph.nodes}
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not str(node.target).startswith(CONV_GATES + "."):
                continue
            site = self.sites[str(node.target)]
            gate: AttentionConv = gm.get_submodule(str(node.target))
            choice = self.decisions.get(site.name, "msa")
            counters[choice] += 1
            if choice == "msa":
                node.replace_all_uses_with(node.args[1])
            elif choice == "skip":
                add = nodes[site.add]
                add.replace_all_uses_with(_shortcut(add, node))
                gm.graph.erase_node(add)
                node.replace_all_uses_with(node.args[1])
            else:
                with gm.graph.inserting_before(node):
                    out = self._conv(gm, node, gate, site, choice)
                if self.stream is not None:
                    self._follow(gm, site)
                node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
        drop_root(gm, CONV_GATES)
        return PassResult(gm, modified=sum(counters.values()) > 0, counters=counters)

    @staticmethod
    @torch.no_grad()
    def _conv(gm: fx.GraphModule, node: fx.Node, gate: AttentionConv, site: ConvSite, choice: str) -> fx.Node:
        u = node.args[0]
        w_v, b_v, w_o, b_o = (gm.get_parameter(p) if p is not None else None
                              for p in (site.v_weight, site.v_bias, site.o_weight, site.o_bias))
        k, c, o = gate.derived(w_v, b_v, w_o)
        c_in, d = site.channels, site.dim
        home = f"{site.name}_conv"
        g = gm.graph
        p = site.prefix
        container = nn.Module()
        pat = g.call_function(operator.getitem, (u, (slice(None), slice(p, None))))
        if choice == "conv1":
            first, second = nn.Linear(c_in, d), nn.Linear(d, c_in, bias=b_o is not None)
            w, b = _fold(k[4], c[4], gate.bn1)
            first.weight.copy_(w)
            first.bias.copy_(b)
            second.weight.copy_(o[4])
            container.add_module("0", first)
            gm.add_submodule(home, container)
            h = g.call_module(f"{home}.0", (pat,))
        else:
            gh, gw = site.grid
            first = nn.Conv2d(c_in, d, 3, padding=1)
            second = nn.Conv2d(d, c_in, 1, bias=b_o is not None)
            w, b = _fold(k.reshape(3, 3, d, c_in).permute(2, 3, 1, 0), c.sum(0), gate.bn3)
            first.weight.copy_(w)
            first.bias.copy_(b)
            second.weight.copy_(o.sum(0)[:, :, None, None])
            # (no channel count in the graph: the stream may narrow later)
            grid = g.call_method("unflatten", (g.call_method("transpose", (pat, 1, 2)), 2, (gh, gw)))
            container.add_module("0", first)
            gm.add_submodule(home, container)
            h = g.call_module(f"{home}.0", (grid,))
        if b_o is not None:
            second.bias.copy_(b_o)
        container.add_module("1", second)
        y = g.call_module(f"{home}.1", (g.call_function(torch.relu, (h,)),))
        if choice == "conv3":
            y = g.call_method("transpose", (g.call_method("flatten", (y, 2)), 1, 2))
        if p == 0:  # (the patch slice x[:, 0:] stays: it is how the analysis tells a conv1 from an MLP)
            return y
        pre = g.call_function(operator.getitem, (u, (slice(None), slice(None, p))))
        return g.call_function(torch.cat, ([pre, y], 1))

    def _follow(self, gm: fx.GraphModule, site: ConvSite) -> None:
        """Declare on the site's new layer calls the stream group's slices they follow (see the module doc)."""
        found = stream_slices(site, self.stream)
        if isinstance(found, str):
            raise PreconditionError(f"{self.name}: {site.name}: {found}; leave the site out of the conv axis")
        cols, rows, bias = found
        home = f"{site.name}_conv"
        follows = {f"{home}.0": (SliceRef(f"{home}.0.weight", 1, cols.indices, "weight.in"),),
                   f"{home}.1": (SliceRef(f"{home}.1.weight", 0, rows.indices, "weight.out"),)
                   + ((SliceRef(f"{home}.1.bias", 0, bias.indices, "bias"),) if bias is not None else ())}
        for n in gm.graph.nodes:
            if n.op == "call_module" and n.target in follows:
                n.meta[GROUP_SLICES] = {self.stream.name: follows[n.target]}

    def ensures(self, gm: fx.GraphModule) -> None:
        super().ensures(gm)
        ensure_no_calls(gm, CONV_GATES, self.name, "conv gate")

