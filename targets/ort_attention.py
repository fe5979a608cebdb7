"""Fuse exported attention into ONNX Runtime's ``com.microsoft.MultiHeadAttention``: one kernel per site.

The dynamo exporter lowers ``scaled_dot_product_attention`` into a score MatMul, a Softmax and a value
MatMul, with the head split (Reshape + Transpose, and for a fused qkv projection a Slice + Squeeze per
operand) before it and the head merge (Transpose + Reshape) after it. At batch 1 on a CPU these layout ops
and the three separate kernels cost about as much as the attention arithmetic (deit_small, width 0.5,
INT8: 1.8 ms of 17; ``bench/int8.py --plan products+mha``). This rewrite finds each site *by its data
flow*, not by names:

* from each ``Softmax(axis=-1)`` whose only consumer is ``MatMul(P, V)`` followed (through 4-D views) by
  ``Transpose(0, 2, 1, 3)`` and a ``Reshape`` to ``(b, n, heads x dv)``;
* back from the Softmax through scalar Muls and Divs to the score ``MatMul(A, B)``, and from there through
  scalar Muls and Divs, Reshapes and Transposes to the 4-D q and k (the scalars multiply into the scale);
* each of q, k, v back to a 3-D ``(b, n, heads x d)`` source: ``Transpose(0, 2, 1, 3)(Reshape(x, [.., ..,
  H, D]))``, or part ``i`` of ``Transpose(2, 0, 3, 1, 4)(Reshape(x, [.., .., P, H, D]))`` taken with
  Slice + Squeeze or Gather (a fused qkv projection: one ``Split`` of ``x`` into ``P`` parts feeds q, k, v).

A 4-D tensor added to the scaled scores (a relative position bias, an additive mask) becomes the op's
``attention_bias``, and a NaN guard on the probabilities (``Where(IsNaN(p), 0, p)``) is read through.
Each site becomes ``MultiHeadAttention(q3, k3, v3, num_heads=H, scale=s)``, whose output replaces the
merged ``Reshape``; what no longer reaches an output is dropped. A site that does not match is left as it
is; if the fused file disagrees with the original, the sites with a bias are left out and it is tried again. The file runs on ONNX Runtime only (a contrib op), so the INT8 target offers it as a plan measured
against the unfused one, and :func:`fuse_attention` checks the fused model against the original on random
inputs before it writes anything.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["fuse_attention"]

MS_DOMAIN = "com.microsoft"
_WALK = frozenset({"Reshape", "Transpose", "Mul", "Div", "Identity"})  # what may lie between q/k and the score MatMul


@dataclass(frozen=True)
class _Source:
    """A 4-D (b, heads, n, d) operand's 3-D origin: tensor ``x``, part ``part`` of ``parts`` along its last axis."""

    x: str
    heads: int
    dim: int
    part: int = 0
    parts: int = 1


class _Graph:
    """Producers, consumers and constants of an ONNX graph, for reading patterns."""

    def __init__(self, graph) -> None:
        from onnx import numpy_helper

        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for n in graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.outputs = {o.name for o in graph.output}
        self.ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*graph.value_info, *graph.input)
                      if v.type.tensor_type.HasField("shape")}

    def rank(self, tensor: str) -> int | None:
        value = self.const(tensor)
        return value.ndim if value is not None else self.ranks.get(tensor)

    def const(self, name: str) -> np.ndarray | None:
        return self.values.get(name)

    def only_consumer(self, tensor: str, op: str):
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and users[0].op_type == op and tensor not in self.outputs else None

    def made_by(self, tensor: str, op: str):
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == op else None


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _ints(g: _Graph, name: str) -> list[int] | None:
    value = g.const(name)
    return None if value is None or value.dtype.kind not in "iu" else [int(v) for v in value.reshape(-1)]


