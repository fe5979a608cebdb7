"""Where tokens may be dropped (``mark_token_prunable``: each block's reason where not), and what scores them:
read from the graph, for the token passes.

A selector before block b scores content tokens by the attention they receive in block b-1's
attention site. ``score_source`` finds the nodes that attention exposes: q and k right before a
``scaled_dot_product_attention`` call, or the probabilities of an explicit softmax attention.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch.fx as fx

from vitgraph.analysis.ops import input_dependent, op_kind, sdpa_mask, sdpa_qkv
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


def _grid_reshape(candidates: list[fx.Node], counts: set[int], where: str = "", heads: int | None = None
                  ) -> str | None:
    """A node that lays the tokens out as an H x W grid (a conv, a pooling, a window partition). With the
    block's ``heads``: a node that still holds the token count and the heads is the attention's head
    layout ((B, N, 3, heads, d), (3, B, heads, N, d)), whatever its other sizes multiply to."""
    for n in candidates:
        s = shape_of(n)
        hit = next(((i, h, w) for i, (h, w) in enumerate(zip(s[1:], s[2:]), 1)
                    if h > 1 and w > 1 and h * w in counts), None) if s and len(s) >= 4 else None
        if hit and heads is not None and heads in s:
            i = hit[0]
            hit = None if any(d in counts for d in (*s[1:i], *s[i + 2:])) else hit[1:]
        elif hit:
            hit = hit[1:]
        if hit:
            return f"%{n.name}{' ' + where if where else ''} reshapes tokens into a {hit[0]}x{hit[1]} grid"
    return None


def _own_token_barrier(b: Block, tokens: TokenInfo, nodes: dict[str, fx.Node]) -> str | None:
    """Why tokens may not be dropped before block ``b`` because of the block itself."""
    a = b.attention
    if tokens.layout != "sequence":
        return "tokens form a spatial grid here (hierarchical or windowed model)"
    if a is None:
        return "the block has no attention to mask"
    if a.mode == "separable":
        return "separable attention pools every token into one context vector: no token-by-token map to mask"
    if a.mode != "token":
        return "channel attention mixes every token into each output"
    if a.tokens_q != 1 and (a.tokens_kv != b.tokens_in or a.tokens_q != b.tokens_in):
        return f"attention sees {a.tokens_kv} of the block's {b.tokens_in} tokens (windowed/pooled)"
    if a.bias in ("rel_pos_table", "params"):
        return "the attention adds a fixed-size relative position bias"
    if b.tokens_in != b.tokens_out:
        return "the block changes the number of tokens"
    return _grid_reshape([nodes[n] for n in b.nodes], {b.tokens_in, b.tokens_in - tokens.prefix_tokens}, heads=a.heads)


def _fixed_token_table(gm: fx.GraphModule, members: list[fx.Node], counts: set[int], data: set[fx.Node]
                       ) -> str | None:
    """Why not, where the block combines its tokens element-wise with a tensor computed from parameters alone
    that has a token axis (rotary position tables): it would not follow a gather of the tokens."""
    for n in members:
        if op_kind(n, gm) not in ("mul", "add", "div"):
            continue
        for other in n.all_input_nodes:
            shape = shape_of(other)
            if other not in data and shape and len(shape) >= 2 and shape[-2] in counts and shape[-2] > 1:
                return (f"%{n.name} combines the tokens with %{other.name}, a fixed table over {shape[-2]} tokens "
                        "(e.g. rotary position embeddings)")
    return None


READER = ("an attention pool (its queries are its own, its keys the stream's tokens): tokens dropped before an "
          "earlier block reach it as fewer keys")


def mark_token_prunable(gm: fx.GraphModule, blocks: list[Block], tokens: TokenInfo) -> list[Block]:
    """Decide per block whether tokens may be dropped before it, with the reason where not."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out: list[Block] = []
    # scan from the last block backwards: a barrier at block j forbids dropping before any i <= j
    barrier: str | None = None
    if tokens.pooling not in ("token", "avg", "attn"):
        barrier = f"the head pools tokens by {tokens.pooling!r}, not a class token or a mean"
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    following = {b.index: nxt for b, nxt in zip(blocks, blocks[1:])}
    data = input_dependent(gm, values_only=True)  # a RoPE table built for the image's grid is fixed all the same
    for b in reversed(blocks):
        own = _own_token_barrier(b, tokens, nodes) or _fixed_token_table(
            gm, [nodes[n] for n in b.nodes], {b.tokens_in, b.tokens_in - tokens.prefix_tokens}, data)
        if own is None:  # ops between this block and the next (stage transitions), or the head
            nxt = following.get(b.index)
            stop = order[nodes[nxt.input]] if nxt is not None else len(order)
            gap = [n for n in gm.graph.nodes if order[nodes[b.output]] < order[n] <= stop]
            own = _grid_reshape(gap, {b.tokens_out, b.tokens_out - tokens.prefix_tokens}, "after the block")
        reason = own or barrier or (READER if b.reads_stream(tokens.tokens) else None)
        if own:  # what blocks dropping here also blocks dropping before any earlier block
            barrier = f"later block {b.index}: {own}"
        out.append(replace(b, token_prunable=reason is None, token_reason=reason))
    return list(reversed(out))
