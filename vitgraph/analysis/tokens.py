"""Where tokens may be dropped, and what scores them: read from the graph, for the token passes.

A selector before block b scores content tokens by the attention they receive in block b-1's
attention site. ``score_source`` finds the nodes that attention exposes: q and k right before a
``scaled_dot_product_attention`` call, or the probabilities of an explicit softmax attention.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch.fx as fx

from vitgraph.analysis.ops import op_kind, sdpa_mask, sdpa_qkv
from vitgraph.meta import Block, TokenInfo, shape_of


@dataclass(frozen=True)
class ScoreSource:
    """The attention a selector reads: ``inputs`` are (q, k) node names or (probabilities,)."""

    block: int                   # the block whose attention it is
    inputs: tuple[str, ...]
    scale: float | None          # q k^T scale for (q, k); None for probabilities
    heads: int
    head_dim: int


def default_stages(blocks: Sequence[Block]) -> tuple[int, ...]:
    """Selectors at L/4, L/2 and 3L/4 of the token-prunable blocks (methods.md §3.1)."""
    prunable = [b.index for b in blocks if b.token_prunable and b.index > 0]
    n = len(prunable)
    return tuple(sorted({prunable[min(n - 1, (n * q) // 4)] for q in (1, 2, 3)})) if n else ()


def score_source(gm: fx.GraphModule, blocks: Sequence[Block], tokens: TokenInfo, b: int) -> ScoreSource | str:
    """The attention that scores tokens for a selector before block ``b``, or why there is none."""
    if b <= 0 or b >= len(blocks):
        return f"block {b} has no block before it whose attention can score its tokens" if b <= 0 else \
            f"the model has blocks 0..{len(blocks) - 1}"
    prev, here = blocks[b - 1], blocks[b]
    a = prev.attention
    n = here.tokens_in
    if a is None or a.mode != "token":
        return f"block {b - 1} (before it) has no attention over tokens to score them with"
    if a.tokens_q != n or a.tokens_kv != n:
        return f"block {b - 1}'s attention runs over {a.tokens_q}x{a.tokens_kv} tokens, not the {n} entering block {b}"
    nodes = {x.name: x for x in gm.graph.nodes}
    core = nodes[a.core]
    if a.impl == "sdpa":
        q, k, _ = sdpa_qkv(core)
        if sdpa_mask(core) is not None:
            return f"block {b - 1}'s attention adds a mask or bias to its logits"
        if shape_of(q) is None or len(shape_of(q)) != 4 or shape_of(k) != shape_of(q):
            return f"block {b - 1}'s q and k are not (batch, heads, tokens, dim) tensors of one shape"
        scale = core.kwargs.get("scale")
        return ScoreSource(prev.index, (q.name, k.name), float(scale) if scale else 1.0 / math.sqrt(a.head_dim),
                           a.heads, a.head_dim)
    if op_kind(core, gm) == "softmax" and shape_of(core) == (shape_of(core) or (0,))[:1] + (a.heads, n, n):
        return ScoreSource(prev.index, (core.name,), None, a.heads, a.head_dim)
    return f"block {b - 1}'s attention probabilities are not a (batch, heads, tokens, tokens) tensor"
