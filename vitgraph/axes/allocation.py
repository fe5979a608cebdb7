"""How many units each width group keeps: sites as the methods see them, and the projection onto the budget.

``allocate`` scales every group's kept fraction by one factor (bisected on the cost model, then
rounded to each site's steps) until the FLOPs land on the target; ``allocate_global`` first ranks
normalised importance across the layers per group kind, then hands its shape to ``allocate``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from vitgraph.gates.units import topk_hard, topk_mask

CostFn = Callable[[Mapping[str, Any]], Any]  # kept fraction per group -> fraction of the dense FLOPs


@dataclass(frozen=True)
class Site:
    """One gated group as the methods see it."""

    name: str
    kind: str                 # "heads" | "head_dim" | "mlp"
    units: int
    align: int                # kept counts are multiples of this (1 for heads)
    min_units: int            # 0 when the branch can be removed, else 1
    consumer: str             # the consumer weight (proj / fc2) whose columns rank units
    channel_unit: Tensor      # consumer input channel -> unit (-1: none)
    weights: tuple[tuple[str, int, tuple[tuple[int, ...], ...]], ...]  # (param, axis, indices per unit)
    segments: int = 1         # value dims: one segment per head, every head keeping as many units

    def top(self, scores: Tensor, k: int | Tensor) -> Tensor:
        """Mask of the ``k`` best units (``k`` a tensor: the straight-through ``topk_mask``); with segments,
        the ``k / segments`` best of every segment."""
        soft = isinstance(k, Tensor) and k.requires_grad
        if self.segments == 1:
            return topk_mask(scores, k) if soft else topk_hard(scores, int(k))
        per = k / self.segments
        rows = scores.reshape(self.segments, -1)
        return torch.cat([topk_mask(r, per) if soft else topk_hard(r, round(float(per))) for r in rows])

    def round(self, fraction: float) -> int:
        """Kept units for a kept fraction: aligned, at least ``min_units``, at most all."""
        if fraction >= 1.0:
            return self.units
        a = self.align if self.units >= self.align else 1
        k = int(math.floor(fraction * self.units / a + 0.5)) * a
        return max(self.min_units, min(self.units, k))


# -- budget projection --------------------------------------------------------------------------
def allocate(sites: Sequence[Site], fractions: Mapping[str, float], target: float, cost: CostFn,
             tolerance: float = 0.01) -> dict[str, int]:
    """Kept counts whose cost lands on ``target``, shaped like ``fractions``.

    1. The continuous solution: one scale on every fraction, unrounded, with cost == target.
    2. Coarse groups (heads) take their rounded count there: 1.5 of 3 heads becomes 2 heads, rather
       than whichever count happens to hit the budget.
    3. A second scale on the fine groups (MLP units, rounded to ``align``) closes the gap.
    If the fine groups cannot close it within ``tolerance``, every group is rounded together and the
    fine ones refined after, landing as near as the granularity allows.
    """
    def scaled(scale: float, names: set[str], base: Mapping[str, float], rounded: bool) -> dict[str, float]:
        out = dict(base)
        for s in sites:
            if s.name in names:
                x = min(1.0, fractions[s.name] * scale)
                out[s.name] = s.round(x) if rounded else x * s.units
        return out

    def fraction_of(c: Mapping[str, float]) -> float:
        return float(cost({s.name: c[s.name] / s.units for s in sites}))

    def bisect(names: set[str], base: Mapping[str, float], rounded: bool) -> tuple[float, dict[str, float]]:
        lo, hi = 0.0, 1.0 / max(1e-6, min(fractions[n] for n in names))
        best = (hi, scaled(hi, names, base, rounded))
        for _ in range(40):
            mid = (lo + hi) / 2
            c = scaled(mid, names, base, rounded)
            if abs(fraction_of(c) - target) < abs(fraction_of(best[1]) - target):
                best = (mid, c)
            lo, hi = (mid, hi) if fraction_of(c) < target else (lo, mid)
        return best

    if not sites:
        return {}
    everything = {s.name for s in sites}
    fine = {s.name for s in sites if s.kind != "heads"}  # MLP units, value dims
    if fine and fine != everything:
        scale, _ = bisect(everything, {}, rounded=False)
        coarse = scaled(scale, everything - fine, {}, rounded=True)
        _, kept = bisect(fine, coarse, rounded=True)
        if abs(fraction_of(kept) - target) <= tolerance:
            return {k: int(v) for k, v in kept.items()}
    _, kept = bisect(everything, {}, rounded=True)
    if fine and fine != everything:
        fractions = {**fractions, **{s.name: max(kept[s.name], 1) / s.units for s in sites if s.name in fine}}
        _, kept = bisect(fine, kept, rounded=True)
        # identical coarse groups round together (3 blocks x 1 of 2 heads jump as one): step them one at a
        # time, the fine groups re-bisected after each step, while that brings the cost nearer the target
        while abs(fraction_of(kept) - target) > tolerance:
            up = fraction_of(kept) < target
            steps = [{**kept, s.name: kept[s.name] + (1 if up else -1)} for s in sites if s.name not in fine
                     and (kept[s.name] < s.units if up else kept[s.name] > max(1, s.min_units))]
            trials = [bisect(fine, step, rounded=True)[1] for step in steps]
            best = min(trials, key=lambda c: abs(fraction_of(c) - target), default=None)
            if best is None or abs(fraction_of(best) - target) >= abs(fraction_of(kept) - target):
                break
            kept = best
    return {k: int(v) for k, v in kept.items()}


def normalised(importance: Tensor) -> Tensor:
    """One group's scores divided by the group's mean score (all zeros stay zeros).

    (decision) The mean, not the L2 norm: 1 means "as important as this layer's average unit" whatever
    the group's size (4 heads or 1536 units); and as any statistic that scales with the scores, it makes
    the ranking blind to a layer's overall scale, so layers with larger weights (or gradients) do not
    win everything: what counts is how a unit stands against the rest of its own layer.
    """
    scores = importance.detach().float().clamp_min(0.0)
    mean = float(scores.mean()) if scores.numel() else 0.0
    return scores / mean if mean > 0.0 else torch.zeros_like(scores)


def _top_counts(sites: Sequence[Site], ranked: Mapping[str, tuple[Tensor, Tensor]], q: float) -> dict[str, int]:
    """Per group, its units among the top ``q`` of its kind's pooled ranking (each kind keeps one at least)."""
    counts = torch.zeros(len(sites), dtype=torch.long)
    for order, owner in ranked.values():
        n = max(1, min(len(order), int(math.floor(q * len(order) + 0.5))))
        counts += torch.bincount(owner[order[:n]], minlength=len(sites))
    return {s.name: int(c) for s, c in zip(sites, counts)}


