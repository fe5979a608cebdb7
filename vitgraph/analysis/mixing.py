"""Talking heads: linear maps across the heads axis of the attention maps (CaiT).

vit-pytorch writes them ``einsum('b h i j, h g -> b g i j', attn, w)`` with a (H, H) parameter, before the
softmax and again after it; timm moves the heads last and applies a ``Linear(H, H)``. Cutting head ``h`` stays
exact when the *first* mix loses its input ``h`` (the logits of ``q_h k_h``, which are gone), the *last* mix its
output ``h`` (the map that multiplies ``v_h``, which is gone), and every map in between keeps all H heads.

Which weight axis takes the input heads, and where the heads sit in the maps entering and leaving, is read
off each op by running it on one-hot probes: nothing here depends on how the mix is spelled.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from vitgraph.analysis import index as ix
from vitgraph.analysis.ops import module_path
from vitgraph.meta import shape_of


@dataclass(frozen=True)
class Mix:
    """One linear map across the heads of the attention maps, as recognition read it."""

    node: fx.Node
    arg: int             # position of the maps in ``node.args``
    in_axis: int         # heads axis of the maps entering
    out_axis: int        # heads axis of the maps leaving
    weight: str          # the (H, H) parameter
    w_in: int            # its axis over the input heads (the other is over the output heads)
    bias: str | None     # a (H,) parameter added to the outputs, or None


def _why(node: fx.Node, gm: fx.GraphModule, what: str) -> str:
    return f"heads are mixed by {module_path(node, gm)} (talking-heads projection) {what}"


def _parameters(node: fx.Node, gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], dict[str, fx.Node]]:
    """The parameters a mix reads, by target: a module's own, or the parameter nodes among its operands
    (with the nodes that read them in)."""
    if node.op == "call_module":
        return {f"{node.target}.{k}": p for k, p in gm.get_submodule(node.target).named_parameters()}, {}
    params = dict(gm.named_parameters())
    attrs = {str(a.target): a for a in node.all_input_nodes if a.op == "get_attr" and str(a.target) in params}
    return {t: params[t] for t in attrs}, attrs


def _run(node: fx.Node, gm: fx.GraphModule, data: fx.Node, x: torch.Tensor, params: dict[str, torch.Tensor],
         attrs: dict[str, fx.Node]) -> torch.Tensor:
    """``node`` on the probe ``x`` (in place of its maps) with ``params`` in place of its parameters."""
    subst = {data: x} | {attrs[t]: v for t, v in params.items() if t in attrs}

    def put(a: object) -> object:
        if isinstance(a, fx.Node):
            if a not in subst:
                raise LookupError(a.name)
            return subst[a]
        return a
    args = fx.node.map_aggregate(node.args, put)
    kwargs = fx.node.map_aggregate(node.kwargs, put)
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        local = {t.removeprefix(f"{node.target}."): v for t, v in params.items()}
        return torch.func.functional_call(mod, local, args, kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _varying(y: torch.Tensor) -> list[int]:
    return [ax for ax in range(y.dim()) if not torch.equal(y, y.narrow(ax, 0, 1).expand_as(y))]


def _probe(node: fx.Node, gm: fx.GraphModule, data: fx.Node, heads: int, weight: str,
           params: dict[str, torch.Tensor], attrs: dict[str, fx.Node]) -> tuple[int, int, int] | None:
    """(heads axis in, heads axis out, weight axis over the input heads) where one-hot maps of each input
    head come out as that head's row (or column) of a coded weight, along one axis; None when no axis does."""
    shape = shape_of(data)
    code = torch.arange(1, heads * heads + 1, dtype=torch.float64).reshape(heads, heads)
    probe = {t: (code if t == weight else torch.zeros_like(p, dtype=torch.float64)) for t, p in params.items()}
    found = []
    for axis in [a for a in range(1, len(shape)) if shape[a] == heads]:
        reads = set()
        for p in range(heads):
            x = torch.zeros(shape, dtype=torch.float64)
            x.select(axis, p).fill_(1.0)
            try:
                y = _run(node, gm, data, x, probe, attrs)
            except Exception:  # noqa: BLE001 - an op the probe cannot run: not sliceable
                return None
            vary = _varying(y)
            if len(vary) != 1 or y.shape[vary[0]] != heads:
                break
            line = ix.line(y, vary[0])
            w_in = 0 if line == code[p].tolist() else 1 if line == code[:, p].tolist() else None
            reads.add((vary[0], w_in))
        else:
            if len(reads) == 1 and None not in next(iter(reads)):
                out_axis, w_in = reads.pop()
                found.append((axis, out_axis, w_in))
    return found[0] if len(found) == 1 else None


