"""Instrument: exit classifiers after chosen blocks (WDPruning, methods.md §2.1).

Each exit is a copy of the model's own head path (final norm, pooling, classifier) applied to the
output of block ``e``, with fresh parameters: linears trunc-normal (std 0.02) with zero bias, norms
reset; other modules in the path (an attention pool) start from the model's weights. The graph then
returns a tuple ``(final, exit_e1, exit_e2, ...)``; ``GatedModel`` hands the loop the first as the
logits and the rest as auxiliary outputs.

The head path is read from the graph this pass is handed, after the axes instrumented before it: a
gate another axis put on the head (the stream's channel gate, ``width.embed``, which stands for the
final norm and masks the classifier's input) is called by the exit too, so the exit narrows with the
stream. Each exit module records which of the model's names each copy stands for (``origin``), for
``TruncateAtExitPass`` to hand them over when the model is cut there.

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

from vitgraph.analysis.depth import head_path
from vitgraph.errors import PreconditionError
from vitgraph.meta import BLOCK_GATES, CONV_GATES, EXITS, GATES, TOKENS, Block
from vitgraph.passes.base import PassResult, VitPass, require_nodes

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)
_GATE_ROOTS = (GATES, BLOCK_GATES, TOKENS, CONV_GATES)  # other axes' gates: an exit calls them, never copies them


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


def _own_param(gm: fx.GraphModule, prefix: str, p: nn.Parameter, target: str) -> str:
    """A copy of parameter ``target`` held by the exit at ``prefix`` (which records what it copies); its name."""
    root, local = gm.get_submodule(prefix), target.replace(".", "_")
    root.register_parameter(local, nn.Parameter(p.detach().clone()))
    root.origin[local] = target
    return f"{prefix}.{local}"


class InsertExitsPass(VitPass):
    """After: the graph returns ``(final, *exits)``; exit e reads block e's output through its own head."""

    def __init__(self, exits: Sequence[int], blocks: Sequence[Block]) -> None:
        self.exits = list(exits)
        self.blocks = list(blocks)
        self.path: list[str] = []

    def requires(self, gm: fx.GraphModule) -> None:
        if hasattr(gm, EXITS):
            raise PreconditionError(f"{self.name}: the graph already has exits ({EXITS})")
        require_nodes(gm, [self.blocks[-1].output, *(self.blocks[e - 1].output for e in self.exits)], self.name,
                      "block output")
        path, why = head_path(gm, self.blocks)
        if why is not None or not path:
            raise PreconditionError(f"{self.name}: no head path to copy ({why or 'the last block is the output'})")
        self.path = list(path)

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
            root = gm.get_submodule(prefix)
            root.origin = {}  # the copy's name in this module -> the model's name it copies
            env = {last: nodes[self.blocks[e - 1].output]}
            with gm.graph.inserting_before(output):
                for a in self._shared_params(nodes, params):  # a functional norm's weight: the exit's own copy
                    env[a] = gm.graph.get_attr(_own_param(gm, prefix, params[str(a.target)], str(a.target)))
                for name in self.path:
                    n = nodes[name]
                    new = gm.graph.node_copy(n, lambda a, env=env: env.get(a, a))
                    if n.op == "call_module" and str(n.target).split(".")[0] not in _GATE_ROOTS:
                        local = str(n.target).replace(".", "_")
                        root.add_module(local, fresh(gm.get_submodule(str(n.target))))
                        root.origin[local] = str(n.target)
                        new.target = f"{prefix}.{local}"
                    elif n.op == "get_attr" and str(n.target) in params:
                        new.target = _own_param(gm, prefix, params[str(n.target)], str(n.target))
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
