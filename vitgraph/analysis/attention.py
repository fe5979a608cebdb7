"""Recognise attention sites in a shape-annotated graph.

An attention *core* is a ``scaled_dot_product_attention`` call, or a softmax whose input comes from
``q @ k^T`` (through scaling, biases, masks) and whose output is multiplied by ``v``. From the core we
walk back to the projections producing q, k and v and forward to the output projection, and replay
the graph's reshapes on row numbers (``index.propagate``) to learn heads, head widths and which
weight rows and columns each head owns. Nothing here depends on class or attribute names.
"""
from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from vitgraph.analysis import index as ix
from vitgraph.analysis.mixing import Mix, talking_heads
from vitgraph.analysis.ops import (PRODUCTS, common_prefix, module_path, operands, op_kind, sdpa_mask, sdpa_qkv,
                                   tensor_args)
from vitgraph.meta import SHAPE, VALUE, AttentionSite, shape_of

# ops a walk from q/k/v back to its projection may cross: they move or rescale values per position
_BACK_THROUGH = {"shape", "norm", "mul", "div", "add", "act", "dropout", "function", "module", "method", "conv",
                 "pool", "reduce"}


@dataclass
class Found:
    """Working record of one attention while it is being recognised (not stored in meta)."""

    site: AttentionSite
    q_rows: list[list[int]] = field(default_factory=list)     # per head: rows of the q producer
    k_rows: list[list[int]] = field(default_factory=list)
    v_rows: list[list[int]] = field(default_factory=list)
    proj_cols: list[list[int]] = field(default_factory=list)  # per head, per value dim: proj input column
    score_inputs: list[fx.Node] = field(default_factory=list)  # tensors added to / multiplying the logits
    out: fx.Node | None = None                                # the per-head outputs (sdpa, or attn @ v)
    mixes: list[Mix] = field(default_factory=list)            # talking heads, in graph order


@dataclass(frozen=True)
class _Geometry:
    mode: str          # "token" | "channel"
    heads: int
    head_dim: int
    v_head_dim: int
    tokens_q: int
    tokens_kv: int
    ch: int            # channel axis of q and v (4-D layout)
    k_ch: int          # channel axis of k as it reaches the core (it may arrive transposed)


def _kind(node: fx.Node, gm: fx.GraphModule) -> str:
    """``op_kind``, except that a product with a parameter (a weight across heads: vit-pytorch's talking heads,
    ``einsum('b h i j, h g -> b g i j', attn, mix)``) is the linear it is, not an attention product."""
    kind = op_kind(node, gm)
    if kind in PRODUCTS and any(_is_weight(a) for a in operands(node)):
        return "linear"
    return kind


def _is_weight(node: object) -> bool:
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.all_input_nodes \
            and len(node.all_input_nodes) == 1 and node.op != "get_attr" and node.meta.get(SHAPE) is not None \
            and len(node.meta[SHAPE]) <= 2:
        node = node.all_input_nodes[0]
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _walk_back(start: fx.Node, gm: fx.GraphModule, want: str | frozenset[str], through: set[str],
               depth: int = 12) -> tuple[fx.Node | None, list[fx.Node]]:
    """Nearest ancestor (or ``start`` itself) of kind ``want``, crossing only ops in ``through``.

    Returns the node found and the path from it back to ``start``.
    """
    parent: dict[fx.Node, fx.Node | None] = {start: None}
    queue = deque([(start, 0)])
    while queue:
        node, d = queue.popleft()
        kind = _kind(node, gm)
        if kind == want or (not isinstance(want, str) and kind in want):
            path, cur = [], node
            while cur is not None:
                path.append(cur)
                cur = parent[cur]
            return node, path
        if d >= depth or (node is not start and kind not in through):
            continue
        for a in tensor_args(node):
            if a not in parent:
                parent[a] = node
                queue.append((a, d + 1))
    return None, []


def _walk_forward(start: fx.Node, gm: fx.GraphModule, want: str | frozenset[str], through: set[str],
                  depth: int = 8) -> tuple[fx.Node | None, fx.Node | None]:
    """Nearest descendant of kind ``want``; returns it and the input through which it was reached."""
    queue = deque([(start, None, 0)])
    seen = {start}
    while queue:
        node, via, d = queue.popleft()
        kind = _kind(node, gm)
        if node is not start and (kind == want or (not isinstance(want, str) and kind in want)):
            return node, via
        if d >= depth or (node is not start and kind not in through):
            continue
        for u in node.users:
            if u not in seen:
                seen.add(u)
                queue.append((u, node, d + 1))
    return None, None


