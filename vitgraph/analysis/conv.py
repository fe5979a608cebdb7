"""Where attention may become a convolution (methods.md §1), and what the conv branches are built from.

A site qualifies when it attends globally over the prefix tokens plus a complete static Gh x Gw patch
grid, in a (batch, tokens, channels) stream, with no bias or mask on its logits, with every head's
value rows and output-projection columns mapped (the value-dim group), and with its branch ending in
a plain residual add (so ``skip`` can delete it). ``ConvSite`` carries everything the passes need:
the value projection (whose input the convolutions read), the projection output, the parameter names and
per-head rows/columns, the grid. ``stream_slices`` maps the convolutions' channels onto the embedding group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch.fx as fx

from vitgraph.analysis.blocks import removable_residual
from vitgraph.analysis.depth import branch_sets
from vitgraph.analysis.ops import linear_info
from vitgraph.meta import CoupledGroup, SliceRef, Structure, shape_of


class Traced(Protocol):
    """What the conv analysis reads of a ``VitGraph`` (which is built from the analyses, so not imported here)."""

    gm: fx.GraphModule
    structure: Structure


@dataclass(frozen=True)
class ConvSite:
    """One attention the conv axis may replace."""

    name: str                    # the attention's module path, e.g. "blocks.3.attn"
    block: int
    v: str                       # the value projection: the convolutions read its input (the normalised
                                 # block input, through the embedding channels' gate when they are gated)
    proj: str                    # the output projection node (the branch output the conv replaces)
    add: str                     # the residual add (``skip`` replaces it by its shortcut)
    v_weight: str
    v_bias: str | None
    v_rows: tuple[tuple[int, ...], ...]     # per head: its value rows
    o_weight: str
    o_bias: str | None
    o_cols: tuple[tuple[int, ...], ...]     # per head: the projection columns it feeds
    heads: int
    dim: int                     # value width per head (d)
    channels: int                # C
    prefix: int
    grid: tuple[int, int]
    msa_nodes: frozenset[str]    # what the attention branch computes (priced away by a conv or skip)

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]


def conv_sites(g: Traced) -> tuple[list[ConvSite], dict[str, str]]:
    """The sites that can become convolutions, and for every other attention the reason it cannot."""
    st, gm = g.structure, g.gm
    info = st.tokens
    nodes = {n.name: n for n in gm.graph.nodes}
    groups = {grp.name: grp for grp in st.groups}
    branches = branch_sets(gm, st.blocks)
    sites, reasons = [], {}
    for b in st.blocks:
        a = b.attention
        if a is None:
            continue
        why = _reason(g, nodes, b, a, groups, branches)
        if why is not None:
            reasons[a.name] = why
            continue
        vd = groups[f"{a.name}.v_dims"]
        rows = next(s for s in vd.slices if s.what == "weight.out")
        bias = next((s for s in vd.slices if s.what == "bias"), None)
        cols = next(s for s in vd.slices if s.what == "weight.in")
        per = a.v_head_dim
        v_rows = tuple(tuple(r for u in rows.indices[h * per:(h + 1) * per] for r in u) for h in range(a.heads))
        o_cols = tuple(tuple(c for u in cols.indices[h * per:(h + 1) * per] for c in u) for h in range(a.heads))
        proj = linear_info(nodes[a.proj], gm)
        res = removable_residual(b, "attn")
        sites.append(ConvSite(a.name, b.index, a.v, a.proj, res.add, rows.target,
                              bias.target if bias is not None else None, v_rows, cols.target,
                              proj.bias if proj.bias not in (None, "<computed>") else None, o_cols, a.heads, per,
                              info.embed_dim, info.prefix_tokens, info.grid, branches[f"branch.{b.index}.attn"]))
    return sites, reasons


def _reason(g: Traced, nodes: dict[str, fx.Node], b, a, groups, branches) -> str | None:  # noqa: ANN001
    info = g.structure.tokens
    if a.mode == "separable":
        return "separable attention has no token-by-token map a convolution could take the place of"
    if a.mode != "token":
        return "it attends over channels, not tokens"
    if info.grid is None or info.layout != "sequence":
        return "the model has no static patch grid in a (batch, tokens, channels) stream"
    if a.tokens_q != info.tokens or a.tokens_kv != info.tokens or b.tokens_in != info.tokens:
        return (f"it attends over {a.tokens_q}x{a.tokens_kv} tokens, not the {info.prefix_tokens} prefix tokens plus "
                f"the whole {info.grid[0]}x{info.grid[1]} grid (windowed or pooled attention)")
    if a.bias is not None:
        return f"its logits get a {a.bias} added (relative positions or a mask)"
    if f"{a.name}.v_dims" not in groups or a.proj is None:
        return a.prunable.get("head_dim") or "its value rows and projection columns could not be mapped per head"
    if removable_residual(b, "attn") is None or f"branch.{b.index}.attn" not in branches:
        return "its branch does not end in a plain residual add"
    v = nodes[a.v]
    if not v.args or not isinstance(v.args[0], fx.Node) or shape_of(v.args[0]) != (shape_of(v.args[0]) or (0,))[:1] \
            + (info.tokens, info.embed_dim):
        return "its value projection does not read the (batch, tokens, channels) stream"
    return None


def stream_slices(site: ConvSite, stream: CoupledGroup) -> tuple[SliceRef, SliceRef, SliceRef | None] | str:
    """The embedding group's slices the site's convolutions follow (``width.embed``): the value projection's
    input columns (the first layer's input channels), the output projection's rows and bias (the second
    layer's output channels and bias); or why the group does not hold them."""
    held = {(s.target, s.what): s for s in stream.slices}
    cols, rows = held.get((site.v_weight, "weight.in")), held.get((site.o_weight, "weight.out"))
    bias = held.get((site.o_bias, "bias")) if site.o_bias is not None else None
    if cols is None or rows is None or (site.o_bias is not None and bias is None):
        return ("the embedding group does not hold its value projection's input columns and output projection's "
                "rows, so its convolutions could not narrow with the stream")
    return cols, rows, bias
