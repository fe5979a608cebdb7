"""SPViT's learned token selection (methods.md §3.3-3.4): the keep-ratio loss, token distillation, schedule.

The selectors themselves (``vitgraph.gates.tokens.LearnedTokenSelector``) sit in the graph; this
method owns what learning them needs:

* the targets rho_s (kept fraction of the patches after stage s), from ``tokens.keep`` or the budget;
  none when the budget is shared with a learned width (``tokens.keep`` empty): the selectors then learn
  under the width method's Lagrangian alone, which prices their ``expected`` keep fractions (the mean
  Gumbel decisions, straight-through), and ``learned()`` (their running mean) is what the freeze starts
  from (``on_budget``);
* the keep-ratio loss ``(2 / |Q|) sum_s (mean over batch of D_s - rho_s)^2``, D_s counted against
  the original patch count, while the selectors learn;
* token distillation: the MSE between the student's final kept patch tokens and the teacher's tokens
  at the same positions (teacher = the dense traced model, run here on the same images; the loop's
  own distillation covers the logits), weighted 0.5, over the stream's kept channels when width.embed
  gates them (a pruned channel is read by no one);
* the ``arch`` group: every selector parameter.

``refuse_combinations``: what cannot combine with token pruning (either method), each with its reason.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from vitgraph.axes.base import AxisContext, Learner
from vitgraph.analysis.graph import VitGraph
from vitgraph.errors import SpecError
from vitgraph.gates.tokens import FinalTokens, LearnedTokenSelector

RATIO_WEIGHT = 2.0
TOKEN_DISTILL_WEIGHT = 0.5
MOMENTUM = 0.9  # (decision) the running mean of the learned keep fractions forgets over ~10 steps


class SPViT(Learner):
    """Learns the selectors of one token axis; ``see(inputs)`` before a forward, ``losses`` after it."""

    def __init__(self, graph: VitGraph, selectors: Sequence[LearnedTokenSelector], final: FinalTokens | None,
                 patches: int, prefix: int) -> None:
        super().__init__()
        self.selectors = list(selectors)   # modules of the graph (not registered twice)
        self._final = (final,)             # a tuple keeps it out of this module's children
        self.patches, self.prefix = patches, prefix
        self.register_buffer("rho", torch.full((len(self.selectors),), -1.0))
        self.register_buffer("seen", torch.full((len(self.selectors),), -1.0))  # running mean keep; -1: none yet
        self.expected: list[Tensor] | None = None  # the last learning forward's keep fractions (differentiable)
        self._teacher = (_trunk(graph, final is not None),)
        self._inputs: tuple[Any, ...] = ()
        self.stream_gate: tuple[nn.Module, ...] = ()  # width.embed: (the stream's unit gate,); its mask weighs the MSE

    def targets(self) -> list[float] | None:
        return None if bool((self.rho < 0).any()) else [float(r) for r in self.rho.tolist()]

    def set_targets(self, rho: Sequence[float]) -> None:
        self.rho.copy_(torch.tensor([float(r) for r in rho]))

    def learned(self) -> list[float] | None:
        """The running mean of the kept fraction after each stage while learning (None before any step)."""
        return None if bool((self.seen < 0).any()) else [float(r) for r in self.seen.tolist()]

    def see(self, args: tuple[Any, ...]) -> None:
        self._inputs = args

    def losses(self, learning: bool) -> dict[str, Tensor]:
        """The keep-ratio loss (while ``learning``) and token distillation of the last forward."""
        out: dict[str, Tensor] = {}
        kept = [s.last for s in self.selectors if s.last is not None]
        if learning and len(kept) == len(self.selectors):
            means = [(d.sum(1) / self.patches).mean() for d in kept]
            self.expected = means
            now = torch.stack([m.detach() for m in means]).to(self.seen)
            self.seen.copy_(torch.where(self.seen < 0, now, MOMENTUM * self.seen + (1 - MOMENTUM) * now))
            if self.targets() is not None:
                terms = [m - r for m, r in zip(means, self.rho.to(kept[0].device))]
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


def refuse_combinations(ctx: AxisContext) -> None:
    """What cannot combine with token pruning, each with the reason in the model's terms."""
    t, spec = ctx.spec.tokens, ctx.spec
    width_on = spec.width.enabled
    refusals = (
        (t.mode == "dynamic" and t.method == "attention",
         "tokens.mode dynamic with tokens.method attention: the one-shot scores keep a fixed top-K per stage, so "
         "every image keeps the same count; set tokens.mode static (or use tokens.method spvit for per-image counts)"),
        (t.method == "spvit" and bool(spec.depth.exits),
         "tokens.method spvit with depth.exits: the learned selectors keep dropped tokens flowing (masked as keys), "
         "and an exit pooling the stream would average them in where the compact graph has gathered them out; "
         "use tokens.method attention with exits (an exit pools the tokens left, packages included)"),
        (t.method == "spvit" and spec.width.embed and spec.width.head_dim and width_on,
         "tokens.method spvit with width.embed and width.head_dim: the learned scorers read the narrowed stream, so "
         "their selectors are packed after the widths are sliced, and until then the key masks they put in every "
         "later attention stand in for the attention core that value-dim pruning rewrites; drop width.head_dim or "
         "width.embed, or use tokens.method attention"),
    )
    for asked, why in refusals:
        if asked:
            raise SpecError(f"{ctx.graph.name}: {why}")


def on_budget(rho: Sequence[float], cost: Callable[[list[float], str], float], target: float) -> list[float]:
    """The learned keep ratios ``rho``, moved the least along a line so that the axes deciding after the tokens
    can land on ``target``: toward keeping every token when the tokens alone already cut below it (``cost(r,
    "full")``: the later axes keep everything), toward one token per stage when the later axes cannot reach it
    even at their floor (``cost(r, "floor")``); else unchanged (the later axes close the gap)."""
    for mode, end, wrong in (("full", 1.0, lambda c: c < target), ("floor", 0.0, lambda c: c > target)):
        if wrong(cost(list(rho), mode)):
            lo, hi = 0.0, 1.0
            for _ in range(30):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if wrong(cost([r + mid * (end - r) for r in rho], mode)) else (lo, mid)
            return [r + hi * (end - r) for r in rho]
    return list(rho)


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