def _walk_back(g: _Graph, tensor: str, found: Callable[[str], bool] = lambda t: False) -> tuple[str, float, bool]:
    """Back through layout ops and scalar Muls and Divs until ``found``: (the tensor reached, the scalars'
    product, whether a Transpose was passed)."""
    scale, transposed = 1.0, False
    while True:
        node = g.producer.get(tensor)
        if found(tensor) or node is None or node.op_type not in _WALK or len(g.consumers.get(tensor, [])) != 1:
            return tensor, scale, transposed
        if node.op_type in ("Mul", "Div"):
            scalars = [g.const(i) for i in node.input]
            k = next((j for j, v in enumerate(scalars) if v is not None and v.size == 1), None)
            if k is None or (node.op_type == "Div" and k != 1):
                return tensor, scale, transposed
            value = float(scalars[k].reshape(()))
            if not np.isfinite(value) or value == 0.0:
                return tensor, scale, transposed
            scale *= value if node.op_type == "Mul" else 1.0 / value
            tensor = node.input[1 - k]
            continue
        transposed |= node.op_type == "Transpose"
        tensor = node.input[0]


def _split_shape(g: _Graph, tensor: str, rank: int) -> tuple[str, list[int]] | None:
    """(x, shape) when ``tensor`` is ``Reshape(x, shape)`` to ``rank`` dims, all but the first two fixed."""
    r = g.made_by(tensor, "Reshape")
    shape = _ints(g, r.input[1]) if r is not None else None
    return (r.input[0], shape) if shape is not None and len(shape) == rank and min(shape[2:]) > 0 else None


def _source(g: _Graph, tensor: str) -> _Source | None:
    """The 3-D origin of a 4-D attention operand, when it is one of the head splits: (b, heads, n, d) from a
    Transpose(0, 2, 1, 3) or a fused qkv's part, or the (b, n, heads, d) Reshape itself (a k whose transpose
    for k^T the exporter merged into one, which the score MatMul's shapes then vouch for)."""
    t = g.made_by(tensor, "Transpose")
    if t is not None:  # (b, n, heads, d) -> (b, heads, n, d), or no head split
        heads = _split_shape(g, t.input[0], 4) if list(_attr(t, "perm", [])) == [0, 2, 1, 3] else None
        return _Source(heads[0], heads[1][2], heads[1][3]) if heads is not None else None
    heads = _split_shape(g, tensor, 4)
    if heads is not None:
        return _Source(heads[0], heads[1][2], heads[1][3])
    part, base = _part(g, tensor)
    t = g.made_by(base, "Transpose") if base else None
    fused = _split_shape(g, t.input[0], 5) if t is not None and list(_attr(t, "perm", [])) == [2, 0, 3, 1, 4] \
        else None
    if fused is None or not 0 <= part < fused[1][2]:
        return None
    x, shape = fused
    return _Source(x, shape[3], shape[4], part, shape[2])


def _part(g: _Graph, tensor: str) -> tuple[int, str | None]:
    """``tensor`` as item ``i`` of axis 0 of another: Squeeze(Slice(x, i, i + 1, axis 0)) or Gather(x, i)."""
    sq = g.made_by(tensor, "Squeeze")
    if sq is not None and len(sq.input) > 1 and _ints(g, sq.input[1]) == [0]:
        sl = g.made_by(sq.input[0], "Slice")
        if sl is not None and len(sl.input) >= 4:
            start, end, axes = (_ints(g, sl.input[i]) for i in (1, 2, 3))
            steps = _ints(g, sl.input[4]) if len(sl.input) > 4 and sl.input[4] else [1]
            if axes == [0] and steps == [1] and start and end and end[0] == start[0] + 1:
                return start[0], sl.input[0]
    ga = g.made_by(tensor, "Gather")
    if ga is not None and _attr(ga, "axis", 0) == 0:
        index = g.const(ga.input[1])
        if index is not None and index.size == 1 and index.ndim == 0:
            return int(index), ga.input[0]
    return -1, None


@dataclass(frozen=True)
class _Site:
    q: _Source
    k: _Source
    v: _Source
    scale: float
    out: str  # the merged (b, n, heads x dv) tensor MultiHeadAttention replaces
    bias: str = ""  # a 4-D tensor added to the scaled scores (relative position bias, additive mask)


