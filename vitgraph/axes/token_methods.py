"""SPViT's learned token selection (methods.md §3.3-3.4): the keep-ratio loss, token distillation, schedule.

The selectors themselves (``vitgraph.gates.tokens.LearnedTokenSelector``) sit in the graph; this
method owns what learning them needs:

* the targets rho_s (kept fraction of the patches after stage s), from ``tokens.keep`` or the budget;
* the keep-ratio loss ``(2 / |Q|) sum_s (mean over batch of D_s - rho_s)^2``, D_s counted against
  the original patch count, while the selectors learn;
* token distillation: the MSE between the student's final kept patch tokens and the teacher's tokens
  at the same positions (teacher = the dense traced model, run here on the same images; the loop's
  own distillation covers the logits), weighted 0.5, over the stream's kept channels when width.embed
  gates them (a pruned channel is read by no one);
* the ``arch`` group: every selector parameter.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from vitgraph.axes.base import Learner
from vitgraph.analysis.graph import VitGraph
from vitgraph.gates.tokens import FinalTokens, LearnedTokenSelector

RATIO_WEIGHT = 2.0
TOKEN_DISTILL_WEIGHT = 0.5


class SPViT(Learner):
    """Learns the selectors of one token axis; ``see(inputs)`` before a forward, ``losses`` after it."""

    def __init__(self, graph: VitGraph, selectors: Sequence[LearnedTokenSelector], final: FinalTokens | None,
                 patches: int, prefix: int) -> None:
        super().__init__()
        self.selectors = list(selectors)   # modules of the graph (not registered twice)
        self._final = (final,)             # a tuple keeps it out of this module's children
        self.patches, self.prefix = patches, prefix
        self.register_buffer("rho", torch.full((len(self.selectors),), -1.0))
        self._teacher = (_trunk(graph, final is not None),)
        self._inputs: tuple[Any, ...] = ()
        self.stream_gate: tuple[nn.Module, ...] = ()  # width.embed: (the stream's unit gate,); its mask weighs the MSE

    def targets(self) -> list[float] | None:
        return None if bool((self.rho < 0).any()) else [float(r) for r in self.rho.tolist()]

    def set_targets(self, rho: Sequence[float]) -> None:
        self.rho.copy_(torch.tensor([float(r) for r in rho]))

    def see(self, args: tuple[Any, ...]) -> None:
        self._inputs = args

    def losses(self, learning: bool) -> dict[str, Tensor]:
        """The keep-ratio loss (while ``learning``) and token distillation of the last forward."""
        out: dict[str, Tensor] = {}
        kept = [s.last for s in self.selectors if s.last is not None]
        if learning and len(kept) == len(self.selectors) and self.targets() is not None:
            terms = [(d.sum(1) / self.patches).mean() - r for d, r in zip(kept, self.rho.to(kept[0].device))]
            out["tokens.ratio"] = RATIO_WEIGHT / len(terms) * sum(t * t for t in terms)
        for s in self.selectors:
            s.last = None
        distill = self._distill()
        if distill is not None:
            out["tokens.distill"] = TOKEN_DISTILL_WEIGHT * distill
        return out

    def _distill(self) -> Tensor | None:
        """MSE between the final kept patch tokens and the teacher's tokens at the same positions."""
        final, teacher = self._final[0], self._teacher[0]
        if final is None or final.last is None or teacher is None or not self._inputs:
            return None
        x, alive = final.last
        final.last, inputs, self._inputs = None, self._inputs, ()
        with torch.no_grad():
            t = teacher.to(x.device)(*inputs)
        p, s = self.prefix, self.patches
        d = alive[:, p:p + s, None] if alive is not None else x.new_ones(x.shape[0], s, 1)
        err = (x[:, p:p + s] - t[:, p:p + s].to(x.dtype)) ** 2 * d
        mask = self.stream_gate[0].mask if self.stream_gate else None
        if mask is not None:  # a pruned stream channel is read by no one: it is not distilled either
            c = mask.detach().to(x.dtype)
            return (err * c).sum() / (d.sum() * c.sum()).clamp_min(1.0)
        return err.sum() / (d.sum() * x.shape[-1]).clamp_min(1.0)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"arch": [p for s in self.selectors for p in s.parameters()]}

    def optim_defaults(self, search_steps: int) -> dict[str, dict[str, Any]]:
        # methods.md §3.4: AdamW, wd 0.05, cosine; (decision) lr 1e-3 rather than 5e-4 x batch/512, for
        # searches of hundreds of steps instead of 30 epochs
        return {"arch": {"lr": 1e-3, "weight_decay": 0.05, "schedule": "cosine", "optimizer": "adamw"}}


def _trunk(graph: VitGraph, wanted: bool) -> fx.GraphModule | None:
    """The dense graph up to the last block's output (the teacher's tokens), frozen."""
    if not wanted:
        return None
    gm = copy.deepcopy(graph.gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (nodes[graph.structure.blocks[-1].output],)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.eval()
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm
