"""The residual stream's channels as one coupled group (``width.embed``): everything that must narrow with it.

Channel numbers are replayed from the patch embedding's output (``index.propagate``) through every
op that keeps channels apart. Where a stream tensor meets another tensor (the class token and
position embedding, a branch added back, a layer scale) that tensor's source is found and replayed
too: a parameter is sliced along the axis that lands on the channels, a branch's projection loses
the rows that land there. Linears reading the stream lose input columns (they are the consumers the
gate masks); LayerNorms over the stream are recorded — the gated graph normalises them over the kept
channels only, so ``eval`` equals the narrowed graph exactly. Anything else that reads the stream
across channels (an attention with no projection, a non-LayerNorm norm, the model's output itself)
is the reason the group is refused.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from vitgraph.analysis import index as ix
from vitgraph.analysis.groups import _axis_code, _constants, _static_sources
from vitgraph.analysis.ops import linear_info, op_kind
from vitgraph.meta import VALUE, Block, ConstRef, CoupledGroup, SliceRef, TokenInfo, shape_of

_COMBINE = {"add", "mul", "div", "sub", "function", "method"}  # ops where another tensor may join the stream


class _Refused(Exception):
    pass


def _chan(code: torch.Tensor, axis: int) -> list[int]:
    """Per position along ``axis``: the code found there anywhere along the other axes (-1: none)."""
    moved = code.movedim(axis, -1)
    if moved.numel() == 0:  # a zero-width slice (a narrowed token scorer's empty chunk) holds no channel
        return [-1] * moved.shape[-1]
    return [int(v) for v in moved.reshape(-1, moved.shape[-1]).max(0).values.tolist()]


def _per_unit(stream: list[int], other: list[int], units: int, what: str) -> tuple[tuple[int, ...], ...]:
    """Which index of ``other`` sits at each stream channel (unit)."""
    owned: list[list[int]] = [[] for _ in range(units)]
    for u, i in zip(stream, other):
        if 0 <= u < units and i >= 0 and i not in owned[u]:
            owned[u].append(i)
    # one index per channel, each channel its own (a code constant along the channels, e.g. a position
    # embedding's token axis when there are as many tokens as channels, gives every channel the same one)
    if any(len(o) != 1 for o in owned) or len({o[0] for o in owned}) != units:
        raise _Refused(f"{what} does not map one to one onto the stream's channels")
    return tuple(tuple(o) for o in owned)


def _size_read(node: fx.Node) -> bool:
    """``x.shape``, ``x.size()`` or an item of one: a size, not data."""
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1:2] == ("shape",):
        return True
    return node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
        and _size_read(node.args[0])


class _Walk:
    """One pass over the stream: sources to replay, and the slices, consumers and norms found."""

    def __init__(self, gm: fx.GraphModule, units: int, data: set[fx.Node]) -> None:
        self.gm, self.units, self.data = gm, units, data
        self.env: dict[fx.Node, torch.Tensor] = {}
        self.slices: list[SliceRef] = []
        self.norms: list[str] = []
        self.done: set[fx.Node] = set()

    def axis(self, node: fx.Node) -> int:
        return 1 if len(shape_of(node) or ()) == 4 else -1

    def replay(self, src: fx.Node, code: torch.Tensor) -> None:
        self.env[src] = code
        self.env.update(ix.propagate(self.gm, {src: code}))

    def rows(self, node: fx.Node, at: fx.Node) -> None:
        """A linear/conv whose output lands on the stream at ``at``: its rows (and bias) per channel."""
        if node in self.done:
            return
        self.done.add(node)
        gm = self.gm
        info = linear_info(node, gm)
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if info is not None:
            weight, bias, axis = info.weight, info.bias, info.channel_axis
        elif isinstance(mod, nn.Conv2d) and mod.groups == 1:
            weight, bias, axis = f"{node.target}.weight", f"{node.target}.bias" if mod.bias is not None else None, 1
        else:
            raise _Refused(f"%{node.name} writes into the stream but is not a linear or a plain convolution")
        if bias == "<computed>":
            raise _Refused(f"the bias of %{node.name} is computed in the graph")
        code = ix.row_index(shape_of(node), axis)
        reached = ix.propagate(gm, {node: code})
        reached[node] = code
        if at not in reached or at not in self.env:
            raise _Refused(f"%{node.name}'s rows do not reach the stream at %{at.name}")
        rows = _per_unit(_chan(self.env[at], self.axis(at)), _chan(reached[at], self.axis(at)), self.units,
                         f"%{node.name}")
        self.slices.append(SliceRef(weight, 0, rows, "weight.out"))
        if bias:
            self.slices.append(SliceRef(bias, 0, rows, "bias"))
        self.replay(node, code)

    def joined(self, node: fx.Node, other: fx.Node) -> None:
        """``other`` meets the stream at ``node``: slice its parameters or take its branch's rows."""
        if other in self.env:
            return
        if self._static(other):  # parameters (class token, position embedding, gammas)
            for src in _static_sources(other, self.gm, self.data):
                self._param(src, node, other)
            return
        producer = other
        while op_kind(producer, self.gm) not in ("linear", "conv"):
            inputs = [a for a in producer.all_input_nodes if a in self.data]
            if len(inputs) != 1:
                raise _Refused(f"%{other.name} joins the stream at %{node.name} from more than one branch")
            for a in producer.all_input_nodes:
                if a not in self.data:
                    for src in _static_sources(a, self.gm, self.data):
                        self._param(src, node, a)
            self.module_params(producer)
            producer = inputs[0]
        self.rows(producer, node)

    def _static(self, node: fx.Node) -> bool:
        """Only parameters and constants flow into ``node``; a read of the input's size does not count."""
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if n in seen or _size_read(n):
                continue
            seen.add(n)
            if n.op == "placeholder":
                return False
            stack.extend(n.all_input_nodes)
        return True

    def _param(self, src: fx.Node, at: fx.Node, other: fx.Node) -> None:
        """A parameter reaching the stream at ``at`` through ``other``: sliced along the axis that lands on the channels."""
        if src.op != "get_attr":
            raise _Refused(f"%{src.name} (computed from parameters) joins the stream at %{at.name}")
        if src in self.done:
            return
        shape = shape_of(src) or ()
        for axis in [a for a, d in enumerate(shape) if d == self.units]:
            code = _axis_code(shape, axis)
            code = code if src is other else ix.propagate(self.gm, {src: code}).get(other)
            rank = len(shape_of(at) or ())
            if code is not None and (code >= 0).any() and code.dim() <= rank:
                code = code.reshape((1,) * (rank - code.dim()) + tuple(code.shape))  # broadcast from the right
                try:  # (another axis of the same size may be the one that lands on the channels)
                    per = _per_unit(_chan(self.env[at], self.axis(at)), _chan(code, self.axis(at)), self.units,
                                    f"{src.target}")
                except _Refused:
                    continue
                self.slices.append(SliceRef(str(src.target), axis, per, "param"))
                self.done.add(src)
                return
        raise _Refused(f"parameter {src.target} joins the stream at %{at.name} but none of its axes lands on "
                       "the channels")

    def module_params(self, node: fx.Node) -> None:
        """An element-wise module on the stream or a branch joining it (a layer scale): its per-channel parameters."""
        if node in self.done or node.op != "call_module":
            return
        self.done.add(node)
        mod = self.gm.get_submodule(node.target)
        for name, p in mod.named_parameters():
            if p.dim() != 1 or p.numel() != self.units:
                raise _Refused(f"module {node.target} on the stream has parameter {name} of shape "
                               f"{tuple(p.shape)}, not one value per channel")
            self.slices.append(SliceRef(f"{node.target}.{name}", 0, tuple((u,) for u in range(self.units)), "param"))

    def consumer(self, user: fx.Node, node: fx.Node) -> None:
        """A linear (or 1x1 conv) reading the stream: its input columns per channel."""
        info = linear_info(user, self.gm)
        if info is None or not user.args or user.args[0] is not node:
            raise _Refused(f"%{user.name} reads the stream across channels but is not a linear")
        cols = _per_unit(_chan(self.env[node], self.axis(node)), list(range(info.in_features)), self.units,
                         f"the input of %{user.name}")
        self.slices.append(SliceRef(info.weight, 1, cols, "weight.in"))

    def norm(self, user: fx.Node, node: fx.Node) -> None:
        """A LayerNorm over the stream's channels: its weight and bias narrow; the gated graph masks its statistics."""
        gm = self.gm
        if user.op == "call_module":
            mod = gm.get_submodule(user.target) if user.op == "call_module" else None
            ok = isinstance(mod, nn.LayerNorm) and tuple(mod.normalized_shape) == (self.units,)
            params = [f"{user.target}.{n}" for n, _ in (mod.named_parameters() if ok else [])]
        else:
            shape_arg = user.args[1] if len(user.args) > 1 else user.kwargs.get("normalized_shape")
            ok = user.target is torch.nn.functional.layer_norm and tuple(shape_arg or ()) == (self.units,)
            params = [str(a.target) for a in user.all_input_nodes if a.op == "get_attr"]
            ok = ok and len(params) == len([a for a in user.all_input_nodes if a is not node])
        if not ok or self.axis(node) != -1 or user.args[0] is not node:
            raise _Refused(f"%{user.name} normalises the stream but is not a LayerNorm over its channels")
        units = tuple((u,) for u in _chan(self.env[node], -1))
        if sorted(u for (u,) in units) != list(range(self.units)):
            raise _Refused(f"the channels reaching %{user.name} are not the whole stream")
        positions: list[list[int]] = [[] for _ in range(self.units)]
        for i, (u,) in enumerate(units):  # (one pass: a search per channel was quadratic, 3 s on ViT-B)
            positions[u].append(i)
        order = tuple(tuple(p) for p in positions)
        self.slices.extend(SliceRef(p, 0, order, "param") for p in params)
        self.norms.append(user.name)


