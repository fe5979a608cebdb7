"""Coupled channel groups: every weight slice and reshape constant that must shrink together.

For a head group, the rows of the q/k/v projections and the input columns of the output projection
owned by each head come from index propagation (``attention.find_attention``); the reshape/view
arguments holding the head count (or a merged ``heads x width``) are found by replaying *head
numbers* through the same ops and reading which output axis they vary along.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx
from torch.nn.modules.batchnorm import _BatchNorm

from vitgraph.analysis import index as ix
from vitgraph.analysis.attention import Found
from vitgraph.analysis.mlp import depthwise_units, unit_codes
from vitgraph.analysis.ops import PRODUCTS, linear_info, op_kind
from vitgraph.meta import VALUE, ConstRef, CoupledGroup, Linear, MlpSite, SliceRef, UnitInput, shape_of

_RESHAPES = {"reshape", "view"}


def _size_args(node: fx.Node) -> list[object]:
    """The sizes of a reshape/view, whether passed as varargs or as one tuple."""
    args = list(node.args[1:]) if node.op == "call_method" else list(node.args[1:2])
    return list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else args


def _constants(gm: fx.GraphModule, env: dict[fx.Node, torch.Tensor], units: int, width: int) -> list[ConstRef]:
    """Reshape arguments that encode ``units`` (per unit 1) or ``units*width`` (per unit ``width``)."""
    found = []
    for node, idx in env.items():
        if not ((node.op == "call_method" and node.target in _RESHAPES) or
                (node.op == "call_function" and node.target is torch.reshape)):
            continue
        sizes = _size_args(node)
        out = shape_of(node)
        if out is None or len(sizes) != len(out):
            continue
        for axis, arg in enumerate(sizes):
            varying = {v for v in ix.line(idx, axis) if v >= 0}
            if len(varying) != units or units == 1:
                continue
            value = arg if isinstance(arg, int) else (arg.meta.get(VALUE) if isinstance(arg, fx.Node) else None)
            if value == units:
                found.append(ConstRef(node.name, axis, units, 1, isinstance(arg, int)))
            elif value == units * width:
                found.append(ConstRef(node.name, axis, value, width, isinstance(arg, int)))
    return found


def _batchnorm_slices(gm: fx.GraphModule, env: dict[fx.Node, torch.Tensor], units: int) -> list[SliceRef]:
    """Per-channel BatchNorms the units flow through (LeViT's Linear+BN): their channels per unit."""
    out = []
    for node, idx in env.items():
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), _BatchNorm):
            continue
        mod = gm.get_submodule(node.target)
        channel_units = idx.reshape(-1, mod.num_features)[0] if idx.dim() == 2 else idx.select(0, 0).reshape(
            mod.num_features, -1)[:, 0]
        owned: list[list[int]] = [[] for _ in range(units)]
        for c, u in enumerate(channel_units.tolist()):
            if u >= 0:
                owned[int(u)].append(c)
        per_unit = tuple(tuple(o) for o in owned)
        for pname in ("weight", "bias", "running_mean", "running_var"):
            if getattr(mod, pname, None) is not None:
                out.append(SliceRef(f"{node.target}.{pname}", 0, per_unit, pname))
    return out


def _linear_rows(info: Linear, rows: tuple[tuple[int, ...], ...]) -> list[SliceRef]:
    """A linear's output rows per unit: weight rows and, when it is a parameter, the bias."""
    out = [SliceRef(info.weight, 0, rows, "weight.out")]
    if info.bias and info.bias != "<computed>":
        out.append(SliceRef(info.bias, 0, rows, "bias"))
    return out


def _merged(slices: list[SliceRef]) -> tuple[SliceRef, ...]:
    """One slice per (tensor, axis): a packed gated MLP's unit owns a value row *and* a gate row."""
    out: dict[tuple[str, int], SliceRef] = {}
    for sl in slices:
        key = (sl.target, sl.axis)
        if key in out:
            prev = out[key]
            # a row reached twice (the same fc1 read as value and gate, e.g. StarReLU) is still one row
            sl = SliceRef(sl.target, sl.axis, tuple(tuple(dict.fromkeys(a + b)) for a, b in zip(prev.indices, sl.indices)),
                          sl.what)
        out[key] = sl
    return tuple(out.values())


def _unit_code(rows_per_unit: list[list[int]], size: int) -> torch.Tensor:
    code = torch.full((size,), -1.0, dtype=torch.float64)
    for u, rows in enumerate(rows_per_unit):
        code[rows] = float(u)
    return code


