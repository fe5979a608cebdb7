"""Structure recognition over a traced ViT graph. ``analyse`` runs every analysis in order.

Read-only on the graph: it writes ``node.meta`` (shapes, roles, costs) and returns a
:class:`~vitgraph.meta.Structure`; it never edits nodes.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx

from vitgraph.analysis.attention import find_attention
from vitgraph.analysis.blocks import find_blocks, find_tokens, mark_token_prunable
from vitgraph.analysis.cost import annotate_costs
from vitgraph.analysis.groups import head_group, mlp_group, value_dim_group
from vitgraph.analysis.mlp import find_mlps
from vitgraph.analysis.shapes import propagate_shapes
from vitgraph.meta import COST, ROLE, Role, Structure


def _tag(gm: fx.GraphModule, structure: Structure) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    for n in gm.graph.nodes:
        n.meta.pop(ROLE, None)

    def put(name: str | None, kind: str, block: int | None, site: str) -> None:
        if name is not None and name in nodes and ROLE not in nodes[name].meta:
            nodes[name].meta[ROLE] = Role(kind, block, site)

    for a in structure.attention:
        if a.fused == "qkv":
            put(a.q, "attn.qkv", a.block, a.name)
        elif a.fused == "qk+v":
            put(a.q, "attn.qk", a.block, a.name)
        elif a.fused == "q+kv":
            put(a.k, "attn.kv", a.block, a.name)
        put(a.q, "attn.q", a.block, a.name)
        put(a.k, "attn.k", a.block, a.name)
        put(a.v, "attn.v", a.block, a.name)
        put(a.q_norm, "attn.q_norm", a.block, a.name)
        put(a.k_norm, "attn.k_norm", a.block, a.name)
        put(a.core, "attn.core", a.block, a.name)
        put(a.proj, "attn.proj", a.block, a.name)
    for m in structure.mlps:
        for f in m.fc1:
            put(f, "mlp.fc1", m.block, m.name)
        put(m.act, "mlp.act", m.block, m.name)
        put(m.fc2, "mlp.fc2", m.block, m.name)
    for b in structure.blocks:
        for r in b.residuals:
            put(r.add, "residual.add", b.index, b.name)
    put(structure.tokens.embed, "tokens.embed", None, "embed")


def analyse(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> Structure:
    """Recognise attention, MLPs, blocks, tokens and coupled groups; price every node."""
    batch = int(example_inputs[0].shape[0]) if example_inputs else 1
    propagate_shapes(gm, example_inputs)
    found = find_attention(gm, batch)
    claimed = {x for f in found for x in (f.site.q, f.site.k, f.site.v, f.site.proj) if x}
    data = _data_nodes(gm)
    mlps = find_mlps(gm, claimed, data)
    flops = annotate_costs(gm, batch)
    blocks = find_blocks(gm, [f.site for f in found], mlps)
    tokens = find_tokens(gm, blocks)
    blocks = mark_token_prunable(gm, blocks, tokens)
    block_of = {b.attention.name: b.index for b in blocks if b.attention} | {
        b.mlp.name: b.index for b in blocks if b.mlp}
    for f in found:
        f.site = replace(f.site, block=block_of.get(f.site.name))
    attention = tuple(f.site for f in found)
    mlps = [replace(m, block=block_of.get(m.name)) for m in mlps]
    groups = [g for g in (head_group(gm, f) for f in found) if g is not None]
    groups += [g for g in (value_dim_group(gm, f) for f in found) if g is not None]
    groups += [g for g in (mlp_group(gm, m) for m in mlps) if g is not None]
    # each node's FLOPs scale with the groups whose weights it slices
    factor_of: dict[str, list[str]] = {}
    weight_users = {}
    for n in gm.graph.nodes:
        for target in _weights_of(n, gm):
            weight_users.setdefault(target, []).append(n.name)
    for g in groups:
        if g.kind == "head_dim":  # value dims scale only the v third of a fused qkv: priced by their pass
            continue
        for s in g.slices:
            for user in weight_users.get(s.target, []):
                if g.name not in factor_of.setdefault(user, []):
                    factor_of[user].append(g.name)
        if g.kind == "heads":
            site = next(a for a in attention if a.name == g.site)
            factor_of.setdefault(site.core, []).append(g.name)
            if site.impl == "explicit":
                for n in gm.graph.nodes:
                    if n.name in _explicit_matmuls(gm, site.core):
                        factor_of.setdefault(n.name, []).append(g.name)
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, fs in factor_of.items():
        c = nodes[name].meta.get(COST)
        if c is not None:
            nodes[name].meta[COST] = replace(c, factors=tuple(fs))
    params = sum(p.numel() for p in gm.parameters())
    structure = Structure(blocks=tuple(blocks), attention=attention, mlps=tuple(mlps), tokens=tokens,
                          groups=tuple(groups), flops=flops, params=params, notes=_notes(gm, attention))
    _tag(gm, structure)
    return structure


def _notes(gm: fx.GraphModule, attention: tuple) -> tuple[str, ...]:
    """What recognition could not see: opaque leaf modules, softmaxes outside any attention."""
    from vitgraph.analysis.ops import module_path, op_kind
    notes = []
    cores = {a.core for a in attention}
    for n in gm.graph.nodes:
        kind = op_kind(n, gm)
        if kind == "module":
            mod = gm.get_submodule(n.target)
            if any(isinstance(m, torch.nn.Linear) for m in mod.modules()):
                notes.append(f"{n.target} ({type(mod).__name__}) is a leaf module: tracing does not see inside it, "
                             "so its attention/MLP is not recognised or prunable")
        elif kind in ("softmax", "sdpa") and n.name not in cores:
            notes.append(f"%{n.name} in {module_path(n, gm)}: a {kind} that is not part of a recognised "
                         "q @ k^T -> softmax -> @ v attention")
    return tuple(notes)


def _data_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on a model input (not only on parameters and constants)."""
    data: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in data for a in n.all_input_nodes):
            data.add(n)
    return data


def _weights_of(node: fx.Node, gm: fx.GraphModule) -> list[str]:
    from vitgraph.analysis.ops import linear_info
    info = linear_info(node, gm)
    return [info.weight] if info is not None else []


def _explicit_matmuls(gm: fx.GraphModule, core: str) -> set[str]:
    """The q@k^T and attn@v matmuls around an explicit softmax core."""
    from vitgraph.analysis.ops import op_kind
    nodes = {n.name: n for n in gm.graph.nodes}
    out: set[str] = set()
    for direction in ("back", "fwd"):
        frontier = [nodes[core]]
        for _ in range(6):
            nxt = []
            for n in frontier:
                nxt.extend(n.all_input_nodes if direction == "back" else n.users)
            hit = [n for n in nxt if op_kind(n, gm) == "matmul"]
            if hit:
                out.add(hit[0].name)
                break
            frontier = nxt
    return out


__all__ = ["analyse"]