_STOPS = {"linear", "conv", "matmul", "einsum", "sdpa", "softmax", "pool", "output"}


def _step(walk: _Walk, node: fx.Node, user: fx.Node) -> bool:
    """Handle one reader of a stream tensor; True when new stream tensors were found."""
    kind = op_kind(user, walk.gm)
    if kind in ("linear", "conv"):
        walk.consumer(user, node)
        return False
    if kind == "norm":
        walk.norm(user, node)
        return False
    if kind == "reduce":  # pooling over tokens keeps the channels
        out = ix._evaluate(user, walk.gm, walk.env) if user not in walk.env else None
        if out is None or not isinstance(out, torch.Tensor) or sorted(set(_chan(out, -1))) != list(range(walk.units)):
            raise _Refused(f"%{user.name} reduces over the stream's channels")
        walk.replay(user, out)
        return True
    if kind in _STOPS:
        raise _Refused(f"%{user.name} ({kind}) reads the stream itself")
    if user not in walk.env:
        return False
    grew = False
    if kind == "module":
        walk.module_params(user)
    for other in user.all_input_nodes:
        if other not in walk.env and shape_of(other) is not None and len(shape_of(other)) > 0:
            before = len(walk.env)
            walk.joined(user, other)
            grew |= len(walk.env) > before
    return grew