def _static_sources(node: fx.Node, gm: fx.GraphModule, data: set[fx.Node]) -> list[fx.Node]:
    """Parameters/buffers (get_attr) and input-free linears that a non-data tensor is computed from."""
    out, seen, stack = [], {node}, [node]
    while stack:
        n = stack.pop()
        if n.op == "get_attr" or (linear_info(n, gm) is not None and n not in data):
            out.append(n)
            if n.op == "get_attr":
                continue
        for a in n.all_input_nodes:
            if a not in seen and a not in data:
                seen.add(a)
                stack.append(a)
    return out


def _axis_code(shape: tuple[int, ...], axis: int) -> torch.Tensor:
    view = [shape[axis] if i == axis else 1 for i in range(len(shape))]
    return torch.arange(shape[axis], dtype=torch.float64).view(view).expand(*shape).clone()


def _logits_product(gm: fx.GraphModule, core: fx.Node, mixes: tuple[str, ...] = ()) -> fx.Node | None:
    """The ``q @ k^T`` product feeding an explicit softmax (through scaling, biases, masks and talking heads)."""
    frontier = [core]
    for _ in range(8):
        frontier = [m for n in frontier for m in n.all_input_nodes]
        hit = next((n for n in frontier if op_kind(n, gm) in PRODUCTS and n.name not in mixes), None)
        if hit is not None:
            return hit
    return None


def _reach(gm: fx.GraphModule, src: fx.Node, code: torch.Tensor, dst: fx.Node) -> torch.Tensor | None:
    return code if src is dst else ix.propagate(gm, {src: code}).get(dst)


def _per_head_sources(gm: fx.GraphModule, target: fx.Node, head_axis: int, heads: int, data: set[fx.Node],
                      env_all: dict[fx.Node, torch.Tensor]) -> list[SliceRef]:
    """Slices of the parameters behind ``target`` (a position bias, a temperature) along its head axis."""
    slices = []
    for src in _static_sources(target, gm, data):
        info = linear_info(src, gm) if src.op != "get_attr" else None
        if info is not None:  # e.g. vit_relpos: a small MLP whose outputs are the heads
            at = _reach(gm, src, ix.row_index(shape_of(src)), target)
            if at is None or sorted(ix.line(at, head_axis)) != sorted(set(ix.line(at, head_axis))):
                continue
            rows = tuple((r,) for r in ix.line(at, head_axis))
            slices.extend(_linear_rows(info, rows))
            code = _unit_code([list(r) for r in rows], info.out_features).expand(*shape_of(src)).clone()
            env_all.update(ix.propagate(gm, {src: code}))
            continue
        shape = shape_of(src)
        for axis in [a for a, d in enumerate(shape or ()) if d == heads]:
            at = _reach(gm, src, _axis_code(shape, axis), target)
            if at is not None and ix.line(at, head_axis) == list(range(heads)):
                slices.append(SliceRef(str(src.target), axis, tuple((h,) for h in range(heads)), "per_head"))
                env_all.update(ix.propagate(gm, {src: _axis_code(shape, axis)}))
                break
    return slices


def refuse_unsliceable_heads(gm: fx.GraphModule, found: Found, data: set[fx.Node]) -> None:
    """Mark a site's heads not prunable (with the reason) where q or k meet a per-head operand that cutting
    the q/k rows would not cut. Runs before blocks are assembled, which copy the site."""
    site = found.site
    if site.prunable.get("heads") is not None:
        return
    nodes = {n.name: n for n in gm.graph.nodes}
    env: dict[fx.Node, torch.Tensor] = {}
    for lin, rows in ((site.q, found.q_rows), (site.k, found.k_rows)):
        width = linear_info(nodes[lin], gm).out_features
        env.update(ix.propagate(gm, {nodes[lin]: _unit_code(rows, width).expand(*shape_of(nodes[lin])).clone()}))
    why = _unsliced_per_head_operand(gm, env, site.heads, data)
    if why is not None:  # e.g. a mixed (per-head) rotary table shared by every block
        found.site = replace(site, prunable={**site.prunable, "heads": why})


