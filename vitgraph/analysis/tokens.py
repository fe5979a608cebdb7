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


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclass(frozen=True)
class MaskSite:
    """An attention after a learned token stage: its keys are masked with that stage's keep flags."""

    block: int
    core: str        # the sdpa call, or the softmax of an explicit attention
    impl: str        # "sdpa" | "probs"
    stage: int       # index of the latest stage before the block

    @staticmethod
    def qkv_args(core: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
        return sdpa_qkv(core)

    @staticmethod
    def kwargs(core: fx.Node) -> dict[str, object]:
        """The sdpa call's arguments after q, k and v, by name."""
        out = {name: v for name, v in zip(_SDPA_ARGS[3:], core.args[3:])}
        out.update({k: v for k, v in core.kwargs.items() if k not in _SDPA_ARGS[:3]})
        return out


def mask_sites(gm: fx.GraphModule, blocks: Sequence[Block], stages: Sequence[int]) -> list[MaskSite] | str:
    """Every attention from the first stage on, with the stage whose flags mask it; or why one cannot be masked."""
    nodes = {x.name: x for x in gm.graph.nodes}
    out = []
    for b in blocks[stages[0]:] if stages else ():
        a = b.attention
        if a is None:
            continue
        stage = max(i for i, s in enumerate(stages) if s <= b.index)
        if a.mode != "token" or a.tokens_q != a.tokens_kv:
            return f"block {b.index}'s attention is not a self-attention over the tokens"
        core = nodes[a.core]
        if a.impl == "sdpa":
            out.append(MaskSite(b.index, a.core, "sdpa", stage))
        elif op_kind(core, gm) == "softmax":
            out.append(MaskSite(b.index, a.core, "probs", stage))
        else:
            return f"block {b.index}'s attention has no softmax node to mask"
    return out
