"""Materialize: cut the model at its chosen exit (WDPruning, methods.md §2.5).

The gated graph returns ``(final, *exits)``. After this pass it returns one tensor: the chosen
exit's logits (the blocks after it, the final norm and head and every other exit go dead and are
deleted), or the final head's when no exit was chosen (every exit is deleted).

The chosen exit then becomes the model's head: its modules and parameters take the names of the head
path's ones they copy (``origin``, written by ``InsertExitsPass``), which the cut freed. What the
analysis recorded about the head (the stream's channel group slices the final norm and the
classifier's input columns, ``width.embed``) so applies to the exit. Before (cut after block 4)::

    layer_norm_7 = F.layer_norm(add_8, [64], self.vg_exits.exit4.norm_weight, ...)
    head_1 = self.vg_exits.exit4.head(select_1)

After::

    layer_norm_7 = F.layer_norm(add_8, [64], self.norm.weight, ...)
    head_1 = self.head(select_1)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx
from torch import nn

from vitgraph.errors import PreconditionError
from vitgraph.meta import EXITS
from vitgraph.passes.base import PassResult, VitPass


class TruncateAtExitPass(VitPass):
    """After: the graph returns one tensor, ``exits[chosen]``'s (or the final head's); no exit modules."""

    def __init__(self, exits: Sequence[int], chosen: int | None) -> None:
        self.exits = list(exits)
        self.chosen = chosen

    def requires(self, gm: fx.GraphModule) -> None:
        if self.chosen is not None and self.chosen not in self.exits:
            raise PreconditionError(f"{self.name}: exit {self.chosen} is not one of the exits {self.exits}")
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        if not isinstance(out, tuple) or len(out) != len(self.exits) + 1:
            raise PreconditionError(f"{self.name}: the graph does not return (final, *exits); run InsertExitsPass")

    def call(self, gm: fx.GraphModule) -> PassResult:
        output = next(n for n in gm.graph.nodes if n.op == "output")
        outs = output.args[0]
        value = outs[0] if self.chosen is None else outs[1 + self.exits.index(self.chosen)]
        output.args = (value,)
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        adopted = _adopt(gm, f"{EXITS}.exit{self.chosen}") if self.chosen is not None else 0
        gm.delete_all_unused_submodules()
        used = any(n.op in ("call_module", "get_attr") and str(n.target).startswith(EXITS + ".") for n in gm.graph.nodes)
        if hasattr(gm, EXITS) and not used:  # (an exit of parameter-free modules, e.g. a dropout, still runs)
            delattr(gm, EXITS)
        gm.recompile()
        removed = before - len(gm.graph.nodes)
        return PassResult(gm, modified=True, counters={"nodes_removed": removed, "adopted": adopted})


def _adopt(gm: fx.GraphModule, prefix: str) -> int:
    """The exit at ``prefix`` takes the model's names for what it copies, where no live node still uses them."""
    root = gm.get_submodule(prefix)
    origin: dict[str, str] = getattr(root, "origin", {})
    mine = [n for n in gm.graph.nodes if n.op in ("call_module", "get_attr") and str(n.target).startswith(prefix + ".")]
    others = {str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr") and n not in mine}
    moved: dict[str, str] = {}
    for n in mine:
        local = str(n.target)[len(prefix) + 1:]
        target = moved.get(local) or origin.get(local)
        if target is None or any(t == target or t.startswith(target + ".") or target.startswith(t + ".")
                                 for t in others):
            continue  # (still the dense head's, or a part of something alive: the exit keeps its own name)
        if local not in moved:
            _put(gm, target, getattr(root, local))
            moved[local] = target
        n.target = target
    return len(moved)


def _put(gm: fx.GraphModule, target: str, value: nn.Module | nn.Parameter) -> None:
    """Register ``value`` at ``target`` (a module or a parameter), replacing what is there."""
    owner_name, _, attr = target.rpartition(".")
    try:
        owner = gm.get_submodule(owner_name) if owner_name else gm
    except AttributeError:
        gm.add_submodule(owner_name, nn.Module())
        owner = gm.get_submodule(owner_name)
    if isinstance(value, nn.Module):
        owner.add_module(attr, value)
        return
    if attr in owner._modules or attr in owner._buffers:
        delattr(owner, attr)
    owner.register_parameter(attr, value)
