"""Where an attention's value dims can be cut physically: the q/k/v projections split apart, the merge read.

UVC's value dims (methods.md §4) shrink v's rows and the output projection's columns *inside* each
head. A fused ``qkv`` projection cannot lose v rows alone (its reshape holds ``3 x heads x d``), so
the compact graph computes q, k and v with three projections instead, each from the rows the fused
one gave that role. That is exact only where the graph merely *moves* those rows into the
``(B, H, N, d)`` tensors the attention reads; this module proves it by index replay, never by names:

* every role's rows reach a ``(B, H, N, d)`` tensor (its *boundary*) through shape ops alone, with
  the token axis in order — ``rows[h][j]`` is the projection row that lands in head h, channel j;
* nothing else reads the fused projection (else it would stay and the cut would save nothing);
* the per-head outputs reach the output projection through shape ops alone as the plain merge
  ``(B, H, N, dv) -> (B, N, H * dv)``.

:func:`value_plan` returns a :class:`ValuePlan` or the reason the site's value dims stay. The
analysis calls it on the dense graph (``prunable["head_dim"]``); the materialize pass calls it
again on the graph it rewrites.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from vitgraph.analysis import index as ix
from vitgraph.analysis.attention import core_io, walk_back_to_linear
from vitgraph.analysis.ops import linear_info, op_kind
from vitgraph.meta import AttentionSite, shape_of


@dataclass(frozen=True)
class RoleCut:
    """One role of the attention (q, k or v) as its own projection: ``boundary`` is replaced by
    ``linear(x, W[rows]).unflatten(-1, (H, d)).transpose(1, 2)``."""

    role: str
    boundary: str                  # node holding the (B, H, N, d) tensor the role becomes
    rows: tuple[tuple[int, ...], ...]  # per head, per channel: the producer row


@dataclass(frozen=True)
class ValuePlan:
    producer: str                  # the linear the roles below come from (for v; fused with q/k or not)
    roles: tuple[RoleCut, ...]     # every role read from ``producer`` (v always; q/k when fused with it)
    out: str                       # the per-head outputs (B, H, N, dv)
    merge: str                     # the proj input they reach as (B, N, H * dv)
    proj: str


def _token_code(shape: tuple[int, ...]) -> torch.Tensor:
    """A (B, N, R) code ``n * R + r``: which token and which row every entry holds."""
    n, r = shape[-2], shape[-1]
    return (torch.arange(n, dtype=torch.float64)[:, None] * r + torch.arange(r, dtype=torch.float64)).expand(
        *shape).clone()


def _head_rows(code: torch.Tensor | None, width: int) -> tuple[tuple[int, ...], ...] | None:
    """Per head the row of each channel, if ``code`` (B, H, N, d) is exactly rows moved to heads, tokens in order."""
    if not isinstance(code, torch.Tensor) or code.dim() != 4:
        return None
    rows = code[0, :, 0, :]
    n = torch.arange(code.shape[2], dtype=torch.float64)[None, None, :, None] * width
    if (rows < 0).any() or not torch.equal(code, (n + rows[None, :, None, :]).expand_as(code)):
        return None
    return tuple(tuple(int(r) for r in head) for head in rows)


def _shape_prefix(path: list[fx.Node], gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes after the producer that only move data, up to the first that computes."""
    out = []
    for node in path[1:]:
        if op_kind(node, gm) != "shape":
            break
        out.append(node)
    return out


def _role_cut(role: str, t: fx.Node, lin: fx.Node, env: dict[fx.Node, torch.Tensor], width: int,
              gm: fx.GraphModule) -> RoleCut | str:
    found, path = walk_back_to_linear(t, gm)
    if found is not lin:
        return f"{role} does not come from %{lin.name}"
    for node in reversed(_shape_prefix(path, gm)):
        rows = _head_rows(env.get(node), width)
        if rows is not None:
            return RoleCut(role, node.name, rows)
    return f"{role} is not a plain (B, heads, tokens, width) view of %{lin.name}'s rows"


