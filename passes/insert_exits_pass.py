"""Instrument: exit classifiers after chosen blocks (WDPruning, methods.md §2.1).

Each exit is a copy of the model's own head path (final norm, pooling, classifier) applied to the
output of block ``e``, with fresh parameters: linears trunc-normal (std 0.02) with zero bias, norms
reset; other modules in the path (an attention pool) start from the model's weights. The graph then
returns a tuple ``(final, exit_e1, exit_e2, ...)``; ``GatedModel`` hands the loop the first as the
logits and the rest as auxiliary outputs.

Before::

    norm = self.norm(add_23);  getitem = norm[:, 0];  head = self.head(getitem)
    return head

After (``exits: [9]``)::

    ...
    norm_1 = self.vg_exits.exit9.norm(add_17);  getitem_1 = norm_1[:, 0]
    head_1 = self.vg_exits.exit9.head(getitem_1)
    return (head, head_1)
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch.fx as fx
from torch import nn

from vitgraph.errors import PreconditionError
from vitgraph.meta import EXITS, Block
from vitgraph.passes.base import PassResult, VitPass, require_nodes

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)


def fresh(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with new parameters: linears trunc-normal 0.02 and zero bias, norms reset."""
    m = copy.deepcopy(module)
    for sub in m.modules():
        if isinstance(sub, nn.Linear):
            nn.init.trunc_normal_(sub.weight, std=0.02)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, _NORMS) or type(sub).__name__.endswith("Norm") and hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    return m


class InsertExitsPass(VitPass):
    """After: the graph returns ``(final, *exits)``; exit e reads block e's output through its own head."""

    def __init__(self, exits: Sequence[int], blocks: Sequence[Block], path: Sequence[str]) -> None:
        self.exits = list(exits)
        self.blocks = list(blocks)
        self.path = list(path)

    def requires(self, gm: fx.GraphModule) -> None:
        if hasattr(gm, EXITS):
            raise PreconditionError(f"{self.name}: the graph already has exits ({EXITS})")
        if not self.path:
            raise PreconditionError(f"{self.name}: no head path to copy")
        require_nodes(gm, [*self.path, *(self.blocks[e - 1].output for e in self.exits)], self.name, "head")

    def call(self, gm: fx.GraphModule) -> PassResult:
        if not self.exits:
            return PassResult(gm, modified=False)
        gm.add_module(EXITS, nn.Module())
        nodes = {n.name: n for n in gm.graph.nodes}
        output = next(n for n in gm.graph.nodes if n.op == "output")
        final = output.args[0]
        last = nodes[self.blocks[-1].output]
        params = dict(gm.named_parameters())
        outs = []
        for e in self.exits:
            prefix = f"{EXITS}.exit{e}"
            gm.add_submodule(prefix, nn.Module())
            env = {last: nodes[self.blocks[e - 1].output]}
            with gm.graph.inserting_before(output):
                for a in self._shared_params(nodes, params):  # a functional norm's weight: the exit's own copy
                    target = f"{prefix}.{str(a.target).replace('.', '_')}"
                    gm.get_submodule(prefix).register_parameter(
                        target.rsplit(".", 1)[1], nn.Parameter(params[str(a.target)].detach().clone()))
                    env[a] = gm.graph.get_attr(target)
                for name in self.path:
                    n = nodes[name]
                    new = gm.graph.node_copy(n, lambda a: env.get(a, a))
                    if n.op == "call_module":
                        new.target = f"{prefix}.{str(n.target).replace('.', '_')}"
                        gm.add_submodule(new.target, fresh(gm.get_submodule(str(n.target))))
                    elif n.op == "get_attr" and str(n.target) in params:
                        new.target = f"{prefix}.{str(n.target).replace('.', '_')}"
                        p = params[str(n.target)]
                        gm.get_submodule(prefix).register_parameter(
                            new.target.rsplit(".", 1)[1], nn.Parameter(p.detach().clone()))
                    new.meta = dict(n.meta)
                    env[n] = new
            outs.append(env[final])
        output.args = ((final, *outs),)
        gm.recompile()
        return PassResult(gm, modified=True, counters={"exits": len(self.exits)})

    def _shared_params(self, nodes: dict[str, fx.Node], params: dict[str, nn.Parameter]) -> list[fx.Node]:
        """Parameters the head path reads through ``get_attr`` nodes outside it (``F.layer_norm(x, shape,
        weight, bias)`` in the exported dialect): without copies the exit would train the final head's."""
        path = {nodes[name] for name in self.path}
        seen: dict[fx.Node, None] = {}
        for n in (nodes[name] for name in self.path):
            for a in n.all_input_nodes:
                if a.op == "get_attr" and a not in path and str(a.target) in params:
                    seen[a] = None
        return list(seen)