def _classify_bias(node: object, gm: fx.GraphModule) -> str | None:
    """What an additive attention bias is made of: an indexed position table, parameters, or a mask."""
    if not isinstance(node, fx.Node) or (node.op == "placeholder" and node.meta.get(VALUE, 0) is None):
        return None
    params = {n for n, _ in gm.named_parameters()}
    seen, stack, indexed, from_param = {node}, [node], False, False
    while stack:
        n = stack.pop()
        if n.op == "get_attr":
            from_param |= str(n.target) in params
        elif n.op == "call_module":  # e.g. a small MLP turning relative coordinates into a bias
            from_param |= any(True for _ in gm.get_submodule(n.target).parameters())
        if n.op == "call_function" and n.target in (operator.getitem, torch.index_select, torch.gather):
            idx_args = n.args[1] if isinstance(n.args[1], tuple) else n.args[1:]
            indexed |= any(isinstance(a, fx.Node) and shape_of(a) is not None for a in idx_args)
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    if from_param:
        return "rel_pos_table" if indexed else "params"
    return "mask"


def strongest_bias(biases: list[fx.Node], gm: fx.GraphModule) -> str | None:
    kinds = {_classify_bias(b, gm) for b in biases}
    return next((k for k in ("rel_pos_table", "params", "mask") if k in kinds), None)


@dataclass(frozen=True)
class _Core:
    node: fx.Node                   # the sdpa call, or the softmax
    impl: str                       # "sdpa" | "explicit"
    q: fx.Node
    k: fx.Node
    v: fx.Node
    out: fx.Node                    # the tensor of per-head outputs
    score_path: tuple[fx.Node, ...]  # q @ k^T ... softmax input
    biases: tuple[fx.Node, ...]      # tensors added to the logits (position tables, masks)
    scales: tuple[fx.Node, ...]      # tensors multiplying the logits (per-head temperatures)


def _cores(gm: fx.GraphModule) -> list[_Core]:
    """Every attention core in the graph."""
    found: list[_Core] = []
    for n in gm.graph.nodes:
        kind = op_kind(n, gm)
        if kind == "sdpa":
            q, k, v = sdpa_qkv(n)
            mask = sdpa_mask(n)
            found.append(_Core(n, "sdpa", q, k, v, n, (), (mask,) if isinstance(mask, fx.Node) else (), ()))
        elif kind == "softmax":
            src = tensor_args(n)
            if not src:
                continue
            m1, back = _walk_back(src[0], gm, PRODUCTS, {"add", "mul", "div", "shape", "linear", "dropout",
                                                         "function", "sub", "method"}, depth=8)
            m2, via = _walk_forward(n, gm, PRODUCTS, {"dropout", "mul", "div", "add", "shape", "linear", "function"})
            if m1 is None or m2 is None or len(operands(m1)) != 2 or len(operands(m2)) != 2 \
                    or operands(m2)[0] is not via:
                continue
            if any(c.out is m2 for c in found):  # a second softmax mixed into the same attention (ConViT)
                continue
            (q, k), v = operands(m1), operands(m2)[1]

            def others(kinds: tuple[str, ...]) -> tuple[fx.Node, ...]:
                return tuple(a for p in back if op_kind(p, gm) in kinds
                             for a in tensor_args(p) if a not in back and a is not q)

            found.append(_Core(n, "explicit", q, k, v, m2, tuple(back), others(("add", "function")),
                               others(("mul", "div"))))
    return found


def _per_head_rows(idx: torch.Tensor, heads: int, ch_axis: int) -> list[list[int]] | None:
    """Producer rows owned by each head, read off an index tensor of shape (B, H, ..)."""
    rows = [ix.line(idx.select(1, h), ch_axis - 1) for h in range(heads)]
    return None if any(v < 0 for r in rows for v in r) else rows


