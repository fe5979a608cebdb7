"""Attention spelled in forms ``attention.find_attention`` does not take apart: recognised, every width axis refused.

* **Per-head cores on a channels-first map** (EfficientViT-MSRA's cascaded group attention): q, k and v come
  from pointwise convolutions on a (B, C, H, W) map, flattened to (B, C, N); the core is
  ``v @ softmax(q^T @ k + bias)^T`` (the maps enter the value product transposed), and where heads run one per
  chunk, each head is its own core with its own projection. Cores whose outputs reach the same output
  projection are one site; a core whose output flows into another core's projection input is a cascade.
* **Separable attention** (MobileViT-v2): ``softmax`` over the tokens of a one-channel q weights the keys,
  a ``sum`` over the same axis pools them into one context vector, which multiplies ``act(v)`` at every token
  before the output projection. There is no token-by-token map: a site of its own mode, ``"separable"``.

Neither form has heads the head and value-dim groups can slice, so each site carries the reason, read from
the graph, for every width axis. Only softmaxes no recognised site owns are looked at. Nothing here depends
on class or attribute names.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx

from vitgraph.analysis import index as ix
from vitgraph.analysis.attention import Found, strongest_bias
from vitgraph.analysis.ops import PRODUCTS, common_prefix, is_linear, linear_info, module_path, op_kind, operands, \
    tensor_args
from vitgraph.meta import AttentionSite, shape_of

# ops crossed walking from q/k/v back to their projection, and from the core forward to the output projection
_BACK = {"shape", "norm", "mul", "div", "add", "act", "dropout", "function", "method", "conv"}
_FORWARD = {"shape", "act", "dropout", "norm"}
_LOGITS = {"add", "mul", "div", "shape", "dropout", "function", "sub", "method"}  # q @ k^T ... softmax


def _walk(start: fx.Node, gm: fx.GraphModule, hit: Callable[[fx.Node], bool], through: set[str], *,
          forward: bool = False, depth: int = 12) -> tuple[fx.Node | None, list[fx.Node]]:
    """Nearest node (not ``start``) satisfying ``hit``, crossing only ops of a kind in ``through``; it and the
    path from ``start`` to it (both ends included)."""
    parent: dict[fx.Node, fx.Node | None] = {start: None}
    queue = deque([(start, 0)])
    while queue:
        node, d = queue.popleft()
        if node is not start and hit(node):
            path, cur = [], node
            while cur is not None:
                path.append(cur)
                cur = parent[cur]
            return node, path[::-1]
        if d >= depth or (node is not start and op_kind(node, gm) not in through):
            continue
        for nxt in (list(node.users) if forward else tensor_args(node)):
            if nxt not in parent:
                parent[nxt] = node
                queue.append((nxt, d + 1))
    return None, []


def _producer(t: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node | None, list[fx.Node]]:
    """The linear-like op (a Linear or a pointwise conv) a q/k/v tensor comes from, and the path between."""
    if is_linear(t, gm):
        return t, [t]
    return _walk(t, gm, lambda n: is_linear(n, gm), _BACK)


def _one_input(found: list[tuple[fx.Node | None, list[fx.Node]]]) -> bool:
    """q, k and v all have a projection, and their projections read one tensor (a self-attention's input; not
    a query made elsewhere, as GCViT's global query is)."""
    return all(p is not None for p, _ in found) and len({p.args[0] for p, _ in found}) == 1


def _fused(q: fx.Node, k: fx.Node, v: fx.Node) -> str:
    return "qkv" if q is k is v else "qk+v" if q is k else "q+kv" if k is v else "separate"


def _spatial_conv(path: list[fx.Node], gm: fx.GraphModule) -> fx.Node | None:
    return next((p for p in path if op_kind(p, gm) == "conv" and not is_linear(p, gm)), None)


@dataclass(frozen=True)
class _Core:
    """One explicit softmax core that ``find_attention`` left alone."""

    softmax: fx.Node
    out: fx.Node                         # the value product
    producers: tuple[fx.Node, fx.Node, fx.Node]  # of q, k and v
    paths: tuple[list[fx.Node], ...]     # q, k and v back to their producers
    proj: fx.Node
    heads: int
    head_dim: int
    v_head_dim: int
    tokens_q: int
    tokens_kv: int
    channels_first: bool                 # v (..., dv, N) @ maps^T rather than maps @ v (..., N, dv)
    biases: tuple[fx.Node, ...]


def _core(s: fx.Node, gm: fx.GraphModule) -> _Core | None:
    """``softmax(q @ k^T ...)`` multiplied into v, in either orientation, with linear-like producers."""
    src = tensor_args(s)
    logits = shape_of(s)
    if not src or logits is None or len(logits) < 3:
        return None
    m1, back = _walk(s, gm, lambda n: op_kind(n, gm) in PRODUCTS, _LOGITS, depth=8)
    m2, fwd = _walk(s, gm, lambda n: op_kind(n, gm) in PRODUCTS, {"dropout", "mul", "div", "shape", "function"},
                    forward=True, depth=8)
    if m1 is None or m2 is None or len(operands(m1)) != 2 or len(operands(m2)) != 2:
        return None
    via = fwd[-2]
    (q, k), (a, b) = operands(m1), operands(m2)
    if a is via and b is not via:
        v, channels_first = b, False
    elif b is via and a is not via:
        v, channels_first = a, True
    else:
        return None
    qs, vs = shape_of(q), shape_of(v)
    if qs is None or vs is None or len(qs) < 3 or len(vs) < 3:
        return None
    found = [_producer(t, gm) for t in (q, k, v)]
    proj, _ = _walk(m2, gm, lambda n: is_linear(n, gm), _FORWARD, forward=True)
    if not _one_input(found) or proj is None:
        return None
    producers = tuple(p for p, _ in found)
    on_path = set(back)  # softmax ... q @ k^T: what else enters the logits is a bias
    biases = tuple(x for p in back[1:-1] if op_kind(p, gm) in ("add", "function") for x in tensor_args(p)
                   if x not in on_path)
    return _Core(s, m2, producers, tuple(p for _, p in found), proj,
                 _heads(gm, producers[1], k, len(logits), logits), qs[-1], vs[-2] if channels_first else vs[-1],
                 logits[-2], logits[-1], channels_first, biases)


def _heads(gm: fx.GraphModule, producer: fx.Node, k: fx.Node, rank: int, logits: tuple[int, ...]) -> int:
    """Heads of one core: the logits' head axis when it has one, else how many different sets of the
    producer's rows the batch axis of k carries (heads folded into the batch; windows repeat the same rows)."""
    if rank >= 4:
        return logits[1]
    info = linear_info(producer, gm)
    shape = shape_of(producer)
    if info is None or shape is None:
        return 1
    idx = ix.propagate(gm, {producer: ix.row_index(shape, info.channel_axis)}).get(k)
    if idx is None:
        return 1
    return max(1, len({tuple(idx[i].flatten().tolist()) for i in range(idx.shape[0])}))


def _cascade(cores: list[_Core], gm: fx.GraphModule) -> fx.Node | None:
    """The op through which one core's output reaches another core's projection input, if any."""
    starts = {c.producers[0] for c in cores} | {c.producers[2] for c in cores}
    for c in cores:
        hit, path = _walk(c.out, gm, lambda n: n in starts, {"shape", "add", "act", "dropout", "norm"},
                          forward=True, depth=8)
        if hit is not None:
            return next((p for p in path if op_kind(p, gm) == "add"), path[-2])
    return None


def _chunked_site(cores: list[_Core], gm: fx.GraphModule) -> Found:
    """One site for the cores that share an output projection: heads, widths and the per-axis reasons."""
    first = cores[0]
    q_lin, k_lin, v_lin = first.producers
    heads, value = _chunk_reasons(cores, gm)
    site = AttentionSite(
        name=common_prefix([module_path(q_lin, gm), module_path(first.proj, gm)]) or module_path(first.softmax, gm),
        core=first.softmax.name, impl="explicit", mode="token", heads=sum(c.heads for c in cores),
        head_dim=first.head_dim, v_head_dim=first.v_head_dim, tokens_q=first.tokens_q, tokens_kv=first.tokens_kv,
        q=q_lin.name, k=k_lin.name, v=v_lin.name, proj=first.proj.name, fused=_fused(q_lin, k_lin, v_lin),
        bias=strongest_bias([b for c in cores for b in c.biases], gm), prunable={"heads": heads, "head_dim": value},
        head_cores=tuple(c.softmax.name for c in cores[1:]))
    return Found(site, out=first.out)


def _chunk_reasons(cores: list[_Core], gm: fx.GraphModule) -> tuple[str, str]:
    """Why heads, and why value dims, cannot be cut, as the graph shows it."""
    rank = len(shape_of(cores[0].producers[0]) or ())
    convs = any(op_kind(p, gm) == "conv" for c in cores for p in c.producers)
    source = ("pointwise convolutions on a " + ("(B, C, H, W)" if rank == 4 else "channels-first") + " map"
              if convs else "linears")
    cascade = _cascade(cores, gm)
    if len({c.producers for c in cores}) == len(cores) > 1:
        names = f"%{cores[0].softmax.name} .. %{cores[-1].softmax.name}"
        heads = (f"heads run one per chunk ({len(cores)} attention cores, {names}), each with its own q/k/v "
                 f"projection ({source})" + (f", each head's output added to the next head's input (%{cascade.name}, "
                                             "a cascade)" if cascade is not None else "")
                 + ": there is no shared projection to cut heads from")
    else:
        heads = (f"q/k/v come from {source}" + (" and the maps multiply v transposed (v @ attn^T)"
                                                if cores[0].channels_first else "")
                 + ": vitgraph maps heads only through linears feeding q @ k^T -> softmax -> @ v")
    spatial = next(((role, conv) for c in cores for role, p in zip("qkv", c.paths)
                    if (conv := _spatial_conv(p, gm)) is not None), None)
    if spatial is not None:
        heads += f"; {spatial[0]} passes through the spatial convolution {module_path(spatial[1], gm)}"
    if cascade is None:
        return heads, heads
    return heads, (f"each head's value dims are added to the next head's input channels (%{cascade.name}): "
                   "cutting them would cut that head's projection input too")


def _broadcast_mul(start: fx.Node, gm: fx.GraphModule, through: set[str]) -> tuple[fx.Node, fx.Node] | None:
    """The element-wise product ``start`` reaches (crossing ``through``), and its other operand."""
    mul, path = _walk(start, gm, lambda n: op_kind(n, gm) == "mul", through, forward=True, depth=4)
    if mul is None or len(tensor_args(mul)) != 2:
        return None
    other = next((a for a in tensor_args(mul) if a is not path[-2]), None)
    return (mul, other) if other is not None else None


def _reduced_axes(node: fx.Node) -> set[int]:
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    rank = len(shape_of(node.args[0]) or ())
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    return {d % rank for d in dims if isinstance(d, int) and rank}


def _separable(s: fx.Node, gm: fx.GraphModule) -> Found | None:
    """``ctx = sum(k * softmax(q), tokens)``, then ``act(v) * ctx`` into an output projection."""
    src, shape = tensor_args(s), shape_of(s)
    dim = getattr(gm.get_submodule(s.target), "dim", None) if s.op == "call_module" else \
        s.kwargs.get("dim", s.args[1] if len(s.args) > 1 else None)
    if not src or shape is None or len(shape) < 3 or not isinstance(dim, int):
        return None
    axis = dim % len(shape)
    pooled = _broadcast_mul(s, gm, {"dropout", "shape"})
    if pooled is None:
        return None
    weigh, k = pooled
    ks = shape_of(k)
    wide = [i for i, (a, b) in enumerate(zip(shape, ks or ())) if a != b]
    if ks is None or len(ks) != len(shape) or ks[axis] != shape[axis] or len(wide) != 1 or shape[wide[0]] != 1:
        return None
    ctx, _ = _walk(weigh, gm, lambda n: op_kind(n, gm) == "reduce", {"dropout"}, forward=True, depth=2)
    if ctx is None or _reduced_axes(ctx) != {axis}:
        return None
    mixed = _broadcast_mul(ctx, gm, {"shape"})
    if mixed is None or shape_of(mixed[1]) != ks:
        return None
    out, v = mixed
    proj, _ = _walk(out, gm, lambda n: is_linear(n, gm), _FORWARD, forward=True)
    found = [_producer(t, gm) for t in (src[0], k, v)]
    if proj is None or not _one_input(found):
        return None
    q_lin, k_lin, v_lin = (p for p, _ in found)
    heads = (f"separable attention: softmax over the tokens of a one-channel q (%{s.name}) weights the keys, "
             f"summed into one context vector (%{ctx.name}); there is no token-by-token map and no heads to cut")
    value = (f"separable attention multiplies value channel j by key channel j's context (%{out.name}): a value "
             f"dim is also a key row of {module_path(k_lin, gm)}, which the value-dim group does not cut")
    site = AttentionSite(
        name=common_prefix([module_path(q_lin, gm), module_path(proj, gm)]) or module_path(s, gm),
        core=s.name, impl="explicit", mode="separable", heads=1, head_dim=ks[wide[0]],
        v_head_dim=shape_of(v)[wide[0]], tokens_q=shape[axis], tokens_kv=shape[axis], q=q_lin.name, k=k_lin.name,
        v=v_lin.name, proj=proj.name, fused=_fused(q_lin, k_lin, v_lin), prunable={"heads": heads, "head_dim": value})
    return Found(site, out=out)


def find_attention_forms(gm: fx.GraphModule, known: list[Found]) -> list[Found]:
    """Sites of the forms above among the softmaxes no site in ``known`` owns (shapes must be propagated)."""
    owned = {f.site.core for f in known} | {f.out.name for f in known if f.out is not None}
    cores: dict[fx.Node, list[_Core]] = {}
    results: list[Found] = []
    for n in gm.graph.nodes:
        if op_kind(n, gm) != "softmax" or n.name in owned:
            continue
        core = _core(n, gm)
        if core is not None and core.out.name not in owned:
            cores.setdefault(core.proj, []).append(core)
            continue
        sep = _separable(n, gm)
        if sep is not None:
            results.append(sep)
    results += [_chunked_site(group, gm) for group in cores.values()]
    taken = {f.site.name for f in known}  # a second map inside a recognised attention stays that site's business
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    return sorted((f for f in results if f.site.name not in taken), key=lambda f: order[f.site.core])


__all__ = ["find_attention_forms"]