def _channel_reads(node: fx.Node, axis: int) -> list[fx.Node]:
    """Nodes reading the size of ``node``'s channel axis: ``x.shape[axis]``, ``x.size(axis)``, ``B, N, C = x.shape``."""
    rank = len(shape_of(node) or ())
    want = {axis % rank, axis % rank - rank} if rank else set()
    out = []
    for u in node.users:
        if u.op == "call_method" and u.target == "size" and len(u.args) > 1 and _index(u.args[1]) in want:
            out.append(u)
        elif u.op == "call_function" and u.target is getattr and u.args[1:2] == ("shape",):
            out += [g for g in u.users if g.target is operator.getitem and _index(g.args[1]) in want]
    return out


def _index(a) -> int | None:
    return a if isinstance(a, int) else None


def _frozen_sizes(gm: fx.GraphModule, env: dict[fx.Node, torch.Tensor]) -> list[ConstRef]:
    """Reshape sizes computed from the stream's width (timm-style ``C // heads``): they mean the *dense*
    width, so narrowing freezes them to the values they had (``per_unit`` 0)."""
    from vitgraph.analysis.groups import _RESHAPES, _size_args
    stack = [r for n in env for r in _channel_reads(n, -1 if len(shape_of(n) or ()) != 4 else 1)]
    derived: set[fx.Node] = set()
    while stack:
        n = stack.pop()
        if n not in derived and VALUE in n.meta and isinstance(n.meta[VALUE], int):
            derived.add(n)
            stack.extend(n.users)
    found = []
    for node in gm.graph.nodes:
        if (node.op == "call_method" and node.target in _RESHAPES) or node.target is torch.reshape:
            for i, a in enumerate(_size_args(node)):
                if isinstance(a, fx.Node) and a in derived:
                    found.append(ConstRef(node.name, i, int(a.meta[VALUE]), 0, False))
    return found


def embed_group(gm: fx.GraphModule, info: TokenInfo, blocks: Sequence[Block], data: set[fx.Node]
                ) -> CoupledGroup | str:
    """The residual stream's channels as one group, or why they cannot narrow together."""
    nodes = {n.name: n for n in gm.graph.nodes}
    if info.embed is None or info.layout != "sequence" or not blocks:
        return "no (batch, tokens, channels) residual stream starting at a patch embedding"
    c = info.embed_dim
    for b in blocks:
        for end in (b.input, b.output):
            if (shape_of(nodes[end]) or (0,))[-1] != c:
                return f"the stream changes width at {b.name} (stages): narrow each stage on its own"
    walk = _Walk(gm, c, data)
    embed = nodes[info.embed]
    try:
        axis = 1 if op_kind(embed, gm) == "conv" else -1
        walk.env[embed] = ix.row_index(shape_of(embed), axis)
        walk.rows(embed, embed)
        seen: set[tuple[fx.Node, fx.Node]] = set()
        grew = True
        while grew:
            grew = False
            for node in list(walk.env):
                for user in node.users:
                    if (node, user) not in seen:
                        seen.add((node, user))
                        grew |= _step(walk, node, user)
    except _Refused as e:
        return str(e)
    merged: dict[tuple[str, int], SliceRef] = {(s.target, s.axis): s for s in walk.slices}
    consts = {(k.node, k.arg_index): k for k in _frozen_sizes(gm, walk.env) + _constants(gm, walk.env, c, 1)}
    return CoupledGroup(name="embed", kind="embed", site="embed", block=None, units=c, unit_width=1,
                        slices=tuple(merged.values()), constants=tuple(consts.values()), norms=tuple(walk.norms))


__all__ = ["embed_group"]