def _site(g: _Graph, softmax) -> _Site | None:
    if _attr(softmax, "axis", -1) not in (-1, 3):
        return None
    pv = _probabilities_user(g, softmax)
    scores, s_out, bias = _scores(g, softmax.input[0])
    if pv is None or scores is None:
        return None
    heads_out = pv.output[0]
    while (same := g.only_consumer(heads_out, "Reshape")) is not None and len(_ints(g, same.input[1]) or []) == 4:
        heads_out = same.output[0]  # a view to the (b, heads, n, dv) it already has
    merge = g.only_consumer(heads_out, "Transpose")
    if merge is None or list(_attr(merge, "perm", [])) != [0, 2, 1, 3]:
        return None
    out = g.only_consumer(merge.output[0], "Reshape")
    shape = _ints(g, out.input[1]) if out is not None else None
    def found(t: str) -> bool:
        return _source(g, t) is not None

    q4, sq, _ = _walk_back(g, scores.input[0], found)
    k4, sk, k_transposed = _walk_back(g, scores.input[1], found)
    q, k, v = _source(g, q4), _source(g, k4), _source(g, pv.input[1])
    if shape is None or None in (q, k, v) or not k_transposed:
        return None
    if q.heads != k.heads or k.heads != v.heads or q.dim != k.dim or len(shape) != 3 or shape[2] != v.heads * v.dim:
        return None
    return _Site(q, k, v, s_out * sq * sk, out.output[0], bias)


def _probabilities_user(g: _Graph, softmax):
    """The value MatMul reading the softmax, directly or through a NaN guard ``Where(IsNaN(p), 0, p)``."""
    pv = g.only_consumer(softmax.output[0], "MatMul")
    if pv is not None:
        return pv if pv.input[0] == softmax.output[0] else None
    users = g.consumers.get(softmax.output[0], [])
    nan = next((n for n in users if n.op_type == "IsNaN"), None)
    where = next((n for n in users if n.op_type == "Where"), None)
    if len(users) != 2 or nan is None or where is None or list(where.input)[::2] != [nan.output[0], softmax.output[0]]:
        return None
    zero = g.const(where.input[1])
    if zero is None or zero.size != 1 or float(zero.reshape(())) != 0.0:
        return None
    pv = g.only_consumer(where.output[0], "MatMul")
    return pv if pv is not None and pv.input[0] == where.output[0] else None


def _scores(g: _Graph, logits: str):
    """(the score MatMul, the scalars on it, a 4-D bias added after them) behind the softmax's input."""
    logits, s_out, moved = _walk_back(g, logits)
    add = g.made_by(logits, "Add")
    bias = ""
    if add is not None and s_out == 1.0 and not moved:  # softmax(s * (q k^T) + bias)
        for j in (0, 1):
            inner, s, turned = _walk_back(g, add.input[j])
            if g.made_by(inner, "MatMul") is not None and not turned and g.rank(add.input[1 - j]) == 4:
                logits, s_out, moved, bias = inner, s, turned, add.input[1 - j]
                break
    scores = g.made_by(logits, "MatMul") if not moved else None
    return scores, s_out, bias


