"""Materialize: every token selector becomes its packaging nodes; key masks and final tokens go (methods.md §3.5).

A selector that drops tokens becomes the plain ops of its gathered form — scores (one row of logits
per prefix query, or the learned scorer's linears, moved to ``token_scores.<stage>``), ``topk``,
``gather``, the package and ``cat`` — inlined into the graph: fixed token counts, a batch axis free to
vary, and no vitgraph module (``dynamic``: the kept tokens are gathered per image, batch 1). A
selector that keeps everything is removed; so is every key mask (the attention over the gathered
tokens needs none: it becomes the plain attention call again), and the final-tokens module unless a
mean-pooling head must not see the packages. With ``channels`` (width.embed narrowed the stream first), a
learned scorer reads each head's kept channels through its own LayerNorm and linear (``narrow``).

Invariant (tests/test_tokens.py): the gated graph in ``eval`` mode equals the result.
"""
from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from vitgraph.errors import PostconditionError, PreconditionError
from vitgraph.meta import TOKENS, submodule_name
from vitgraph.passes.base import PassResult, VitPass, drop_root, ensure_no_calls
from vitgraph.gates.tokens import FinalTokens, KeyMask, LearnedTokenSelector, TokenSelector

SCORES = "token_scores"


class PackTokensPass(VitPass):
    """After: no ``vg_tokens`` modules; ``kept[stage] = (candidates, K)`` (None: keep all) is inlined."""

    def __init__(self, kept: Mapping[str, tuple[int, int] | None], dynamic: bool = False,
                 channels: Sequence[int] | None = None) -> None:
        self.kept = {submodule_name(TOKENS, k): v for k, v in kept.items()}
        self.dynamic = dynamic
        # width.embed: the stream's kept channels (dense numbering), narrowed already (this pass runs after
        # the widths): the learned scorers read them head by head (``LearnedTokenSelector.narrow``)
        self.channels = sorted(int(c) for c in channels) if channels is not None else None

    def requires(self, gm: fx.GraphModule) -> None:
        # a selector an earlier pass deleted with its blocks (a cut at an exit before it) is left alone
        if self.kept and not hasattr(gm, TOKENS):
            raise PreconditionError(f"{self.name}: no token selectors ({TOKENS}) in the graph; run "
                                    f"InsertTokenSelectorsPass")

    def call(self, gm: fx.GraphModule) -> PassResult:
        counters = {"selectors_inlined": 0, "removed": 0}
        packages = sum(v is not None and (self.dynamic or v[1] < v[0]) for v in self.kept.values())
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not str(node.target).startswith(TOKENS + "."):
                continue
            module = gm.get_submodule(str(node.target))
            if isinstance(module, KeyMask):
                self._unmask(gm, node, module)
                counters["removed"] += 1
                continue
            kept = self.kept.get(str(node.target))
            if isinstance(module, TokenSelector):
                module.keep, module.candidates = (kept[1], kept[0]) if kept else (None, module.candidates)
                active = kept is not None and kept[1] < kept[0]
            elif isinstance(module, LearnedTokenSelector):
                active = kept is not None and (self.dynamic or kept[1] < kept[0])
                module.compact = (kept[0], kept[1], int(self.dynamic)) if active else None
                module.stream_gate = None  # (the gates are gone: a narrowed stream is read through ``narrow``)
                if active and self.channels is not None and len(self.channels) < module.embed[1].in_features * module.heads:
                    module.narrow(self.channels)
            else:  # the final tokens: drop the packages before a mean pool
                assert isinstance(module, FinalTokens)
                module.packages, module.record = (packages if module.pool_mean else None), False
                active = bool(module.packages)
            out = self._inline(gm, node, module, str(node.target)) if active else node.args[0]
            self._replace(gm, node, out, pair=isinstance(module, LearnedTokenSelector))
            counters["selectors_inlined" if active else "removed"] += 1
        drop_root(gm, TOKENS)
        return PassResult(gm, modified=sum(counters.values()) > 0, counters=counters)

    @staticmethod
    def _replace(gm: fx.GraphModule, node: fx.Node, out: fx.Node, pair: bool) -> None:
        """A selector's stream readers (through ``[0]`` for a learned one, whose call returns the pair (stream,
        keep flags)) read ``out``; readers of its keep flags (``[1]``: key masks, later selectors, the final
        tokens) read None. Any other selector returns a tensor: ``x[:, 1:]`` on it is a reader of the stream."""
        for user in list(node.users):
            if pair and user.op == "call_function" and user.target is operator.getitem \
                    and isinstance(user.args[1], int):
                if user.args[1] == 0:
                    user.replace_all_uses_with(out)
                for reader in list(user.users):
                    reader.args = tuple(None if a is user else a for a in reader.args)
                gm.graph.erase_node(user)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)

    @staticmethod
    def _unmask(gm: fx.GraphModule, node: fx.Node, module: KeyMask) -> None:
        if module.kind == "probs":
            node.replace_all_uses_with(node.args[0])
        else:
            with gm.graph.inserting_before(node):
                call = gm.graph.call_function(F.scaled_dot_product_attention, node.args[:3], dict(node.kwargs))
            call.meta.update(node.meta)
            node.replace_all_uses_with(call)
        gm.graph.erase_node(node)

    @staticmethod
    def _inline(gm: fx.GraphModule, node: fx.Node, module: nn.Module, target: str) -> fx.Node:
        """Copy the module's traced ops in place of its call; its own submodules move to ``token_scores``."""
        n_in = len(node.args)
        free = {"b": None} if isinstance(module, TokenSelector) and n_in == 2 else \
            {"alive": None} if isinstance(module, (LearnedTokenSelector, FinalTokens)) else None
        inner = fx.symbolic_trace(module, concrete_args=free)
        home = f"{SCORES}.{target[len(TOKENS) + 1:]}"
        for sub in inner.graph.nodes:
            if sub.op == "get_attr":
                raise PostconditionError(f"cannot inline {target}: it reads a tensor attribute ({sub.target})")
            if sub.op == "call_module":
                if not hasattr(gm, SCORES):
                    gm.add_module(SCORES, nn.Module())
                gm.add_submodule(f"{home}.{sub.target}", module.get_submodule(str(sub.target)))
                sub.target = f"{home}.{sub.target}"
        placeholders = [n for n in inner.graph.nodes if n.op == "placeholder"]
        # a concrete None argument stays a placeholder: map it to nothing, never copy it
        env = {ph: node.args[i] if i < n_in and ph.name not in (free or {}) else None
               for i, ph in enumerate(placeholders)}
        with gm.graph.inserting_before(node):
            return gm.graph.graph_copy(inner.graph, env)

    def ensures(self, gm: fx.GraphModule) -> None:
        super().ensures(gm)
        ensure_no_calls(gm, TOKENS, self.name, "token selector")

