"""Depth: learned block gates (UVC, methods.md §4) and exit classifiers (WDPruning, methods.md §2).

* ``DepthUnit`` — one thing that can be skipped: a whole residual block (``x <- u Block(x) + (1 - u) x``)
  or, with ``depth.per_branch``, one residual branch (``x <- x + u f(x)``). Only blocks the analysis
  marks skippable qualify; ``depth_units`` says why the others do not.
* ``DepthGates`` — keep/skip logits per unit, sampled with ``gumbel2`` (tau 0.5, soft) while learning,
  hard (keep iff the keep logit wins) in ``eval``; ``freeze`` takes the hard decisions and moves them
  the least needed to make the budget reachable (``project``).
* Exits — ``exit_reasons`` says after which blocks a copy of the model's own head can be applied;
  ``choose_exit`` picks the shallowest exit whose validation top-1 is within the tolerance.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from vitgraph.analysis.blocks import ancestors, removable_residual
from vitgraph.gates import BlockGate, gumbel2, ste_step
from vitgraph.meta import Block, shape_of

BLOCK_GATES = "vg_blocks"  # the submodule holding every block gate
EXITS = "vg_exits"         # the submodule holding every exit classifier


@dataclass(frozen=True)
class DepthUnit:
    """A skippable block or branch: the stream nodes its gate sits between."""

    name: str                   # "blocks.3" (a whole block) or "blocks.3.attn" (one branch)
    block: int
    kind: str                   # "block" | "attn" | "mlp"
    start: str                  # block: the stream entering it; branch: the shortcut operand of its add
    end: str                    # block: the stream leaving it; branch: its residual add

    @property
    def gate(self) -> str:
        return f"{BLOCK_GATES}.{self.name.replace('.', '_')}"


def depth_units(blocks: Sequence[Block], per_branch: bool) -> tuple[list[DepthUnit], dict[str, str]]:
    """The units a spec's block gates apply to, and for each block left out the reason."""
    units, reasons = [], {}
    for b in blocks:
        if not b.skippable:
            reasons[b.name] = b.skip_reason or "not skippable"
            continue
        if not per_branch:
            units.append(DepthUnit(b.name, b.index, "block", b.input, b.output))
            continue
        for kind in ("attn", "mlp"):
            r = removable_residual(b, kind)
            if r is not None:
                units.append(DepthUnit(f"{b.name}.{kind}", b.index, kind, r.skip, r.add))
    return units, reasons


