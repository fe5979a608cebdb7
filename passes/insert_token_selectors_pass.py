"""Instrument: a :class:`TokenSelector` in front of every token stage, and package removal before a mean pool.

Before (the stream entering block 3)::

    add_5 = add_4 + blocks_2_mlp_fc2
    blocks_3_norm1 = self.blocks.3.norm1(add_5)
    add_6 = add_5 + blocks_3_attn_proj

After::

    add_5 = add_4 + blocks_2_mlp_fc2
    select = self.vg_tokens.blocks_3(add_5, q_2, k_2)   # q and k of block 2's attention
    blocks_3_norm1 = self.blocks.3.norm1(select)
    add_6 = select + blocks_3_attn_proj

With a mean-pooling head, the last block's output also passes ``self.vg_tokens.unpack`` (drops the
packages). Selectors start open (``keep`` None): the graph computes exactly what it computed before.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from vitgraph.analysis.tokens import ScoreSource
from vitgraph.errors import PreconditionError
from vitgraph.gates import DropPackages, TokenSelector
from vitgraph.meta import TOKENS, submodule_name
from vitgraph.passes.base import PassResult, VitPass, require_nodes, reroute

UNPACK = f"{TOKENS}.unpack"


@dataclass(frozen=True)
class Stage:
    """A selector: before ``block`` (its input stream ``stream``), scored by ``source``."""

    block: int
    name: str            # the block's name, e.g. "blocks.3"
    stream: str
    source: ScoreSource
    prefix: int
    packages: int        # packages of earlier stages at the end of the tokens


class InsertTokenSelectorsPass(VitPass):
    """After: each stage's stream passes its selector; with ``unpack``, the final stream drops the packages."""

    def __init__(self, stages: Sequence[Stage], unpack_after: str | None) -> None:
        self.stages = list(stages)
        self.unpack_after = unpack_after

    def requires(self, gm: fx.GraphModule) -> None:
        if hasattr(gm, TOKENS):
            raise PreconditionError(f"{self.name}: the graph already has token selectors ({TOKENS})")
        names = [n for s in self.stages for n in (s.stream, *s.source.inputs)]
        require_nodes(gm, names + ([self.unpack_after] if self.unpack_after else []), self.name, "token stage")

    def call(self, gm: fx.GraphModule) -> PassResult:
        if not self.stages:
            return PassResult(gm, modified=False)
        gm.add_module(TOKENS, nn.Module())
        nodes = {n.name: n for n in gm.graph.nodes}
        for s in self.stages:
            target = submodule_name(TOKENS, s.name)
            gm.add_submodule(target, TokenSelector(s.prefix, s.packages, s.source.scale))
            stream = nodes[s.stream]
            reroute(gm, stream, target, (stream, *(nodes[i] for i in s.source.inputs)))
        if self.unpack_after is not None:
            gm.add_submodule(UNPACK, DropPackages())
            reroute(gm, nodes[self.unpack_after], UNPACK, (nodes[self.unpack_after],))
        gm.recompile()
        return PassResult(gm, modified=True, counters={"selectors": len(self.stages)})
