"""The depth axis: UVC block gates (methods.md §4.1, §4.3-4.6), whole blocks or single branches.

Instrument: a ``BlockGate`` after every skippable block (``u x_out + (1 - u) x_in``) or, with
``depth.per_branch``, before every removable residual add (``x + u f(x)``) — ``InsertBlockGatesPass``.
Method: keep/skip logits per unit, sampled with ``gumbel2`` (tau 0.5, soft) while learning, hard
(keep iff the keep logit wins) in ``eval``; or, with ``train.steps: 0``, one-shot by ``influence``.
``freeze`` moves the learned decisions the least needed to make the budget reachable (``project``).
Materialize: skipped blocks and branches deleted (``RemoveSkippedBlocksPass``). Factors:
``block.<i>`` or ``branch.<i>.<kind>``, 1 kept, 0 skipped, the straight-through sample while learning.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from vitgraph.analysis.depth import branch_factor, depth_units
from vitgraph.axes.base import Axis, AxisContext, Factors, Pricer, Run
from vitgraph.axes.importance import influence
from vitgraph.errors import SpecError
from vitgraph.gates.units import BlockGate, gumbel2, ste_step
from vitgraph.meta import DepthUnit
from vitgraph.passes.insert_block_gates_pass import InsertBlockGatesPass
from vitgraph.passes.remove_skipped_blocks_pass import RemoveSkippedBlocksPass

if TYPE_CHECKING:
    from vitgraph.passes.base import VitPass


class DepthAxis(Axis):
    """Keep/skip logits per unit (init (-1, +1), methods.md §4.1) and their frozen decisions."""

    name = "depth"
    freeze_order = 20
    materialize_order = 20

    def __init__(self, ctx: AxisContext, units: Sequence[DepthUnit], not_skippable: dict[str, str]) -> None:
        super().__init__(ctx)
        spec = ctx.spec
        self.units = list(units)
        self.not_skippable = not_skippable   # block -> why it cannot be skipped
        self.tau = 0.5
        self.warmup = round(spec.depth.warmup * spec.train.search_steps)
        self.logits = nn.Parameter(torch.tensor([[-1.0, 1.0]] * len(self.units)))  # (skip, keep)
        self.register_buffer("frozen_keep", torch.ones(len(self.units), dtype=torch.bool))
        self.register_buffer("is_frozen", torch.zeros((), dtype=torch.bool))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.gates: dict[str, BlockGate] = {}
        self.u: Tensor | None = None          # keep value per unit the current forward's budget term prices
        self.projection: dict[str, Any] = {}
        # train.steps 0: no gates to learn; the units that change the residual stream least go first
        g = ctx.graph
        self.influence = influence(g.gm, self.units, [g.example_inputs]) if spec.train.steps == 0 else None

    @classmethod
    def from_spec(cls, ctx: AxisContext) -> DepthAxis | None:
        if not ctx.spec.depth.skip_blocks:
            return None
        units, reasons = depth_units(ctx.graph.structure.blocks, ctx.spec.depth.per_branch)
        if not units:
            why = "; ".join(f"{k}: {v}" for k, v in list(reasons.items())[:3])
            raise SpecError(f"depth.skip_blocks: no block of {ctx.graph.name} can be skipped ({why}); set it to false")
        return cls(ctx, units, reasons)

    def instrument_passes(self) -> list[VitPass]:
        return [InsertBlockGatesPass(self.units)]

    def setup(self, gm: fx.GraphModule) -> None:
        self.gates = {u.name: gm.get_submodule(u.gate) for u in self.units}

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
        self.u = None  # warm-up prices the hard decisions (keep all), not the fixed 0.5
        if mode == "train" and not hard and self.learns_budget():
            # (decision) methods.md §4.4 prices the soft sample. All gates then fall together and the
            # hard decisions overshoot (8 of 12 blocks skipped for a 0.7 budget on the run): the
            # soft cost reaches the budget while every margin is still near 0. Pricing the hard decisions,
            # with the gradient of the keep probability (straight-through), stops the fall as soon as the
            # blocks actually skipped meet the budget.
            self.u = ste_step(torch.sigmoid(self.logits[:, 1] - self.logits[:, 0]))
        for i, unit in enumerate(self.units):
            self.gates[unit.name].u = None if u is None else (bool(u[i] > 0.5) if hard else u[i])

    # -- training --------------------------------------------------------------------------------
    @property
    def one_shot(self) -> bool:
        return self.influence is not None

    @property
    def budget_form(self) -> str | None:
        return "augmented" if self.influence is None else None

    def learns_budget(self) -> bool:
        return self.influence is None and not bool(self.is_frozen) and int(self.steps) >= self.warmup

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"arch:blocks": [self.logits]}

    def optim_defaults(self, search_steps: int) -> dict[str, dict[str, Any]]:
        # (decision) methods.md steps the gates with SGD every 50 steps over ~75k steps; on runs of a few
        # hundred steps that is a handful of updates. AdamW without momentum (as WDPruning's thresholds)
        # moves a logit about lr per step whatever the loss scale: 8 / search steps lets a gate travel
        # from keep (+2) to a clear skip within the search.
        learn = max(1, search_steps - self.warmup)
        return {"arch:blocks": {"lr": max(0.01, 8.0 / learn), "weight_decay": 0.0, "schedule": "cosine",
                                "optimizer": "adamw", "beta1": 0.0}}

    def after_step(self, step: int, lr: float) -> None:
        self.steps += 1

    # -- freezing --------------------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return bool(self.is_frozen)

    @torch.no_grad()
    def freeze(self, pricer: Pricer, run: Run) -> None:
        """Fix the decisions (see ``project``): the learned ones, or the one-shot scores, moved the least
        needed for the axes frozen after this one to land on the budget."""
        if bool(self.is_frozen):
            return
        modes = {"full": "full", "floor": "floor", "learned": "eval"}

        def cost_at(keep: Tensor, widths: str) -> float:
            return float(pricer(modes[widths], {self.name: self.as_factors(keep.float())}))

        later = any(not a.frozen for a in pricer.axes if a is not self)  # they close the remaining gap
        margins = (self.margins() if self.influence is None else self.influence).clone()
        pinned = self.pinned(pricer.axes)
        margins[[i for i, u in enumerate(self.units) if u.block in pinned]] = float("inf")  # skipped last: never
        budget = self.spec.budget
        keep = project(margins, cost_at, budget.fraction, budget.slack, width=later, fill=self.influence is not None,
                       most=len(self.units) - sum(u.block in pinned for u in self.units))
        self.projection = {"learned": int((margins <= 0).sum()), "final": int((~keep).sum())}
        self.projection.update({"kept_for_other_axes": {self.graph.structure.blocks[b].name: why
                                                        for b, why in sorted(pinned.items())}} if pinned else {})
        self.frozen_keep.copy_(keep)
        self.is_frozen.fill_(True)

    def pinned(self, axes: Sequence[Axis]) -> dict[int, str]:
        """Blocks other axes read (a token selector's score source): never skipped."""
        return {b: why for a in axes if a is not self for b, why in a.needed_blocks().items()}

    # -- pricing ---------------------------------------------------------------------------------
    def as_factors(self, keep: Tensor) -> Factors:
        return {(f"block.{u.block}" if u.kind == "block" else branch_factor(u.block, u.kind)): keep[i]
                for i, u in enumerate(self.units)}

    def factors(self, mode: str) -> Factors:
        if mode == "train" and self.u is not None and not self.frozen:
            return self.as_factors(self.u)
        if mode in ("eval", "train") or self.frozen:
            return self.as_factors(self.hard())
        return self.as_factors(torch.zeros(len(self.units))) if mode == "floor" else {}

    def check_budget(self, pricer: Pricer) -> None:
        """Depth alone reaches only the sums of whole blocks (or branches): refuse a budget between them."""
        if any(not a.frozen for a in pricer.axes if a is not self):
            return
        spec = self.spec
        budget = spec.budget
        n = len(self.units)
        full = float(pricer("full", {self.name: self.as_factors(torch.ones(n))}))
        costs = [full - float(pricer("full", {self.name: self.as_factors(1.0 - torch.eye(n)[i])})) for i in range(n)]
        near = reachable_fractions(costs, full)
        if any(abs(f - budget.fraction) <= budget.slack for f in near):
            return
        below = max((f for f in near if f <= budget.fraction), default=min(near))
        above = min((f for f in near if f >= budget.fraction), default=max(near))
        hint = "" if spec.depth.per_branch else "set depth.per_branch: true (finer steps), "
        raise SpecError(f"{budget.key} {budget.fraction} is out of reach of depth alone for {self.graph.name}: skipping "
                        f"whole {'branches' if spec.depth.per_branch else 'blocks'} gives {below:.3f} or {above:.3f} "
                        f"of the dense {budget.metric}, not within +-{budget.slack}; {hint}enable width pruning (width.heads "
                        f"/ width.mlp) to close the gap, or set {budget.key} near one of those")

    # -- results ---------------------------------------------------------------------------------
    def decisions(self) -> dict[str, bool]:
        """Per unit (block or branch), whether ``eval`` mode keeps it."""
        keep = self.hard()
        return {u.name: bool(keep[i] > 0.5) for i, u in enumerate(self.units)}

    def skipped(self) -> list[DepthUnit]:
        kept = self.decisions()
        return [u for u in self.units if not kept[u.name]]

    def removed_blocks(self) -> set[int]:
        return {u.block for u in self.skipped() if u.kind == "block"}

    def materialize_passes(self) -> list[VitPass]:
        return [RemoveSkippedBlocksPass(self.decisions())]

    def status(self, pricer: Pricer) -> dict[str, float]:
        return {"blocks_kept": float(self.hard().sum())}

    def report(self) -> dict[str, Any]:
        return {"depth": {"skipped_branches": [u.name for u in self.skipped() if u.kind != "block"],
                          "not_skippable": self.not_skippable,
                          "gates": {u.name: bool(k) for u, k in zip(self.units, self.hard().tolist())},
                          "projection": dict(self.projection)}}


def project(margins: Tensor, cost_at: Callable[[Tensor, str], float], target: float, tolerance: float, *,
            width: bool, fill: bool, most: int | None = None) -> Tensor:
    """Keep decisions near the learned ones (skip iff margin <= 0) from which the budget is reachable.

    Units are skipped in ascending margin, so every candidate is a prefix of that order, and the
    learned decision skips ``k`` units. ``cost_at(keep, widths)`` prices keep decisions with the
    widths at ``"full"``, at their ``"floor"`` or as ``"learned"``. With a width method after this,
    a candidate must let the widths land on the target (full width at least the target minus the
    tolerance, the floor at most the target plus it); of those skipping at most ``k``, the one whose
    cost with the learned widths is nearest the target wins: the smallest move from what was learned
    that the width projection can finish. ``fill`` (one-shot depth) skips as many units as allow it.
    Depth alone lands within the tolerance, as near the learned ``k`` as possible, else as near the target.
    At most ``most`` units are skipped (the rest are needed by other axes).
    """
    n = margins.numel() if most is None else most   # candidates skip 0..n units
    order = torch.sort(margins, stable=True).indices

    def keep_prefix(k: int) -> Tensor:
        keep = torch.ones(margins.numel(), dtype=torch.bool)
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
