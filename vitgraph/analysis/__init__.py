"""Structure recognition over a captured ViT graph. ``analyse`` runs every analysis in order; ``graph``
holds ``VitGraph`` and ``vg.trace`` (capture, then analyse), ``summary`` what ``vitgraph inspect`` prints.

Read-only on the graph: it writes ``node.meta`` (shapes, roles, costs) and returns a
:class:`~vitgraph.meta.Structure`; it never edits nodes. Recognition is by dataflow, never by class names.
May import capture, targets and the ground floor (errors, meta, spec); nothing here imports a gate, a pass
or an axis.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx

from vitgraph.analysis.attention import find_attention
from vitgraph.analysis.attention_forms import find_attention_forms
from vitgraph.analysis.blocks import find_blocks, find_tokens
from vitgraph.analysis.cost import annotate_costs, assign_factors, one_image_flops
from vitgraph.analysis.embed import embed_group
from vitgraph.analysis.value_dims import value_plan
from vitgraph.analysis.groups import head_group, mlp_group, refuse_unsliceable_heads, value_dim_group
from vitgraph.analysis.mlp import find_mlps
from vitgraph.analysis.ops import input_dependent
from vitgraph.analysis.shapes import propagate_shapes
from vitgraph.analysis.tokens import mark_token_prunable
from vitgraph.meta import ROLE, Role, Structure


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
        for core in (a.core, *a.head_cores):
            put(core, "attn.core", a.block, a.name)
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
    put(structure.tokens.pool, "head.pool", None, "head")
    put(structure.tokens.head, "head.fc", None, "head")


def analyse(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], *, shapes_known: bool = False
            ) -> Structure:
    """Recognise attention, MLPs, blocks, tokens and coupled groups; price every node.

    ``shapes_known``: ``propagate_shapes`` already ran on these inputs (``vg.trace`` runs it once and
    uses its output to check the trace), so the graph is not run a second time.
    """
    batch = int(example_inputs[0].shape[0]) if example_inputs else 1
    if not shapes_known:
        propagate_shapes(gm, example_inputs)
    found = _one_site_per_projection(find_attention(gm, batch))
    found += find_attention_forms(gm, found)  # per-head chunks on conv maps (EfficientViT), separable (MobileViT-v2)
    # value rows per head (attention->conv reads them) exist wherever heads map; *cutting* value dims
    # also needs the projections split apart, which only some graphs allow (prunable["head_dim"])
    value_groups = [g for g in (value_dim_group(gm, f) for f in found) if g is not None]
    for f in found:
        if f.site.prunable.get("head_dim") is None:
            plan = value_plan(gm, f.site)
            if isinstance(plan, str):
                f.site = replace(f.site, prunable={**f.site.prunable, "head_dim": plan})
    claimed = {x for f in found for x in (f.site.q, f.site.k, f.site.v, f.site.proj) if x}
    data = input_dependent(gm)
    mlps = find_mlps(gm, claimed, data)
    flops = annotate_costs(gm, batch, per_image=one_image_flops(gm, example_inputs))
    for f in found:
        refuse_unsliceable_heads(gm, f, data)
    blocks = find_blocks(gm, [f.site for f in found], mlps)
    tokens = find_tokens(gm, blocks)
    blocks = _no_tokens_before_shared(mark_token_prunable(gm, blocks, tokens))
    block_of = {b.attention.name: b.index for b in blocks if b.attention} | {
        b.mlp.name: b.index for b in blocks if b.mlp}
    for f in found:
        f.site = replace(f.site, block=block_of.get(f.site.name))
    groups = [g for g in (head_group(gm, f, data) for f in found) if g is not None] + value_groups
    attention = tuple(f.site for f in found)
    mlps = [replace(m, block=block_of.get(m.name)) for m in mlps]
    groups += [g for g in (mlp_group(gm, m) for m in mlps) if g is not None]
    embed = embed_group(gm, tokens, blocks, data)
    if not isinstance(embed, str):
        groups.append(embed)
    assign_factors(gm, blocks, attention, groups, tokens.tokens)
    params = sum(p.numel() for p in gm.parameters())
    structure = Structure(blocks=tuple(blocks), attention=attention, mlps=tuple(mlps), tokens=tokens,
                          groups=tuple(groups), flops=flops, params=params, notes=_notes(gm, attention),
                          embed_reason=embed if isinstance(embed, str) else None)
    _tag(gm, structure)
    return structure


SHARED = "two attention maps share this q/k/v projection (e.g. differential attention); their heads are not separable"


def _one_site_per_projection(found: list) -> list:
    """Two attention maps over one q/k/v projection (differential attention) are one site: the first map stays,
    its heads and value dims not prunable (cutting rows for one map would cut them for both)."""
    seen: dict[str, Any] = {}
    for f in found:
        if f.site.name in seen:
            first = seen[f.site.name]
            first.site = replace(first.site, prunable={**first.site.prunable, "heads": SHARED, "head_dim": SHARED})
        else:
            seen[f.site.name] = f
    return list(seen.values())


def _no_tokens_before_shared(blocks: list) -> list:
    """Token scores read one attention map: no selector before (or at) a block whose attention has two."""
    shared = [b.index for b in blocks if b.attention and b.attention.prunable.get("heads") == SHARED]
    last = max(shared, default=-1)
    return [replace(b, token_prunable=False, token_reason=f"block {last}: {SHARED}")
            if b.index <= last else b for b in blocks]


def _notes(gm: fx.GraphModule, attention: tuple) -> tuple[str, ...]:
    """What recognition could not see: opaque leaf modules, softmaxes outside any attention."""
    from vitgraph.analysis.ops import module_path, op_kind
    leaves: dict[str, list[str]] = {}
    notes = []
    cores = {c for a in attention for c in (a.core, *a.head_cores)}
    for n in gm.graph.nodes:
        kind = op_kind(n, gm)
        if kind == "module":
            mod = gm.get_submodule(n.target)
            if any(isinstance(m, torch.nn.Linear) for m in mod.modules()):
                leaves.setdefault(type(mod).__name__, []).append(str(n.target))
        elif kind in ("softmax", "sdpa") and n.name not in cores:
            notes.append(f"%{n.name} in {module_path(n, gm)}: a {kind} that is not part of a recognised "
                         "q @ k^T -> softmax -> @ v attention")
    for cls, paths in leaves.items():
        where = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        notes.insert(0, f"{len(paths)} leaf module(s) {cls} ({where}): tracing does not see inside them, so "
                        "their attention/MLP is not recognised or prunable")
    return tuple(notes)


__all__ = ["analyse"]