def _rewrite(model, sites: list[_Site]) -> None:
    from onnx import TensorProto, helper

    graph = model.graph
    split: dict[tuple[str, int, int], list[str]] = {}
    added = []
    renamed: dict[str, str] = {}

    def three_d(s: _Source) -> str:
        if s.parts == 1:
            return s.x
        key = (s.x, s.parts, s.heads * s.dim)
        if key not in split:
            sizes = f"{s.x}_mha_split_sizes"
            graph.initializer.append(helper.make_tensor(sizes, TensorProto.INT64, [s.parts],
                                                        [s.heads * s.dim] * s.parts))
            split[key] = [f"{s.x}_mha_part{i}" for i in range(s.parts)]
            added.append(helper.make_node("Split", [s.x, sizes], split[key], axis=-1, name=f"{s.x}_mha_split"))
        return split[key][s.part]

    for i, s in enumerate(sites):
        fused = f"{s.out}_mha"
        inputs = [three_d(s.q), three_d(s.k), three_d(s.v)] + (["", "", s.bias] if s.bias else [])
        added.append(helper.make_node("MultiHeadAttention", inputs, [fused],
                                      domain=MS_DOMAIN, num_heads=s.q.heads, scale=s.scale, name=f"mha_{i}"))
        renamed[s.out] = fused
    for node in graph.node:
        for j, name in enumerate(node.input):
            node.input[j] = renamed.get(name, name)
    for o in graph.output:
        if o.name in renamed:  # keep the output's name: an Identity from the fused tensor
            added.append(helper.make_node("Identity", [renamed[o.name]], [o.name]))
    nodes = _live(list(graph.node) + added, {o.name for o in graph.output})
    del graph.node[:]
    graph.node.extend(_topological(nodes, {i.name for i in graph.input} | {i.name for i in graph.initializer}))
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _live(nodes: list, outputs: set[str]) -> list:
    producer = {o: n for n in nodes for o in n.output}
    seen: set[int] = set()
    stack = list(outputs)
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            stack.extend(node.input)
    return [n for n in nodes if id(n) in seen]


def _topological(nodes: list, available: set[str]) -> list:
    done, order, pending = set(available) | {""}, [], nodes
    while pending:
        ready = [n for n in pending if all(i in done for i in n.input)]
        if not ready:
            raise ValueError("attention fusion left a cycle or a dangling input")
        order += ready
        done.update(o for n in ready for o in n.output)
        taken = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in taken]
    return order


def fuse_attention(src: str | os.PathLike, dst: str | os.PathLike, *, atol: float = 1e-4) -> int:
    """Write ``src`` with every recognised attention site fused into MultiHeadAttention to ``dst``; returns the
    number fused (0: nothing matched or the fused model disagreed with ``src``, and ``dst`` is not written)."""
    import onnx

    model = onnx.load(os.fspath(src))
    g = _Graph(model.graph)
    sites = [s for s in (_site(g, n) for n in model.graph.node if n.op_type == "Softmax") if s is not None]
    if not sites:
        return 0
    tmp = Path(dst).with_name(Path(dst).name + ".tmp")
    reference = _Reference(Path(src))
    # all sites; failing that, those without a bias (the bias's broadcast is the least certain reading)
    for chosen in (sites, [s for s in sites if not s.bias]):
        if not chosen or (chosen is not sites and len(chosen) == len(sites)):
            continue
        fused = onnx.ModelProto()
        fused.CopyFrom(model)
        _rewrite(fused, chosen)
        onnx.save(fused, os.fspath(tmp))
        if reference.agrees(tmp, atol):
            tmp.replace(dst)
            return len(chosen)
        tmp.unlink()
    return 0


class _Reference:
    """The original file's outputs on seeded random inputs, computed once for every fusion tried."""

    def __init__(self, src: Path) -> None:
        from vitgraph.targets import _feeds as fd
        from vitgraph.targets import onnx as onnx_target

        self.feeds = fd.random_feeds(src, images=4, batch=2)
        try:
            self.logits: np.ndarray | None = fd.logits(onnx_target.session(src, threads=1), self.feeds)
        except Exception:  # noqa: BLE001 - an original ORT cannot run has nothing to check a fusion against
            self.logits = None

    def agrees(self, fused: Path, atol: float) -> bool:
        """The fused file runs in ONNX Runtime and matches the original (relative to the outputs' scale)."""
        from vitgraph.targets import _feeds as fd
        from vitgraph.targets import onnx as onnx_target

        a = self.logits
        if a is None:
            return False
        try:
            b = fd.logits(onnx_target.session(fused, threads=1), self.feeds)
        except Exception:  # noqa: BLE001 - a file ORT cannot load or run is a fusion that did not work
            return False
        return a.shape == b.shape and float(np.abs(a - b).max()) <= atol * max(1.0, float(np.abs(a).max()))
