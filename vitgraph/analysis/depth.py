"""What depth decisions can remove, read from the graph: blocks and branches, exits, the head path.

Read-only, like every analysis. The results are named node sets the cost model prices as *set
factors* (``branch.<i>.<kind>``: the nodes only that residual branch computes; ``cut.<e>``: what
cutting the model after block e removes) and the units the depth passes gate.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch.fx as fx

from vitgraph.analysis.blocks import ancestors, branch_members, removable_residual
from vitgraph.meta import Block, DepthUnit, Residual, shape_of


def branch_factor(block: int, kind: str) -> str:
    """The set factor of block ``block``'s ``kind`` ("attn" | "mlp") residual branch."""
    return f"branch.{block}.{kind}"


def cut_factor(exit_after: int) -> str:
    """The set factor of everything cutting the model after block ``exit_after`` (1-based) removes."""
    return f"cut.{exit_after}"


def removable_branches(blocks: Sequence[Block]) -> Iterator[tuple[Block, str, Residual]]:
    """Every residual branch that can be deleted alone: (block, "attn" | "mlp", its residual)."""
    for b in blocks:
        for kind in ("attn", "mlp"):
            r = removable_residual(b, kind)
            if r is not None:
                yield b, kind, r


def branch_sets(gm: fx.GraphModule, blocks: Sequence[Block]) -> dict[str, frozenset[str]]:
    """``branch.<i>.<kind>`` -> the nodes only that branch computes (what deleting it removes)."""
    return {branch_factor(b.index, kind): frozenset(branch_members(gm, b, r))
            for b, kind, r in removable_branches(blocks)}


def depth_units(blocks: Sequence[Block], per_branch: bool) -> tuple[list[DepthUnit], dict[str, str]]:
    """The units block gates apply to, and for each block left out the reason."""
    units, reasons = [], {}
    for b in blocks:
        if not b.skippable:
            reasons[b.name] = b.skip_reason or "not skippable"
        elif not per_branch:
            units.append(DepthUnit(b.name, b.index, "block", b.input, b.output))
    if per_branch:
        units += [DepthUnit(f"{b.name}.{kind}", b.index, kind, r.skip, r.add)
                  for b, kind, r in removable_branches([b for b in blocks if b.skippable])]
    return units, reasons


def head_path(gm: fx.GraphModule, blocks: Sequence[Block]) -> tuple[tuple[str, ...], str | None]:
    """The nodes turning the last block's output into the model's output (final norm, pooling, head),
    in graph order, or why they cannot be applied again to an earlier block's output."""
    if not blocks:
        return (), "the model has no residual blocks"
    nodes = {n.name: n for n in gm.graph.nodes}
    last = nodes[blocks[-1].output]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    if not isinstance(value, fx.Node):
        return (), f"the model returns {type(value).__name__}, not one tensor of logits"
    below: set[fx.Node] = {last}
    for n in gm.graph.nodes:
        if any(a in below for a in n.all_input_nodes):
            below.add(n)
    above = ancestors(value)
    path = [n for n in gm.graph.nodes if n in below and n in above and n is not last]
    inside = set(path) | {last}
    for n in path:
        for a in n.all_input_nodes:
            if a in inside or a.op == "get_attr" or not any(x.op == "placeholder" for x in ancestors(a)):
                continue
            return (), (f"the head reads %{a.name} besides the last block's output (at %{n.name}; e.g. class-"
                        f"attention blocks, or Swin's sizes taken inside the last block): a copy of it cannot run "
                        f"on an earlier block")
    return tuple(n.name for n in path), None


def exit_reasons(gm: fx.GraphModule, blocks: Sequence[Block], path_reason: str | None) -> dict[int, str | None]:
    """Per 1-based block e: None when an exit classifier may follow block e, else why not."""
    out: dict[int, str | None] = {}
    last = blocks[-1] if blocks else None
    nodes = {n.name: n for n in gm.graph.nodes}
    for b in blocks:
        e = b.index + 1
        if path_reason is not None:
            out[e] = path_reason
        elif b is last:
            out[e] = "an exit after the last block is the model's own head"
        elif shape_of(nodes[b.output]) != shape_of(nodes[last.output]):
            out[e] = (f"block {e}'s output {shape_of(nodes[b.output])} differs from the last block's "
                      f"{shape_of(nodes[last.output])} (another stage): the head does not apply there")
        else:
            out[e] = None
    return out


def truncated_nodes(gm: fx.GraphModule, blocks: Sequence[Block], exit_after: int, path: Sequence[str]
                    ) -> frozenset[str]:
    """Nodes of the dense graph that cutting the model after block ``exit_after`` (1-based) removes:
    everything after that block's output except the head, which the exit's copy replaces."""
    nodes = {n.name: n for n in gm.graph.nodes}
    start = nodes[blocks[exit_after - 1].output]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    keep = set(path)
    return frozenset(n.name for n in gm.graph.nodes if order[n] > order[start]
                     and n.op not in ("output", "placeholder") and n.name not in keep and shape_of(n) is not None)