def read_mix(node: fx.Node, gm: fx.GraphModule, heads: int) -> Mix | str:
    """The mix at ``node``, or why vitgraph cannot slice it exactly."""
    params, attrs = _parameters(node, gm)
    weights = [t for t, p in params.items() if p.dim() == 2]
    biases = [t for t, p in params.items() if p.dim() == 1]
    data = [a for a in node.all_input_nodes if a not in attrs.values() and shape_of(a) is not None]
    if not weights:
        return _why(node, gm, "through a weight computed from parameters; vitgraph slices a parameter it reads as is")
    if len(weights) != 1 or len(weights) + len(biases) != len(params) or len(biases) > 1 or len(data) != 1:
        return _why(node, gm, "with parameters other than one weight and a bias; vitgraph cannot slice them")
    w = params[weights[0]]
    if tuple(w.shape) != (heads, heads) or (biases and tuple(params[biases[0]].shape) != (heads,)):
        return _why(node, gm, f"through a weight of shape {tuple(w.shape)}, not ({heads}, {heads}) heads by heads; "
                              "vitgraph cannot slice it")
    axes = _probe(node, gm, data[0], heads, weights[0], params, attrs)
    if axes is None:
        return _why(node, gm, "in a way vitgraph cannot read as one heads axis in and one out")
    arg = next((i for i, a in enumerate(node.args) if a is data[0]), -1)
    if arg < 0:
        return _why(node, gm, "with its maps passed inside a container argument; vitgraph cannot gate them")
    return Mix(node, arg, axes[0], axes[1], weights[0], axes[2], biases[0] if biases else None)


def _heads_reach(gm: fx.GraphModule, src: fx.Node, axis: int, dst: fx.Node, dst_axis: int, heads: int) -> bool:
    """Whether head ``h`` of ``src`` (along ``axis``) arrives as head ``h`` of ``dst`` (along ``dst_axis``)."""
    shape = shape_of(src)
    code = ix.along(torch.arange(shape[axis], dtype=torch.float64), shape, axis)
    at = code if src is dst else ix.propagate(gm, {src: code}).get(dst)
    return at is not None and at.dim() > dst_axis and ix.line(at, dst_axis) == list(range(heads))


def talking_heads(gm: fx.GraphModule, logits: fx.Node, maps: fx.Node, before: list[fx.Node],
                  after: list[fx.Node], heads: int) -> list[Mix] | str:
    """The mixes of one attention, in graph order, or why cutting its heads through them would not be exact.

    ``logits`` is ``q @ k^T`` (heads on axis 1), ``maps`` the attention operand of ``attn @ v`` (heads on
    axis 1); ``before`` / ``after`` the mixes between them, before and after the softmax.
    """
    mixes = []
    for node in (*before, *after):
        mix = read_mix(node, gm, heads)
        if isinstance(mix, str):
            return mix
        mixes.append(mix)
    if not before or not after:
        return _why((before or after)[0], gm, "on one side of the softmax only; vitgraph cuts heads through a "
                                             "mix before the softmax and one after it")
    first, last = mixes[0], mixes[-1]
    if len({m.weight for m in mixes}) < len(mixes):
        return _why(first.node, gm, "through one weight used twice; cutting its input heads would cut its output "
                                    "heads too")
    if not _heads_reach(gm, logits, 1, first.node.args[first.arg], first.in_axis, heads):
        return _why(first.node, gm, "on maps whose heads vitgraph cannot follow back to q @ k^T")
    if not _heads_reach(gm, last.node, last.out_axis, maps, 1, heads):
        return _why(last.node, gm, "into maps whose heads vitgraph cannot follow to attn @ v")
    return mixes


__all__ = ["Mix", "read_mix", "talking_heads"]
