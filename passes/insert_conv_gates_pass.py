"""Instrument: an :class:`AttentionConv` on the output of every attention that may become a convolution.

Before (block 3's attention branch)::

    blocks_3_norm1 = self.blocks.3.norm1(add_5)
    ...
    blocks_3_attn_proj = self.blocks.3.attn.proj(reshape_7)
    blocks_3_ls1 = self.blocks.3.ls1(blocks_3_attn_proj)

After (the convolutions read what the value projection reads: the normalised block input, or, with
``width.embed``, that input through the embedding channels' gate, so a dropped channel feeds no conv)::

    blocks_3_attn_proj = self.blocks.3.attn.proj(reshape_7)
    conv = self.vg_conv.blocks_3_attn(blocks_3_norm1, blocks_3_attn_proj,
                                      blocks_3_attn_qkv_weight, blocks_3_attn_qkv_bias,   # get_attr: live
                                      blocks_3_attn_proj_weight, blocks_3_attn_proj_bias)
    blocks_3_ls1 = self.blocks.3.ls1(conv)

The convolutions are derived from the value and projection weights on every call (weights shared with
the attention). The module starts open: it returns the attention's output, so the graph is unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from vitgraph.analysis.conv import ConvSite
from vitgraph.gates.conv import AttentionConv
from vitgraph.errors import PreconditionError
from vitgraph.meta import CONV_GATES, submodule_name
from vitgraph.passes.base import PassResult, VitPass, require_nodes, reroute


class InsertConvGatesPass(VitPass):
    """After: every site's projection output passes its ``vg_conv`` module."""

    def __init__(self, sites: Sequence[ConvSite]) -> None:
        self.sites = list(sites)

    def requires(self, gm: fx.GraphModule) -> None:
        if hasattr(gm, CONV_GATES):
            raise PreconditionError(f"{self.name}: the graph already has conv gates ({CONV_GATES})")
        require_nodes(gm, [n for s in self.sites for n in (s.v, s.proj, s.add)], self.name, "attention site")

    def call(self, gm: fx.GraphModule) -> PassResult:
        if not self.sites:
            return PassResult(gm, modified=False)
        gm.add_module(CONV_GATES, nn.Module())
        nodes = {n.name: n for n in gm.graph.nodes}
        for s in self.sites:
            target = submodule_name(CONV_GATES, s.name)
            gm.add_submodule(target, AttentionConv(s.heads, s.dim, s.prefix, s.grid, torch.tensor(s.v_rows),
                                                   torch.tensor(s.o_cols)))
            proj = nodes[s.proj]
            with gm.graph.inserting_before(proj):
                params = [gm.graph.get_attr(p) if p is not None else None
                          for p in (s.v_weight, s.v_bias, s.o_weight, s.o_bias)]
            reroute(gm, proj, target, (nodes[s.v].args[0], proj, *params))
        gm.recompile()
        return PassResult(gm, modified=True, counters={"sites": len(self.sites)})