def _geometry(impl: str, q: fx.Node, k: fx.Node, v: fx.Node, q_idx: torch.Tensor | None,
              k_idx: torch.Tensor | None, batch: int) -> _Geometry:
    """Heads, widths and token counts, reading the channel axis off the propagated row numbers.

    q is (B, H, [windows...,] N, d) — or (B, H, d, N) for channel attention — or (B*H, N, d).
    """
    qs, ks, vs = shape_of(q), shape_of(k), shape_of(v)
    r, kr, vr = len(qs), len(ks), len(vs)
    channel = r == 4 and q_idx is not None and q_idx.dim() == 4 and ix.channel_axis(q_idx) == 2
    mode = "channel" if channel else "token"
    ch, tok = (r - 2, r - 1) if channel else (r - 1, r - 2)
    k_ch = ix.channel_axis(k_idx) if k_idx is not None and k_idx.dim() == kr else None
    if k_ch not in (kr - 2, kr - 1):  # explicit attention receives k transposed; sdpa does not
        k_ch = (kr - 2 if impl == "explicit" else kr - 1) if mode == "token" else ch
    return _Geometry(
        mode=mode, heads=qs[1] if r >= 4 else max(1, qs[0] // batch), head_dim=qs[ch],
        v_head_dim=vs[vr - 2] if channel else vs[vr - 1], tokens_q=qs[tok],
        tokens_kv=ks[kr - 1] if k_ch == kr - 2 else ks[kr - 2], ch=ch, k_ch=k_ch)


def _output_projection(gm: fx.GraphModule, out: fx.Node, mode: str) -> tuple[fx.Node | None, list[list[int]]]:
    """The linear consuming the merged heads, and per (head, value dim) the input column it feeds.

    Replays the number ``h * dv + j`` from the core output through the merge reshapes.
    """
    os_ = shape_of(out)
    if os_ is not None and len(os_) >= 4:
        rank = len(os_)
        h_ax, c_ax = 1, (rank - 2 if mode == "channel" else rank - 1)
        h_shape = [os_[h_ax] if i == h_ax else 1 for i in range(rank)]
        c_shape = [os_[c_ax] if i == c_ax else 1 for i in range(rank)]
        code = (torch.arange(os_[h_ax], dtype=torch.float64).view(h_shape) * os_[c_ax]
                + torch.arange(os_[c_ax], dtype=torch.float64).view(c_shape))
        env = ix.propagate(gm, {out: code.expand(*os_).clone()})
        for node in gm.graph.nodes:
            proj = next((u for u in node.users if node in env and op_kind(u, gm) == "linear"
                         and u.args and u.args[0] is node), None)
            if proj is None:
                continue
            flat = env[node].reshape(-1, env[node].shape[-1])[0]
            per_head = [[-1] * os_[c_ax] for _ in range(os_[h_ax])]
            for c, val in enumerate(flat.tolist()):
                if val >= 0:
                    per_head[int(val) // os_[c_ax]][int(val) % os_[c_ax]] = c
            return proj, per_head
    proj, _ = _walk_forward(out, gm, "linear", {"shape", "dropout", "act", "norm", "add", "mul", "function"})
    return proj, []


def _head_mixing(gm: fx.GraphModule, c: _Core, heads: int) -> list[Mix] | str:
    """Linears across the heads axis on the attention maps (CaiT's talking heads) between ``q @ k^T`` and
    ``attn @ v``: the mixes, in graph order (none: an empty list), or why cutting heads through them is not exact."""
    if c.impl != "explicit":
        return []
    before = [p for p in c.score_path if _kind(p, gm) == "linear"]
    maps = operands(c.out)[0]
    found, path = _walk_back(maps, gm, "softmax", {"dropout", "mul", "div", "shape", "function", "linear", "add"})
    after = [p for p in path if _kind(p, gm) == "linear"] if found is c.node else []
    if not before and not after:
        return []
    return talking_heads(gm, c.score_path[0], maps, before, after, heads)


def core_io(gm: fx.GraphModule, core: str) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node] | None:
    """(q, k, v, per-head outputs) of the attention whose core node is named ``core``, or None."""
    return next(((c.q, c.k, c.v, c.out) for c in _cores(gm) if c.node.name == core), None)


def walk_back_to_linear(t: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node | None, list[fx.Node]]:
    """The projection a q, k or v tensor comes from, and the path from it to ``t`` (as the analysis walks it)."""
    return _walk_back(t, gm, "linear", _BACK_THROUGH)


def find_attention(gm: fx.GraphModule, batch: int) -> list[Found]:
    """Every attention site of ``gm`` (shapes must have been propagated)."""
    results: list[Found] = []
    for c in _cores(gm):
        core, impl, q, k, v, out, score_path = c.node, c.impl, c.q, c.k, c.v, c.out, list(c.score_path)
        qs, ks, vs = shape_of(q), shape_of(k), shape_of(v)
        if qs is None or ks is None or vs is None or len(qs) < 3:
            continue
        producers, paths, pooled = {}, {}, None
        for role, t in (("q", q), ("k", k), ("v", v)):
            producers[role], paths[role] = _walk_back(t, gm, "linear", _BACK_THROUGH)
            pooled = pooled or next((p.name for p in paths[role] if op_kind(p, gm) in ("conv", "pool", "reduce")),
                                    None)
        if any(p is None for p in producers.values()):
            continue
        # replay reshapes on row numbers from each distinct producer
        arrived = {lin: ix.propagate(gm, {lin: ix.row_index(shape_of(lin))}) for lin in set(producers.values())}
        q_idx, k_idx, v_idx = (arrived[producers[r]].get(t) for r, t in (("q", q), ("k", k), ("v", v)))
        geo = _geometry(impl, q, k, v, q_idx, k_idx, batch)
        proj, proj_cols = _output_projection(gm, out, geo.mode)
        mixes = _head_mixing(gm, c, geo.heads)

        four = len(qs) >= 4
        q_rows = _per_head_rows(q_idx, geo.heads, geo.ch) if four and q_idx is not None else None
        k_rows = _per_head_rows(k_idx, geo.heads, geo.k_ch) if four and k_idx is not None else None
        v_ch = len(vs) - 2 if geo.mode == "channel" else len(vs) - 1
        v_rows = _per_head_rows(v_idx, geo.heads, v_ch) if four and v_idx is not None else None
        reason_heads = None
        if proj is None:
            reason_heads = "no output projection consumes the merged heads"
        elif isinstance(mixes, str):
            reason_heads = mixes
        elif pooled is not None:
            reason_heads = f"q/k/v pass through pooling op %{pooled}"
        elif q_rows is None or k_rows is None or v_rows is None or not proj_cols or any(-1 in c for c in proj_cols):
            reason_heads = "could not map every head to projection rows and columns"
        reason_hd = reason_heads
        if reason_hd is None and geo.mode == "channel":
            reason_hd = "channel (cross-covariance) attention mixes value dims"

        q_lin, k_lin, v_lin = producers["q"], producers["k"], producers["v"]
        fused = ("qkv" if q_lin is k_lin is v_lin else "qk+v" if q_lin is k_lin else
                 "q+kv" if k_lin is v_lin else "separate")
        q_norm, k_norm = (next((p for p in paths[r] if op_kind(p, gm) == "norm"), None) for r in ("q", "k"))
        name = common_prefix([module_path(q_lin, gm), module_path(proj, gm) if proj is not None else ""]) \
            or module_path(core, gm)
        site = AttentionSite(
            name=name, core=core.name, impl=impl, mode=geo.mode, heads=geo.heads, head_dim=geo.head_dim,
            v_head_dim=geo.v_head_dim, tokens_q=geo.tokens_q, tokens_kv=geo.tokens_kv, q=q_lin.name,
            k=k_lin.name, v=v_lin.name, proj=proj.name if proj is not None else None, fused=fused,
            q_norm=q_norm.name if q_norm is not None else None, k_norm=k_norm.name if k_norm is not None else None,
            bias=strongest_bias(list(c.biases), gm), prunable={"heads": reason_heads, "head_dim": reason_hd},
            mixes=tuple(m.node.name for m in mixes) if not isinstance(mixes, str) else ())
        mixes = [] if isinstance(mixes, str) else mixes
        # operands on the logits before the first mix are per head; after it, the mixed maps keep every head
        score_inputs = [*c.biases, *c.scales]
        if mixes:
            logits_path = score_path[:score_path.index(mixes[0].node)]
            score_inputs = [a for a in score_inputs if any(u in logits_path for u in a.users)]
        results.append(Found(site, q_rows or [], k_rows or [], v_rows or [], proj_cols, score_inputs, out, mixes))
    return results


__all__ = ["core_io", "find_attention", "Found", "walk_back_to_linear"]