def allocate_global(sites: Sequence[Site], importance: Mapping[str, Tensor], target: float, cost: CostFn,
                    tolerance: float = 0.01) -> dict[str, int]:
    """Kept counts from one ranking per group kind across every layer, landing on ``target``.

    1. Each group's scores are ``normalised`` (divided by the group's mean).
    2. Per kind, the units of all its groups are pooled and sorted by normalised score: heads compete
       with heads, MLP units with MLP units. The kinds share one keep quantile ``q`` (each keeps its
       top ``q`` of units: a threshold per kind), so the heads / MLP split stays the uniform one and
       only the spread across layers changes.
    3. ``q`` is bisected until the ``cost`` of those per-group fractions is nearest ``target``.
    4. ``allocate`` takes the fractions as its shape: it rescales them, rounds them to each Site's
       alignment and ``min_units``, and lands on the budget as it does for ``uniform``.
    A group whose ``min_units`` is 0 may keep nothing (its residual branch is deleted); where every
    group of a kind may, the one holding the kind's best unit keeps one aligned step at least.
    """
    if not sites:
        return {}
    ranked: dict[str, tuple[Tensor, Tensor]] = {}
    for kind in dict.fromkeys(s.kind for s in sites):
        idx = [i for i, s in enumerate(sites) if s.kind == kind]
        scores = torch.cat([normalised(importance[sites[i].name]) for i in idx])
        owner = torch.cat([torch.full((sites[i].units,), i) for i in idx])
        ranked[kind] = (torch.sort(scores, descending=True, stable=True).indices, owner)

    def fractions(q: float) -> dict[str, float]:
        counts = _top_counts(sites, ranked, q)
        return {s.name: counts[s.name] / s.units for s in sites}

    lo, hi = 0.0, 1.0
    for _ in range(40):  # the cost grows with q
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(cost(fractions(mid))) < target else (lo, mid)
    shape = min((fractions(lo), fractions(hi)), key=lambda f: abs(float(cost(f)) - target))
    guarded = list(sites)
    for order, owner in ranked.values():
        best = sites[int(owner[order[0]])]
        if all(sites[i].min_units == 0 for i in set(owner.tolist())):
            step = best.align if best.units >= best.align else 1
            guarded[int(owner[order[0]])] = replace(best, min_units=min(best.units, step))
    return allocate(guarded, shape, target, cost, tolerance)