def _only_feeds(start: fx.Node, ends: set[fx.Node], gm: fx.GraphModule) -> str | None:
    """None when everything reading ``start`` (up to ``ends``) only serves ``ends`` — it dies once they are
    replaced — and only moves data (a size read, ``x.shape``, is fine); else what stands in the way."""
    serving = set(ends)
    for end in ends:
        serving |= set(_between(start, end))
    stack, seen = list(start.users), set()
    while stack:
        node = stack.pop()
        if node in seen or node in ends:
            continue
        seen.add(node)
        if node not in serving:
            return f"%{node.name} also reads %{start.name}"
        if op_kind(node, gm) != "shape" and shape_of(node) is not None:
            return f"%{node.name} computes between %{start.name} and the heads"
        stack.extend(node.users)
    return None


def _merge(out: fx.Node, proj: fx.Node, gm: fx.GraphModule) -> fx.Node | str:
    """The proj input, when it is the plain merge of ``out`` (B, H, N, dv) reached through shape ops alone."""
    shape = shape_of(out)
    if shape is None or len(shape) != 4 or not proj.args or not isinstance(proj.args[0], fx.Node):
        return "the per-head outputs are not a (B, heads, tokens, width) tensor"
    merge = proj.args[0]
    b, h, n, d = shape
    code = (torch.arange(n, dtype=torch.float64)[None, None, :, None] * (h * d)
            + torch.arange(h, dtype=torch.float64)[None, :, None, None] * d
            + torch.arange(d, dtype=torch.float64)).expand(*shape).clone()
    at = ix.propagate(gm, {out: code}).get(merge)
    if at is None or tuple(at.shape) != (b, n, h * d) or not torch.equal(at, _token_code((b, n, h * d))):
        return f"%{merge.name} is not the plain merge of the heads (B, tokens, heads x width)"
    why = _only_feeds(out, {merge}, gm)
    return merge if why is None else why


def _between(src: fx.Node, dst: fx.Node) -> list[fx.Node]:
    """Nodes on some path from ``src`` to ``dst``, both excluded."""
    ahead, stack = set(), list(src.users)
    while stack:
        node = stack.pop()
        if node not in ahead and node is not dst:
            ahead.add(node)
            stack.extend(node.users)
    behind, stack = set(), list(dst.all_input_nodes)
    while stack:
        node = stack.pop()
        if node not in behind and node in ahead:
            behind.add(node)
            stack.extend(node.all_input_nodes)
    return list(behind)


def value_plan(gm: fx.GraphModule, site: AttentionSite) -> ValuePlan | str:
    """How ``site``'s value dims are cut in ``gm`` (shapes propagated), or why they cannot be."""
    nodes = {n.name: n for n in gm.graph.nodes}
    io = core_io(gm, site.core)
    if io is None or site.proj is None or site.v not in nodes or site.proj not in nodes:
        return "the attention's core, value projection or output projection is not in the graph"
    lin = nodes[site.v]
    info = linear_info(lin, gm)
    shape = shape_of(lin)
    if info is None or info.channel_axis != -1 or shape is None or len(shape) != 3:
        return f"%{lin.name} is not a linear over (B, tokens, channels)"
    if info.bias == "<computed>":
        return f"the bias of %{lin.name} is computed in the graph"
    env = ix.propagate(gm, {lin: _token_code(shape)})
    wanted = [(r, t) for r, t, name in (("q", io[0], site.q), ("k", io[1], site.k), ("v", io[2], site.v))
              if name == site.v]
    roles = []
    for role, t in wanted:
        cut = _role_cut(role, t, lin, env, shape[-1], gm)
        if isinstance(cut, str):
            return cut
        roles.append(cut)
    why = _only_feeds(lin, {nodes[c.boundary] for c in roles}, gm)
    if why is not None:
        return why
    merge = _merge(io[3], nodes[site.proj], gm)
    if isinstance(merge, str):
        return merge
    return ValuePlan(lin.name, tuple(roles), io[3].name, merge.name, site.proj)


__all__ = ["RoleCut", "ValuePlan", "value_plan"]