class DepthGates(nn.Module):
    """Keep/skip logits per unit (init (-1, +1), methods.md §4.1) and their frozen decisions.

    With ``own_budget`` (no learned width method carries the budget) the gates hold their own
    one-sided augmented Lagrangian on the expected FLOPs, as WDPruning's (methods.md §2.3).
    """

    def __init__(self, units: Sequence[DepthUnit], budget: float, *, tau: float = 0.5, warmup: int = 0,
                 own_budget: bool = False) -> None:
        super().__init__()
        self.units = list(units)
        self.budget = budget
        self.tau = tau
        self.warmup = warmup
        self.logits = nn.Parameter(torch.tensor([[-1.0, 1.0]] * len(self.units)))  # (skip, keep)
        self.lambdas = nn.Parameter(torch.zeros(2)) if own_budget else None
        self.register_buffer("frozen_keep", torch.ones(len(self.units), dtype=torch.bool))
        self.register_buffer("is_frozen", torch.zeros((), dtype=torch.bool))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.gates: dict[str, BlockGate] = {}
        self.u: Tensor | None = None          # keep value per unit that a forward's budget terms price
        self.cost_fn: Callable[[], Tensor] | None = None  # fraction of the dense FLOPs under ``u``
        self.projection: dict[str, Any] = {}

    # -- decisions ------------------------------------------------------------------------------
    def margins(self) -> Tensor:
        return (self.logits[:, 1] - self.logits[:, 0]).detach()

    def hard(self) -> Tensor:
        """Keep (1.0) or skip (0.0) per unit: the frozen decisions, or keep iff the keep logit wins."""
        keep = self.frozen_keep if bool(self.is_frozen) else self.margins() > 0
        return keep.float()

    def keep_values(self, mode: str) -> Tensor | None:
        if mode == "open":
            return None
        if mode == "eval" or bool(self.is_frozen):
            return self.hard()
        if int(self.steps) < self.warmup:  # warm-up: every gate at 0.5, nothing learns yet
            return torch.full((len(self.units),), 0.5)
        return gumbel2(self.logits, tau=self.tau, hard=False)[:, 1]

    def apply(self, mode: str) -> None:
        """Set every gate for one forward in ``mode``, and what the budget prices for it."""
        u = self.keep_values(mode)
        hard = mode == "eval" or bool(self.is_frozen)
        self.u = u if hard else None  # warm-up prices the hard decisions (keep all), not the fixed 0.5
        if mode == "train" and not hard and self.learning():
            # (decision) methods.md §4.4 prices the soft sample. All gates then fall together and the
            # hard decisions overshoot (8 of 12 blocks skipped for a 0.7 budget on the run): the
            # soft cost reaches the budget while every margin is still near 0. Pricing the hard decisions,
            # with the gradient of the keep probability (straight-through), stops the fall as soon as the
            # blocks actually skipped meet the budget.
            self.u = ste_step(torch.sigmoid(self.logits[:, 1] - self.logits[:, 0]))
        for i, unit in enumerate(self.units):
            gate = self.gates[unit.name]
            gate.u = None if u is None else (bool(u[i] > 0.5) if hard else u[i])

    def values(self) -> Tensor:
        """Keep value per unit for pricing: the current forward's (straight-through) decisions, else the hard ones."""
        return self.u if self.u is not None else self.hard()

    # -- what the training loop calls -------------------------------------------------------------
    def learning(self) -> bool:
        return not bool(self.is_frozen) and int(self.steps) >= self.warmup

    def penalties(self) -> dict[str, Tensor]:
        if self.lambdas is None or not self.learning() or self.cost_fn is None:
            return {}
        gap = torch.relu(self.cost_fn() - self.budget)
        return {"depth_lagrangian": self.lambdas[0] * gap + self.lambdas[1] * gap * gap}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {"arch:blocks": [self.logits]}
        if self.lambdas is not None:
            groups["dual:blocks"] = [self.lambdas]
        return groups

    def optim_defaults(self, search_steps: int) -> dict[str, dict[str, Any]]:
        # (decision) methods.md steps the gates with SGD every 50 steps over ~75k steps; on runs of a few
        # hundred steps that is a handful of updates. AdamW without momentum (as WDPruning's thresholds)
        # moves a logit about lr per step whatever the loss scale: 8 / search steps lets a gate travel
        # from keep (+2) to a clear skip within the search.
        learn = max(1, search_steps - self.warmup)
        return {"arch:blocks": {"lr": max(0.01, 8.0 / learn), "weight_decay": 0.0, "schedule": "cosine",
                                "optimizer": "adamw", "beta1": 0.0},
                "dual:blocks": {"lr": 10.0, "weight_decay": 0.0, "schedule": "cosine", "optimizer": "sgd"}}

    def after_step(self) -> None:
        self.steps += 1

    def status(self) -> dict[str, float]:
        return {"blocks_kept": float(self.hard().sum())}

    @torch.no_grad()
    def freeze(self, cost_at: Callable[[Tensor, str], float], tolerance: float, *, width: bool, fill: bool,
               margins: Tensor | None = None) -> None:
        """Fix the decisions (see ``project``). ``width``: a width method closes the gap to the budget
        after this; ``fill``: skip as many units as the budget allows (one-shot)."""
        if bool(self.is_frozen):
            return
        margins = self.margins() if margins is None else margins
        keep = project(margins, cost_at, self.budget, tolerance, width=width, fill=fill)
        self.projection = {"learned": int((margins <= 0).sum()), "final": int((~keep).sum())}
        self.frozen_keep.copy_(keep)
        self.is_frozen.fill_(True)

    def decisions(self) -> dict[str, bool]:
        keep = self.hard()
        return {u.name: bool(keep[i] > 0.5) for i, u in enumerate(self.units)}


