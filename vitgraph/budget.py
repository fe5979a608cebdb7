"""One cost model for every decision a gated graph takes: widths, skipped blocks and branches, the exit.

``Pricer(g, ...)(width)`` is the fraction of the dense model's FLOPs left when each width group keeps
``width[group]`` of its units, each depth unit keeps ``depth[i]`` (1 kept, 0 skipped, or a soft
value in between while learning) and the model is cut after block ``exit``. Values may be tensors,
so budget losses differentiate through it; with hard decisions it equals the compact graph's cost
exactly (tests/test_depth.py), because it prices the dense graph's own nodes:

* a group's fraction scales the nodes whose weights it slices (``analysis.cost.evaluate``);
* a skipped block scales its nodes by 0 (their ``block.<i>`` factor); a skipped branch, or a branch
  whose group keeps no unit, subtracts the nodes only that branch computes;
* an exit subtracts every node after its block except the head, which the exit's copy replaces.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from vitgraph.analysis.blocks import branch_members, removable_residual
from vitgraph.analysis.cost import evaluate
from vitgraph.depth import DepthUnit, truncated_nodes
from vitgraph.graph import VitGraph

Decision = Any  # float or scalar tensor


class Pricer:
    """Prices decisions on the dense graph ``g``; ``depth`` and ``exit`` default to the live state."""

    def __init__(self, g: VitGraph, groups: Sequence[str], units: Sequence[DepthUnit], exits: Sequence[int],
                 head: Sequence[str]) -> None:
        self.g = g
        self.dense = g.structure.flops
        # every removable branch, keyed (block, "attn" | "mlp"), with the nodes only it computes
        self.branches: dict[tuple[int, str], set[str]] = {}
        for b in g.structure.blocks:
            for kind in ("attn", "mlp"):
                r = removable_residual(b, kind)
                if r is not None:
                    self.branches[(b.index, kind)] = branch_members(g.gm, b, r)
        self.group_branch: dict[str, tuple[int, str]] = {}
        for name in groups:
            group = g.structure.group(name)
            key = (group.block, group.branch)
            if key in self.branches:
                self.group_branch[name] = key
        self.units = list(units)
        self.truncated = {e: truncated_nodes(g.gm, g.structure.blocks, e, head) for e in exits}
        self.depth_values: Any = None   # callable -> Tensor of keep values per unit (the live depth state)
        self.exit: int | None = None    # the chosen exit (1-based block), once known

    def __call__(self, width: Mapping[str, Decision], depth: Tensor | None = None,
                 exit: int | None | str = "live") -> Decision:
        if depth is None and self.units and self.depth_values is not None:
            depth = self.depth_values()
        exit = self.exit if exit == "live" else exit
        factors: dict[str, Decision] = dict(width)
        branch_keep: dict[tuple[int, str], Decision] = {}
        for i, unit in enumerate(self.units if depth is not None else ()):
            if unit.kind == "block":
                factors[f"block.{unit.block}"] = depth[i]
            else:
                branch_keep[(unit.block, unit.kind)] = depth[i]
        for name, key in self.group_branch.items():  # a group with no unit left deletes its branch
            if name in width and float(torch.as_tensor(width[name]).detach()) == 0.0:
                branch_keep[key] = branch_keep.get(key, 1.0) * 0.0
        total = evaluate(self.g.gm, factors)
        for key, keep in branch_keep.items():
            if exit is not None and key[0] >= exit:
                continue  # after the exit: the cut below removes the whole block
            total = total - (1.0 - keep) * evaluate(self.g.gm, factors, nodes=self.branches[key])
        if exit is not None:
            total = total - evaluate(self.g.gm, factors, nodes=self.truncated[exit])
        return total / self.dense
