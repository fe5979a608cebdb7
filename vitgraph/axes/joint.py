"""Joint one-shot allocation: how the budget's reduction is split between an axis and the axes after it.

The token axis decides before the widths (``freeze_order`` 30 < 40). Left alone, its keep ratios
(bisected on the pricer) would take the whole budget and leave the widths nothing to do. When no
ratios are given (``tokens.keep`` empty) and every axis freezing after it is one-shot, the reduction
``R = P0 - B`` (``P0``: the cost before it decides, ``B``: the budget) is split by one criterion applied
to all of them:

1. candidate shares ``s`` in ``SHARES`` (0, 1/8, ..., 1): the first axis alone lands on ``P0 - s R``;
   the later axes then freeze as they always do, closing the rest of the gap to ``B``;
2. each candidate is scored by the distortion of the model's output on one batch (the calibration
   batch when the spec has one, else the graph's example inputs: data-free, deterministic):
   ``||f_s(x) - f(x)||^2 / ||f(x)||^2``, ``f`` the dense graph, ``f_s`` the gated graph in ``eval``
   mode. Every candidate removes the same FLOPs (it lands on ``B``), so the lowest distortion is
   the lowest loss per FLOP saved, whichever axis the FLOPs come from;
3. candidates whose cost misses ``B`` by more than half the tolerance rank after those that land;
   ties go to the smaller share (the grid's order). The later axes' decisions are undone after
   each trial (their ``state_dict``), so they freeze afresh on the winner.

The report's split (``report["budget"]["split"]``) is the realised one: the first axis's share is
``(P0 - P_first) / (P0 - P_final)`` (its own reduction, priced with the later axes keeping everything),
the later axes take the rest; both lie in [0, 1] and sum to 1.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vitgraph.axes.base import Axis, Pricer, Run

SHARES = tuple(i / 8 for i in range(9))


@dataclass(frozen=True)
class Trial:
    """One candidate split: the first axis's planned share, the priced cost, the output distortion."""

    share: float
    cost: float
    distortion: float


def distortion(out: Tensor, reference: Tensor) -> float:
    """Relative squared error of ``out`` against the dense output (0: unchanged)."""
    ref = reference.detach().float()
    return float((out.detach().float() - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-12))


def split(place: Callable[[float], None], later: Sequence[Axis], pricer: Pricer, run: Run,
          inputs: tuple[Tensor, ...], reference: Tensor, target: float, tolerance: float,
          shares: Sequence[float] = SHARES) -> tuple[float, list[Trial]]:
    """The share of the reduction ``place`` should give the first axis (see the module docstring), and every
    trial. ``place(share)`` sets the first axis's decisions; ``later`` freeze after it (one-shot) and are
    restored after each trial."""
    trials = []
    saved = [copy.deepcopy(a.state_dict()) for a in later]
    for share in shares:
        place(share)
        for axis in later:
            axis.freeze(pricer, run)
        with torch.no_grad():
            out = run(*inputs)[0]
        trials.append(Trial(share, float(pricer("eval")), distortion(out, reference)))
        for axis, state in zip(later, saved):
            axis.load_state_dict(state)
    best = min(trials, key=lambda t: (abs(t.cost - target) > tolerance / 2, t.distortion))
    return best.share, trials


def realised(before: float, first: float, final: float) -> float:
    """The first axis's share of the reduction actually taken: its own over the whole, in [0, 1]."""
    whole = before - final
    return 0.0 if whole <= 0 else min(1.0, max(0.0, (before - first) / whole))
