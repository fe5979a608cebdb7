"""Instrument: a token selector in front of every token stage, key masks in the attentions after the
first stage (learned selectors), and the final-tokens module before the head.

Before (the stream entering block 3)::

    add_5 = add_4 + blocks_2_mlp_fc2
    blocks_3_norm1 = self.blocks.3.norm1(add_5)
    add_6 = add_5 + blocks_3_attn_proj

After, one-shot (``attention``) selectors::

    select = self.vg_tokens.blocks_3(add_5, q_2, k_2)   # q and k of block 2's attention
    blocks_3_norm1 = self.blocks.3.norm1(select)
    add_6 = select + blocks_3_attn_proj

After, learned (``spvit``) selectors: the selector also returns keep flags, which the next selector,
every later attention and the final tokens read::

    select = self.vg_tokens.blocks_3(add_5, alive_prev)
    x = select[0];  alive = select[1]
    ... sdpa_4 = self.vg_tokens.mask_blocks_4(q_4, k_4, v_4, alive)        # was F.scaled_dot_product_attention
    ... probs_4 = self.vg_tokens.mask_blocks_4(softmax_4, alive)            # explicit attention

Every module starts open (the identity, the unmasked attention): the graph computes exactly what it
computed before.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from vitgraph.analysis.tokens import MaskSite, ScoreSource
from vitgraph.errors import PreconditionError
from vitgraph.meta import CARRIES, SHAPE, TOKENS, submodule_name
from vitgraph.passes.base import PassResult, VitPass, require_nodes, reroute
from vitgraph.gates.tokens import FinalTokens, KeyMask, LearnedTokenSelector, TokenSelector

FINAL = f"{TOKENS}.final"


@dataclass(frozen=True)
class Stage:
    """A selector before ``block`` (its input stream ``stream``); ``source`` scores it (one-shot) or,
    when None, the learned selector does (over ``heads`` heads of the ``dim`` channels)."""

    block: int
    name: str            # the block's name, e.g. "blocks.3"
    stream: str
    source: ScoreSource | None
    prefix: int
    patches: int
    index: int           # the stage's position: packages of earlier stages in a masked graph
    dim: int = 0
    heads: int = 1


class InsertTokenSelectorsPass(VitPass):
    """After: each stage's stream passes its selector; learned stages mask every later attention's keys;
    with ``final`` (the last block's output), that stream passes :class:`FinalTokens`."""

    def __init__(self, stages: Sequence[Stage], masks: Sequence[MaskSite], final: str | None,
                 pool_mean: bool) -> None:
        self.stages, self.masks = list(stages), list(masks)
        self.final, self.pool_mean = final, pool_mean

    def requires(self, gm: fx.GraphModule) -> None:
        if hasattr(gm, TOKENS):
            raise PreconditionError(f"{self.name}: the graph already has token selectors ({TOKENS})")
        names = [n for s in self.stages for n in (s.stream, *(s.source.inputs if s.source else ()))]
        names += [m.core for m in self.masks] + ([self.final] if self.final else [])
        require_nodes(gm, names, self.name, "token stage")

    def call(self, gm: fx.GraphModule) -> PassResult:
        if not self.stages:
            return PassResult(gm, modified=False)
        gm.add_module(TOKENS, nn.Module())
        nodes = {n.name: n for n in gm.graph.nodes}
        alive: dict[int, fx.Node] = {}  # stage index -> its keep flags
        for s in self.stages:
            target = submodule_name(TOKENS, s.name)
            stream = nodes[s.stream]
            if s.source is not None:
                gm.add_submodule(target, TokenSelector(s.prefix, s.patches, s.source.scale))
                reroute(gm, stream, target, (stream, *(nodes[i] for i in s.source.inputs)))
                continue
            gm.add_submodule(target, LearnedTokenSelector(s.dim, s.heads, s.prefix, s.patches, s.index))
            call = reroute(gm, stream, target, (stream, alive.get(s.index - 1)))
            call.meta.pop(SHAPE, None)
            with gm.graph.inserting_after(call):
                flags = gm.graph.call_function(operator.getitem, (call, 1))
            with gm.graph.inserting_after(call):
                x = gm.graph.call_function(operator.getitem, (call, 0))
            call.replace_all_uses_with(x, delete_user_cb=lambda u: u not in (x, flags))
            x.meta[SHAPE] = stream.meta.get(SHAPE)
            x.meta[CARRIES] = stream.name
            alive[s.index] = flags
        for m in self.masks:
            self._mask(gm, nodes[m.core], m, alive[m.stage])
        if self.final is not None:
            gm.add_submodule(FINAL, FinalTokens(self.stages[0].prefix, self.stages[0].patches, self.pool_mean))
            last = alive[max(alive)] if alive else None
            reroute(gm, nodes[self.final], FINAL, (nodes[self.final], last))
        gm.recompile()
        return PassResult(gm, modified=True, counters={"selectors": len(self.stages), "key_masks": len(self.masks)})

    @staticmethod
    def _mask(gm: fx.GraphModule, core: fx.Node, site: MaskSite, alive: fx.Node) -> None:
        target = submodule_name(TOKENS, f"mask.{site.block}")
        gm.add_submodule(target, KeyMask(site.impl))
        if site.impl == "probs":
            reroute(gm, core, target, (core, alive))
            return
        with gm.graph.inserting_before(core):
            call = gm.graph.call_module(target, (*site.qkv_args(core), alive), dict(site.kwargs(core)))
        call.meta.update(core.meta)
        core.replace_all_uses_with(call)
        gm.graph.erase_node(core)
