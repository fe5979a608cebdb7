"""Coupled channel groups: every weight slice and reshape constant that must shrink together.

For a head group, the rows of the q/k/v projections and the input columns of the output projection
owned by each head come from index propagation (``attention.find_attention``); the reshape/view
arguments holding the head count (or a merged ``heads x width``) are found by replaying *head
numbers* through the same ops and reading which output axis they vary along.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.nn.modules.batchnorm import _BatchNorm

from vitgraph.analysis import index as ix
from vitgraph.analysis.attention import Found
from vitgraph.analysis.mlp import batchnorms, unit_columns
from vitgraph.analysis.ops import PRODUCTS, linear_info, op_kind
from vitgraph.meta import VALUE, ConstRef, CoupledGroup, MlpSite, SliceRef, shape_of

_RESHAPES = {"reshape", "view"}


def _size_args(node: fx.Node) -> tuple[list[object], bool]:
    args = list(node.args[1:]) if node.op == "call_method" else list(node.args[1:2])
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return list(args[0]), True
    return args, False


def _constants(gm: fx.GraphModule, env: dict[fx.Node, torch.Tensor], units: int, width: int) -> list[ConstRef]:
    """Reshape arguments that encode ``units`` (per unit 1) or ``units*width`` (per unit ``width``)."""
    found = []
    for node, idx in env.items():
        if not ((node.op == "call_method" and node.target in _RESHAPES) or
                (node.op == "call_function" and node.target is torch.reshape)):
            continue
        sizes, _ = _size_args(node)
        out = shape_of(node)
        if out is None or len(sizes) != len(out):
            continue
        for axis, arg in enumerate(sizes):
            line = idx
            for other in reversed(range(idx.dim())):  # the line through the origin along `axis`
                if other != axis:
                    line = line.select(other, 0)
            varying = {int(v) for v in line.tolist() if v >= 0}
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
        per_unit = tuple(tuple(int(c) for c in (channel_units == u).nonzero().flatten()) for u in range(units))
        for pname in ("weight", "bias", "running_mean", "running_var"):
            if getattr(mod, pname, None) is not None:
                out.append(SliceRef(f"{node.target}.{pname}", 0, per_unit, pname))
    return out


def _unit_code(rows_per_unit: list[list[int]], size: int) -> torch.Tensor:
    code = torch.full((size,), -1.0, dtype=torch.float64)
    for u, rows in enumerate(rows_per_unit):
        code[rows] = float(u)
    return code


def head_group(gm: fx.GraphModule, found: Found) -> CoupledGroup | None:
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
        slices.append(SliceRef(info.weight, 0, tuple(tuple(r) for r in rows), "weight.out"))
        if info.bias and info.bias != "<computed>":
            slices.append(SliceRef(info.bias, 0, tuple(tuple(r) for r in rows), "bias"))
        code = _unit_code(rows, info.out_features).expand(*shape_of(nodes[lin])).clone()
        env = ix.propagate(gm, {nodes[lin]: code})
        slices.extend(_batchnorm_slices(gm, env, site.heads))
        env_all.update(env)
    proj = linear_info(nodes[site.proj], gm)
    slices.append(SliceRef(proj.weight, 1, tuple(tuple(c) for c in found.proj_cols), "weight.in"))
    core_out = _core_output(gm, found, nodes)
    if core_out is not None and shape_of(core_out) is not None and len(shape_of(core_out)) == 4:
        s = shape_of(core_out)
        code = torch.arange(s[1], dtype=torch.float64).view(1, -1, 1, 1).expand(*s).clone()
        env_all.update(ix.propagate(gm, {core_out: code}))
    consts = _constants(gm, env_all, site.heads, site.head_dim) + _constants(gm, env_all, site.heads, site.v_head_dim)
    unique = {(c.node, c.arg_index): c for c in consts}
    return CoupledGroup(name=f"{site.name}.heads", kind="heads", site=site.name, block=site.block,
                        units=site.heads, unit_width=site.head_dim, slices=tuple(slices),
                        constants=tuple(unique.values()))


def value_dim_group(gm: fx.GraphModule, found: Found) -> CoupledGroup | None:
    """UVC value dims: unit (h, j) is row j of head h's v and the proj column that consumes it."""
    site = found.site
    if site.prunable.get("head_dim") is not None:
        return None
    nodes = {n.name: n for n in gm.graph.nodes}
    v = linear_info(nodes[site.v], gm)
    rows = tuple((r,) for head in found.v_rows for r in head)
    slices = [SliceRef(v.weight, 0, rows, "weight.out")]
    if v.bias and v.bias != "<computed>":
        slices.append(SliceRef(v.bias, 0, rows, "bias"))
    proj = linear_info(nodes[site.proj], gm)
    slices.append(SliceRef(proj.weight, 1, tuple((c,) for head in found.proj_cols for c in head), "weight.in"))
    return CoupledGroup(name=f"{site.name}.v_dims", kind="head_dim", site=site.name, block=site.block,
                        units=site.heads * site.v_head_dim, unit_width=1, slices=tuple(slices))


def _core_output(gm: fx.GraphModule, found: Found, nodes: dict[str, fx.Node]) -> fx.Node | None:
    core = nodes[found.site.core]
    if found.site.impl == "sdpa":
        return core
    frontier = [core]
    for _ in range(6):
        frontier = [u for n in frontier for u in n.users]
        for u in frontier:
            if op_kind(u, gm) in PRODUCTS:
                return u
    return None


def mlp_group(gm: fx.GraphModule, site: MlpSite) -> CoupledGroup | None:
    if site.prunable.get("mlp") is not None:
        return None
    nodes = {n.name: n for n in gm.graph.nodes}
    fc2 = nodes[site.fc2]
    slices: list[SliceRef] = []
    for pick in ((0, -1) if site.gated and len(site.fc1) == 1 else (0,)):
        cols = unit_columns([nodes[f] for f in site.fc1], fc2, gm, pick=pick)
        if cols is None:
            return None
        for lin, col_rows in cols.items():
            if sum(1 for r in col_rows if r >= 0) != site.hidden:
                continue
            info = linear_info(lin, gm)
            rows = tuple((r,) for r in col_rows)
            slices.append(SliceRef(info.weight, 0, rows, "weight.out"))
            if info.bias and info.bias != "<computed>":
                slices.append(SliceRef(info.bias, 0, rows, "bias"))
    for bn in batchnorms(site, gm):  # LeViT-style Linear+BatchNorm: the BN follows fc1's rows
        mod = gm.get_submodule(bn.target)
        if mod.num_features == site.hidden:
            for pname in ("weight", "bias", "running_mean", "running_var"):
                if getattr(mod, pname, None) is not None:
                    slices.append(SliceRef(f"{bn.target}.{pname}", 0, tuple((u,) for u in range(site.hidden)), pname))
    info2 = linear_info(fc2, gm)
    slices.append(SliceRef(info2.weight, 1, tuple((c,) for c in range(site.hidden)), "weight.in"))
    return CoupledGroup(name=f"{site.name}.mlp", kind="mlp", site=site.name, block=site.block,
                        units=site.hidden, unit_width=1, slices=tuple(slices))


__all__ = ["head_group", "mlp_group", "value_dim_group"]
