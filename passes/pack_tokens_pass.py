"""Materialize: replace every token selector by its packaging nodes (methods.md §3.5, static mode).

A selector with a fixed ``keep`` becomes the plain ops it runs — the score (one row of logits per
prefix query, or the probabilities already there), ``topk``, ``gather``, the score-weighted package
and ``cat`` — inlined into the graph, so the compact graph has fixed token counts, a batch axis free
to vary, and no vitgraph module. A selector left open (keep all) is removed; so is the package drop
before a mean pool when nothing was packed.

Invariant (tests/test_tokens.py): the gated graph in ``eval`` mode equals the result.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch.fx as fx

from vitgraph.errors import PostconditionError, PreconditionError
from vitgraph.gates import TokenSelector
from vitgraph.meta import TOKENS, submodule_name
from vitgraph.passes.base import PassResult, VitPass


class PackTokensPass(VitPass):
    """After: no ``vg_tokens`` modules; a selector of ``kept[stage]`` tokens is its ops, inlined."""

    def __init__(self, kept: Mapping[str, int | None]) -> None:
        self.kept = {submodule_name(TOKENS, k): v for k, v in kept.items()}  # stage -> K (None: keep all)

    def requires(self, gm: fx.GraphModule) -> None:
        have = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        missing = [k for k in self.kept if k not in have]
        if missing:
            raise PreconditionError(f"{self.name}: no selector {missing[0]} in the graph; run InsertTokenSelectorsPass")

    def call(self, gm: fx.GraphModule) -> PassResult:
        counters = {"selectors_inlined": 0, "removed": 0}
        packing = sum(k is not None for k in self.kept.values())
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not str(node.target).startswith(TOKENS + "."):
                continue
            module = gm.get_submodule(str(node.target))
            if isinstance(module, TokenSelector):
                module.keep = self.kept.get(str(node.target))
                active = module.keep is not None
            else:  # the package drop before a mean pool
                module.count = packing or None
                active = bool(packing)
            if not active:
                node.replace_all_uses_with(node.args[0])
                counters["removed"] += 1
            else:
                free = {"b": None} if len(node.args) == 2 and isinstance(module, TokenSelector) else None  # (x, probs)
                inner = fx.symbolic_trace(module, concrete_args=free)
                placeholders = [n for n in inner.graph.nodes if n.op == "placeholder"]
                # the concrete None of a (x, probs) call stays a placeholder: map it to nothing, never copy it
                env = {ph: node.args[i] if i < len(node.args) else None for i, ph in enumerate(placeholders)}
                with gm.graph.inserting_before(node):
                    out = gm.graph.graph_copy(inner.graph, env)
                node.replace_all_uses_with(out)
                counters["selectors_inlined"] += 1
            gm.graph.erase_node(node)
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        if hasattr(gm, TOKENS):
            delattr(gm, TOKENS)
        gm.recompile()
        return PassResult(gm, modified=sum(counters.values()) > 0, counters=counters)

    def ensures(self, gm: fx.GraphModule) -> None:
        super().ensures(gm)
        if any(n.op == "call_module" and str(n.target).startswith(TOKENS) for n in gm.graph.nodes):
            raise PostconditionError(f"{self.name}: token selector calls are left in the compact graph")
