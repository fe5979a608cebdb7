"""Index propagation: push tensors of *positions* through the data-movement ops of the graph.

To learn which output rows of a projection feed head ``h`` of an attention, or which input columns
of an output projection consume it, we do not pattern-match reshape/permute/unbind spellings. We
replay the graph's own shape ops on a tensor whose entries are the row numbers (``-1`` for anything
not from the source) and read the result where it arrives. Element-wise ops that keep the shape
(norms, activations, scaling, rotary embeddings, dropout) pass indices through unchanged: they move
no data between positions. Ops that mix positions (linear, matmul, softmax, conv, reductions) stop it;
on request (``depthwise=True``) a depthwise conv passes a *channel* code (one that varies along the channel
axis alone): it moves data between positions but keeps every channel apart.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from vitgraph.analysis.ops import is_depthwise, op_kind
from vitgraph.meta import SHAPE, VALUE, shape_of

_PASS_KINDS = {"act", "dropout", "norm", "mul", "div", "add", "function", "module", "method"}
_STOP_KINDS = {"linear", "conv", "matmul", "einsum", "sdpa", "softmax", "reduce", "pool", "output"}


def _arg_value(a: Any, env: dict[fx.Node, torch.Tensor], gm: fx.GraphModule) -> Any:
    if isinstance(a, fx.Node):
        if a in env:
            return env[a]
        value = _index_table(a, gm)  # integer buffers are index tables (relative positions): replay them as they are
        if value is not None:
            return value
        shp = a.meta.get(SHAPE)
        if isinstance(shp, tuple) and all(isinstance(d, int) for d in shp):
            return torch.full(shp, -1.0, dtype=torch.float64)
        if VALUE in a.meta:
            return a.meta[VALUE]
        raise LookupError(a.name)
    return a


def _index_table(a: fx.Node, gm: fx.GraphModule, depth: int = 0) -> torch.Tensor | None:
    """An integer tensor computed from integer buffers alone (an index table, or one flattened by ``view(-1)``
    as ``torch.export`` records it where an ``fx`` trace folded it to a constant); None for anything else."""
    if a.op == "get_attr":
        value = _attr(gm, str(a.target))
        return value if isinstance(value, torch.Tensor) and not value.is_floating_point() else None
    if a.op not in ("call_function", "call_method") or depth > 8 or not a.all_input_nodes:
        return None
    inputs = {}
    for b in a.all_input_nodes:
        inputs[b] = _index_table(b, gm, depth + 1)
        if inputs[b] is None:
            return None
    try:
        out = _evaluate(a, gm, inputs)
    except Exception:  # noqa: BLE001 - not replayable: no table
        return None
    return out if isinstance(out, torch.Tensor) and not out.is_floating_point() else None


def _attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _evaluate(node: fx.Node, gm: fx.GraphModule, env: dict[fx.Node, torch.Tensor]) -> Any:
    args = fx.node.map_aggregate(node.args, lambda a: _arg_value(a, env, gm))
    kwargs = fx.node.map_aggregate(node.kwargs, lambda a: _arg_value(a, env, gm))
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    return node.target(*args, **kwargs)


def propagate(gm: fx.GraphModule, sources: dict[fx.Node, torch.Tensor], *, pick: int = 0,
              stop: set[fx.Node] | frozenset = frozenset(), limit: int = 400, depthwise: bool = False
              ) -> dict[fx.Node, torch.Tensor]:
    """Positions of ``sources`` as seen at every node they reach through data-movement ops.

    ``pick`` chooses which input an element-wise op with several indexed inputs passes on (0: the
    first, -1: the last), e.g. the value or the gate half of a gated MLP. ``depthwise``: a depthwise
    conv passes a channel code on (MLP hidden units), where otherwise it stops every code.
    """
    env: dict[fx.Node, Any] = dict(sources)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    frontier = sorted({u for s in sources for u in s.users}, key=order.__getitem__)
    seen: set[fx.Node] = set()
    steps = 0
    while frontier and steps < limit:
        node = frontier.pop(0)
        if node in seen or node in env:
            continue
        seen.add(node)
        steps += 1
        kind = op_kind(node, gm)
        if depthwise and kind == "conv" and is_depthwise(node, gm):
            out = _through_depthwise(node, env)
            if out is None:
                continue
            kind = "through"
        if kind in _STOP_KINDS:
            continue
        indexed = [a for a in node.all_input_nodes if a in env]
        if kind == "shape":
            try:
                out = _evaluate(node, gm, env)
            except Exception:  # an op we cannot replay: positions stop here
                continue
        elif kind == "through":
            pass
        elif kind in _PASS_KINDS:
            out_shape = shape_of(node)
            candidates = [a for a in indexed if isinstance(env[a], torch.Tensor)
                          and tuple(env[a].shape) == out_shape]
            if not candidates:
                continue
            out = env[candidates[pick]]
        else:
            continue
        if isinstance(out, torch.Tensor) or (isinstance(out, (tuple, list)) and out
                                              and all(isinstance(t, torch.Tensor) for t in out)):
            env[node] = out
            for u in node.users:
                if u not in seen:
                    frontier.append(u)
            frontier.sort(key=order.__getitem__)
    for s in sources:
        env.pop(s, None)
    return {n: v for n, v in env.items() if isinstance(v, torch.Tensor)}


def _through_depthwise(node: fx.Node, env: dict[fx.Node, Any]) -> torch.Tensor | None:
    """The code leaving a depthwise conv: its input's code, when that varies along the channel axis (1) alone,
    spread over the output's positions; None for any other code (token positions do not survive the conv)."""
    src, out = node.args[0] if node.args else None, shape_of(node)
    code = env.get(src) if isinstance(src, fx.Node) else None
    if not isinstance(code, torch.Tensor) or code.dim() < 2 or out is None or len(out) != code.dim():
        return None
    channels = torch.tensor(line(code, 1), dtype=torch.float64)
    if channels.numel() != out[1] or not torch.equal(code, along(channels, tuple(code.shape), 1)):
        return None
    return along(channels, out, 1)


def row_index(shape: tuple[int, ...], axis: int = -1) -> torch.Tensor:
    """A tensor of ``shape`` whose entries are their position along ``axis`` (default: the last)."""
    return along(torch.arange(shape[axis], dtype=torch.float64), shape, axis)


def along(values: torch.Tensor, shape: tuple[int, ...], axis: int = -1) -> torch.Tensor:
    """A tensor of ``shape`` holding ``values`` (1-D, one per position) along ``axis``, repeated elsewhere."""
    axis = axis % len(shape)
    view = [values.numel() if i == axis else 1 for i in range(len(shape))]
    return values.reshape(view).expand(*shape).clone()


def channel_axis(idx: torch.Tensor) -> int | None:
    """The one axis (after batch) along which indices vary; None when that is ambiguous."""
    varying = []
    for ax in range(1, idx.dim()):
        first = idx.select(ax, 0).unsqueeze(ax)
        if not torch.equal(idx, first.expand_as(idx)):
            varying.append(ax)
    return varying[-1] if varying else None


def line(t: torch.Tensor, axis: int) -> list[int]:
    """The values of ``t`` along ``axis``, every other index at 0 (the line through the origin)."""
    axis %= t.dim()
    for other in reversed(range(t.dim())):
        if other != axis:
            t = t.select(other, 0)
    return [int(v) for v in t.tolist()]
