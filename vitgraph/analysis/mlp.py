"""Recognise MLP sites: Linear -> activation (-> dropout/norm) -> Linear, plain or gated.

"Linear" includes a pointwise (1x1) conv (``ops.linear_info``): EfficientFormer's and the conv-MLP
hybrids' Conv1x1 -> BatchNorm -> act -> Conv1x1 over a (B, C, H, W) stream is an MLP over channels.
A depthwise conv between the two (PVT-v2: fc1 -> tokens to a map -> depthwise 3x3 -> tokens -> act -> fc2)
mixes positions but keeps every hidden channel apart: the units are traced through it
(``index.propagate(depthwise=True)``) and own its filters too (``groups.mlp_group``).

A second linear ``fc2`` is an MLP output when walking back from its input crosses only element-wise
ops (at least one activation) and reaches one or two linears. One linear whose output is split
(chunk/getitem) and multiplied is a packed gated MLP; two linears multiplied are a SwiGLU-style pair.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.fx as fx
from torch.nn.modules.batchnorm import _BatchNorm

from vitgraph.analysis import index as ix
from vitgraph.analysis.ops import (common_prefix, is_depthwise, is_linear, linear_info, module_path, op_kind,
                                   tensor_args)
from vitgraph.meta import MlpSite, shape_of

_THROUGH = {"act", "dropout", "norm", "mul", "shape", "conv"}
# element-wise arithmetic that spelled-out activations use (StarReLU: s * relu(x) ** 2 + b)
_ARITHMETIC = {"add", "div", "function", "method"}


def _producers(fc2: fx.Node, gm: fx.GraphModule, data: set[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """Linears feeding ``fc2`` through element-wise ops, and the ops crossed; None if anything else.

    Constants (parameters, buffers) met on the way are operands, not paths; arithmetic with them
    counts as element-wise only when one data tensor goes in and the same shape comes out.
    """
    start = fc2.args[0] if fc2.args else None
    if not isinstance(start, fx.Node):
        return None
    linears: list[fx.Node] = []
    crossed: list[fx.Node] = []
    queue, seen = deque([start]), {start}
    while queue:
        node = queue.popleft()
        kind = op_kind(node, gm)
        if is_linear(node, gm):
            linears.append(node)
            continue
        inputs = [a for a in tensor_args(node) if a in data]
        elementwise = kind in _ARITHMETIC and len(inputs) == 1 and shape_of(inputs[0]) == shape_of(node)
        if (kind not in _THROUGH and not elementwise) or len(crossed) > 24 or (
                kind == "conv" and not is_depthwise(node, gm)):
            return None
        crossed.append(node)
        for a in inputs:
            if a not in seen:
                seen.add(a)
                queue.append(a)
    return linears, crossed


def find_mlps(gm: fx.GraphModule, claimed: set[str], data: set[fx.Node]) -> list[MlpSite]:
    """Every MLP site on the data path (``data``: nodes computed from the model inputs).

    ``claimed`` holds linear nodes already known to be attention projections.
    """
    sites = []
    for node in gm.graph.nodes:
        if not is_linear(node, gm) or node.name in claimed or node not in data:
            continue
        found = _producers(node, gm, data)
        if found is None:
            continue
        linears, crossed = found
        acts = [c for c in crossed if op_kind(c, gm) == "act"]
        if not acts or not (1 <= len(linears) <= 2) or any(l.name in claimed for l in linears):
            continue
        if not all(isinstance(l.args[0], fx.Node) and l.args[0] in data for l in linears):
            continue  # e.g. a small MLP computing a position bias from constant coordinates
        gated = len(linears) == 2 or any(op_kind(c, gm) == "mul" and len(tensor_args(c)) == 2 for c in crossed)
        fc2_in = shape_of(node.args[0])
        if fc2_in is None:
            continue
        hidden = fc2_in[_axis(node, gm)]
        # order a gated pair as (value, gate): the gate is the one whose path crosses the activation
        if len(linears) == 2:
            first = linears[0]
            gate_first = any(a in first.users or _reaches(first, a) for a in acts)
            linears = linears if not gate_first else [linears[1], linears[0]]
        reason = None
        norm = next((c for c in crossed if op_kind(c, gm) == "norm" and not _per_channel(c, gm)), None)
        if norm is not None:
            reason = f"hidden units pass through {module_path(norm, gm)}, a norm over all units"
        elif not _units_map(linears, node, gm, hidden):
            reason = "could not map fc1 rows to fc2 columns"
        elif any(op_kind(c, gm) == "conv" for c in crossed):
            reason = _unowned_depthwise(linears, node, gm, hidden, gated)
        name = common_prefix([module_path(l, gm) for l in linears] + [module_path(node, gm)]) or module_path(node, gm)
        sites.append(MlpSite(name=name, fc1=tuple(l.name for l in linears), act=acts[0].name, fc2=node.name,
                             hidden=hidden, gated=gated, prunable={"mlp": reason}))
    return sites


def _per_channel(node: fx.Node, gm: fx.GraphModule) -> bool:
    """BatchNorm normalises each unit on its own, so slicing its parameters is exact."""
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), _BatchNorm)


def _reaches(src: fx.Node, dst: fx.Node, depth: int = 6) -> bool:
    frontier = {src}
    for _ in range(depth):
        frontier = {u for n in frontier for u in n.users}
        if dst in frontier:
            return True
    return False


def unit_columns(linears: list[fx.Node], fc2: fx.Node, gm: fx.GraphModule, pick: int = 0
                 ) -> dict[fx.Node, list[int]] | None:
    """For each fc1 linear: the fc1 row feeding each fc2 input column (-1 where none)."""
    out = {}
    for lin in linears:
        env = ix.propagate(gm, {lin: ix.row_index(shape_of(lin), _axis(lin, gm))}, pick=pick, depthwise=True)
        idx = env.get(fc2.args[0])
        if idx is None:
            return None
        out[lin] = ix.line(idx, _axis(fc2, gm))
    return out


def unit_codes(linears: list[fx.Node], fc2: fx.Node, gm: fx.GraphModule, hidden: int, gated: bool
               ) -> list[tuple[fx.Node, list[int], dict[fx.Node, torch.Tensor]]] | None:
    """Per fc1 linear holding all ``hidden`` units (and per half of a packed gated fc1): its row feeding each
    unit, and the unit numbers as every node reached sees them (through depthwise convs too); None when the
    rows do not map."""
    out = []
    for pick in ((0, -1) if gated and len(linears) == 1 else (0,)):
        cols = unit_columns(linears, fc2, gm, pick=pick)
        if cols is None:
            return None
        for lin, col_rows in cols.items():
            if sum(1 for r in col_rows if r >= 0) != hidden:
                continue
            axis = _axis(lin, gm)
            code = torch.full((shape_of(lin)[axis],), -1.0, dtype=torch.float64)
            for u, r in enumerate(col_rows):
                code[r] = float(u)
            env = ix.propagate(gm, {lin: ix.along(code, shape_of(lin), axis)}, pick=pick, depthwise=True)
            out.append((lin, col_rows, env))
    return out


def depthwise_units(gm: fx.GraphModule, envs: list[dict[fx.Node, torch.Tensor]]) -> dict[fx.Node, list[int]]:
    """Each depthwise conv the units cross (in any of ``envs``, from ``unit_codes``): the unit owning each of its
    channels, -1 where none does."""
    owners: dict[fx.Node, list[int]] = {}
    for env in envs:
        for node, code in env.items():
            if op_kind(node, gm) != "conv" or not is_depthwise(node, gm):
                continue
            units = ix.line(code, 1)
            prev = owners.setdefault(node, [-1] * len(units))
            owners[node] = [u if u >= 0 else p for u, p in zip(units, prev)]
    return owners


def _unowned_depthwise(linears: list[fx.Node], fc2: fx.Node, gm: fx.GraphModule, hidden: int, gated: bool
                       ) -> str | None:
    """Why the units cannot be cut where a depthwise conv they cross holds channels no unit owns (slicing its
    filters by unit would drop those channels); None when every crossed conv belongs to the units."""
    codes = unit_codes(linears, fc2, gm, hidden, gated)
    if codes is None:
        return "could not map fc1 rows to fc2 columns"
    for conv, units in depthwise_units(gm, [env for _, _, env in codes]).items():
        if any(u < 0 for u in units):
            return (f"hidden units pass through the depthwise conv {module_path(conv, gm)}, whose channels "
                    f"{[c for c, u in enumerate(units) if u < 0][:4]}... belong to no unit")
    return None


def _axis(node: fx.Node, gm: fx.GraphModule) -> int:
    """The feature axis of a linear-like node: last for a Linear, 1 for a pointwise conv."""
    info = linear_info(node, gm)
    return -1 if info is None else info.channel_axis


def _units_map(linears: list[fx.Node], fc2: fx.Node, gm: fx.GraphModule, hidden: int) -> bool:
    cols = unit_columns(linears, fc2, gm)
    if cols is None:
        return False
    return any(sum(1 for v in c if v >= 0) == hidden for c in cols.values())


__all__ = ["depthwise_units", "find_mlps", "unit_codes", "unit_columns"]