def project(margins: Tensor, cost_at: Callable[[Tensor, str], float], target: float, tolerance: float, *,
            width: bool, fill: bool) -> Tensor:
    """Keep decisions near the learned ones (skip iff margin <= 0) from which the budget is reachable.

    Units are skipped in ascending margin, so every candidate is a prefix of that order, and the
    learned decision skips ``k`` units. ``cost_at(keep, widths)`` prices keep decisions with the
    widths at ``"full"``, at their ``"floor"`` or as ``"learned"``. With a width method after this,
    a candidate must let the widths land on the target (full width at least the target minus the
    tolerance, the floor at most the target plus it); of those skipping at most ``k``, the one whose
    cost with the learned widths is nearest the target wins: the smallest move from what was learned
    that the width projection can finish. ``fill`` (one-shot depth) skips as many units as allow it.
    Depth alone lands within the tolerance, as near the learned ``k`` as possible, else as near the target.
    """
    n = margins.numel()
    order = torch.sort(margins, stable=True).indices

    def keep_prefix(k: int) -> Tensor:
        keep = torch.ones(n, dtype=torch.bool)
        keep[order[:k]] = False
        return keep

    learned = int((margins <= 0).sum())
    full = [cost_at(keep_prefix(k), "full") for k in range(n + 1)]
    if width:
        floor = [cost_at(keep_prefix(k), "floor") for k in range(n + 1)]
        ok = [k for k in range(n + 1) if full[k] >= target - tolerance and floor[k] <= target + tolerance] or [0]
        if fill:
            above = [k for k in ok if full[k] >= target - 1e-9]
            return keep_prefix(max(above or ok))
        pool = [k for k in ok if k <= learned] or [min(ok)]
        return keep_prefix(min(pool, key=lambda k: (abs(cost_at(keep_prefix(k), "learned") - target), -k)))
    within = [k for k in range(n + 1) if abs(full[k] - target) <= tolerance]
    if within:
        k = min(within, key=lambda j: (abs(j - learned), j)) if not fill else min(within)
    else:
        k = min(range(n + 1), key=lambda j: abs(full[j] - target))
    return keep_prefix(k)


def reachable_fractions(costs: Sequence[float], base: float, step: float = 1e-3) -> list[float]:
    """Every cost ``base - sum(subset of costs)`` (rounded to ``step``): what depth alone can reach."""
    sums = {0}
    for c in costs:
        q = int(round(c / step))
        sums |= {s + q for s in sums}
    return sorted(base - s * step for s in sums)


@torch.no_grad()
def influence(gm: fx.GraphModule, units: Sequence[DepthUnit], inputs: Sequence[tuple[Tensor, ...]]) -> Tensor:
    """How much each unit changes the residual stream: 1 - cos(stream in, stream out), per token, averaged.

    The one-shot score for ``train.steps: 0`` (no gates to learn): the units that change the
    stream least are skipped first.
    """
    wanted = {u.start for u in units} | {u.end for u in units}
    seen: dict[str, list[Tensor]] = {name: [] for name in wanted}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n.name in wanted:
                seen[n.name].append(out.detach().float())
            return out

    was_training = gm.training
    gm.eval()
    try:
        for x in inputs:
            Recorder(gm).run(*x)
    finally:
        gm.train(was_training)
    scores = []
    for u in units:
        values = []
        for a, b in zip(seen[u.start], seen[u.end]):
            a = a.reshape(b.shape)
            values.append(1.0 - nn.functional.cosine_similarity(a, b, dim=-1).mean())
        scores.append(torch.stack(values).mean())
    return torch.stack(scores)


# -- exits --------------------------------------------------------------------------------------
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


def truncated_nodes(gm: fx.GraphModule, blocks: Sequence[Block], exit_after: int, path: Sequence[str]) -> set[str]:
    """Nodes of the dense graph that cutting the model after block ``exit_after`` (1-based) removes:
    everything after that block's output except the head, which the exit's copy replaces."""
    nodes = {n.name: n for n in gm.graph.nodes}
    start = nodes[blocks[exit_after - 1].output]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    keep = set(path)
    return {n.name for n in gm.graph.nodes if order[n] > order[start] and n.op not in ("output", "placeholder")
            and n.name not in keep and shape_of(n) is not None}


def choose_exit(exits: Sequence[int], top1: Sequence[float], final: float, tolerance: float,
                reachable: Callable[[int], bool]) -> int | None:
    """The shallowest exit (1-based block) within ``tolerance`` of the final head's top-1 from which
    the budget can still be reached; None keeps the final head."""
    for e, acc in sorted(zip(exits, top1)):
        if acc >= final - tolerance and reachable(e):
            return e
    return None