def _unsliced_per_head_operand(gm: fx.GraphModule, env: dict[fx.Node, torch.Tensor], heads: int,
                               data: set[fx.Node]) -> str | None:
    """Why heads cannot be cut, where q or k meet a tensor of their own head count that no input flows into
    (an element-wise operand with a head axis, e.g. RoPE-mixed's per-head frequencies): slicing the q/k rows
    would leave it at the full head count. None when there is none."""
    for node, code in env.items():
        if heads < 2 or code.dim() < 2 or op_kind(node, gm) not in ("mul", "add", "div"):
            continue
        axis = ix.channel_axis(code)
        rank = code.dim()
        for other in node.all_input_nodes:
            shape = shape_of(other)
            if other in env or other in data or not shape or axis is None:
                continue
            at = axis - (rank - len(shape))  # the operand's dimension broadcast against the head axis
            if 0 <= at < len(shape) and shape[at] == heads:
                return (f"q/k are combined element-wise with %{other.name}, a per-head tensor ({heads} heads, "
                        f"shape {tuple(shape)}) computed from parameters outside the attention (e.g. per-head "
                        "rotary frequencies); vitgraph cannot cut its heads")
    return None


def _computed_bias_slices(gm: fx.GraphModule, lin: fx.Node, rows: list[list[int]], data: set[fx.Node]
                          ) -> list[SliceRef]:
    """BEiT/EVA build the qkv bias as cat(q_bias, zeros, v_bias): slice the pieces that feed each head."""
    bias = lin.kwargs.get("bias", lin.args[2] if len(lin.args) > 2 else None)
    slices = []
    for src in _static_sources(bias, gm, data):
        shape = shape_of(src)
        if src.op != "get_attr" or not shape or len(shape) != 1:
            continue
        at = _reach(gm, src, _axis_code(shape, 0), bias)
        if at is None:
            continue
        per_head = tuple(tuple(int(at[r]) for r in head if at[r] >= 0) for head in rows)
        if any(per_head):
            slices.append(SliceRef(str(src.target), 0, per_head, "bias"))
    return slices


def head_group(gm: fx.GraphModule, found: Found, data: set[fx.Node]) -> CoupledGroup | None:
    site = found.site
    if site.prunable.get("heads") is not None:
        return None
    nodes = {n.name: n for n in gm.graph.nodes}
    slices: list[SliceRef] = []
    per_producer: dict[str, list[list[int]]] = {}
    for lin, rows in ((site.q, found.q_rows), (site.k, found.k_rows), (site.v, found.v_rows)):
        acc = per_producer.setdefault(lin, [[] for _ in range(site.heads)])
        for h, r in enumerate(rows):
            acc[h].extend(r)
    env_all: dict[fx.Node, torch.Tensor] = {}
    for lin, rows in per_producer.items():
        info = linear_info(nodes[lin], gm)
        slices.extend(_linear_rows(info, tuple(tuple(r) for r in rows)))
        if info.bias == "<computed>":
            slices.extend(_computed_bias_slices(gm, nodes[lin], rows, data))
        code = _unit_code(rows, info.out_features).expand(*shape_of(nodes[lin])).clone()
        env = ix.propagate(gm, {nodes[lin]: code})
        slices.extend(_batchnorm_slices(gm, env, site.heads))
        env_all.update(env)
    proj = linear_info(nodes[site.proj], gm)
    slices.append(SliceRef(proj.weight, 1, tuple(tuple(c) for c in found.proj_cols), "weight.in"))
    core_out = found.out
    if core_out is not None and shape_of(core_out) is not None and len(shape_of(core_out)) >= 4:
        env_all.update(ix.propagate(gm, {core_out: _axis_code(shape_of(core_out), 1)}))
    slices.extend(_mix_slices(gm, found, env_all))
    logits = _logits_product(gm, nodes[site.core], site.mixes) if site.impl == "explicit" else None
    if logits is not None and len(shape_of(logits) or ()) >= 4:  # reshapes of the logits (Swin's shift mask)
        shape = shape_of(logits)
        env_all.update(ix.propagate(gm, {logits: _axis_code(shape, len(shape) - 3)}))
    scores = len(shape_of(nodes[site.core]) or ())  # rank of the logits (softmax/sdpa share it)
    for extra in found.score_inputs:  # per-head position tables and temperatures on the logits
        shape = shape_of(extra)
        head_axis = (len(shape) - scores + 1) if shape else -1
        if shape and 0 <= head_axis < len(shape) and shape[head_axis] == site.heads:
            slices.extend(_per_head_sources(gm, extra, head_axis, site.heads, data, env_all))
    consts = _constants(gm, env_all, site.heads, site.head_dim) + _constants(gm, env_all, site.heads, site.v_head_dim)
    unique = {(c.node, c.arg_index): c for c in consts}
    first = found.mixes[0] if found.mixes else None
    return CoupledGroup(name=f"{site.name}.heads", kind="heads", site=site.name, block=site.block,
                        units=site.heads, unit_width=site.head_dim, slices=_merged(slices),
                        constants=tuple(unique.values()),
                        unit_inputs=(UnitInput(first.node.name, first.arg, first.in_axis),) if first else ())


def _mix_slices(gm: fx.GraphModule, found: Found, env_all: dict[fx.Node, torch.Tensor]) -> list[SliceRef]:
    """Talking heads: the first mix's weight over its input heads (it consumes the logits of each head, as the
    output projection consumes its values), the last mix's weight and bias over its output heads (each feeds
    ``attn @ v`` of one head). The maps in between keep every head: no slice, no reshape constant moves there."""
    if not found.mixes:
        return []
    first, last = found.mixes[0], found.mixes[-1]
    per_head = tuple((h,) for h in range(found.site.heads))
    slices = [SliceRef(first.weight, first.w_in, per_head, "weight.in"),
              SliceRef(last.weight, 1 - last.w_in, per_head, "weight.out")]
    if last.bias is not None:
        slices.append(SliceRef(last.bias, 0, per_head, "bias"))
    env_all.update(ix.propagate(gm, {last.node: _axis_code(shape_of(last.node), last.out_axis)}))
    return slices


def value_dim_group(gm: fx.GraphModule, found: Found) -> CoupledGroup | None:
    """UVC value dims: unit (h, j) is row j of head h's v and the proj column that consumes it."""
    site = found.site
    if site.prunable.get("head_dim") is not None:
        return None
    nodes = {n.name: n for n in gm.graph.nodes}
    slices = _linear_rows(linear_info(nodes[site.v], gm), tuple((r,) for head in found.v_rows for r in head))
    proj = linear_info(nodes[site.proj], gm)
    slices.append(SliceRef(proj.weight, 1, tuple((c,) for head in found.proj_cols for c in head), "weight.in"))
    return CoupledGroup(name=f"{site.name}.v_dims", kind="head_dim", site=site.name, block=site.block,
                        units=site.heads * site.v_head_dim, unit_width=1, slices=tuple(slices))


def mlp_group(gm: fx.GraphModule, site: MlpSite) -> CoupledGroup | None:
    """fc1's rows (each half of a packed gated fc1), fc2's input columns, and what the units flow through on
    the way: per-channel BatchNorms, the filters of depthwise convs (PVT-v2), and the reshape sizes holding
    the unit count (tokens turned into a (B, hidden, H, W) map for the conv and back)."""
    if site.prunable.get("mlp") is not None:
        return None
    nodes = {n.name: n for n in gm.graph.nodes}
    fc2 = nodes[site.fc2]
    codes = unit_codes([nodes[f] for f in site.fc1], fc2, gm, site.hidden, site.gated)
    if codes is None:
        return None
    slices: list[SliceRef] = []
    env_all: dict[fx.Node, torch.Tensor] = {}
    for lin, col_rows, env in codes:
        slices.extend(_linear_rows(linear_info(lin, gm), tuple((r,) for r in col_rows)))
        # Linear+BatchNorm (LeViT), Conv1x1+BatchNorm2d (EfficientFormer): the BN channels the units flow through
        slices.extend(_batchnorm_slices(gm, env, site.hidden))
        env_all.update(env)
    for conv, units in depthwise_units(gm, [env for _, _, env in codes]).items():
        per_unit = tuple(tuple(c for c, u in enumerate(units) if u == unit) for unit in range(site.hidden))
        mod = gm.get_submodule(conv.target)
        slices.append(SliceRef(f"{conv.target}.weight", 0, per_unit, "weight.out"))
        if getattr(mod, "bias", None) is not None:
            slices.append(SliceRef(f"{conv.target}.bias", 0, per_unit, "bias"))
    info2 = linear_info(fc2, gm)
    slices.append(SliceRef(info2.weight, 1, tuple((c,) for c in range(site.hidden)), "weight.in"))
    consts = {(c.node, c.arg_index): c for c in _constants(gm, env_all, site.hidden, 1)}
    return CoupledGroup(name=f"{site.name}.mlp", kind="mlp", site=site.name, block=site.block,
                        units=site.hidden, unit_width=1, slices=_merged(slices), constants=tuple(consts.values()))


__all__ = ["head_group", "mlp_group", "value_dim_group"]
