"""Interleaved timing: the one way vitgraph times runners against each other (``bench``, INT8 plans, profiles).

Invariant: runners are timed round-robin (every round calls each runner once, the starting runner
rotating between rounds), so a drift in machine load lands on all of them alike; results are
medians with the interquartile range, never means.

A drift does not land on all runtimes alike, though: on the 2-core machine this was written on, bursts
of a few seconds slow dense fp32 ONNX Runtime by ~25 % and its INT8 model by ~65 %, so a ratio
measured inside one is off by a third. With ``steady=NAME`` a round counts only when that runner (the
reference) ran within ``slack`` of its fastest round; timing goes on until ``repeats`` such rounds
(or ``STEADY_CAP * repeats`` rounds in all, then the ``repeats`` rounds with the fastest reference count).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitgraph.targets._common import LoweringError

__all__ = ["Timing", "measure"]

STEADY_CAP = 4  # with ``steady``, rounds timed at most per round asked for


@dataclass(frozen=True)
class Timing:
    """Wall-clock time of one runner over ``n`` timed calls, in milliseconds."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    n: int

    @property
    def iqr_ms(self) -> float:
        return self.p75_ms - self.p25_ms

    def __str__(self) -> str:
        return f"{self.median_ms:.3f} ms (IQR {self.p25_ms:.3f}-{self.p75_ms:.3f}, n={self.n})"


def measure(runners: dict[str, Callable[[], Any]], *, warmup: int = 3, repeats: int = 20,
            min_time: float | None = None, max_time: float | None = None, steady: str | None = None,
            slack: float = 0.1) -> dict[str, Timing]:
    """Time zero-argument ``runners`` interleaved; ``repeats`` rounds at least, and at least
    ``min_time`` seconds in all when given. Warm-up rounds (also interleaved) are not timed.

    ``steady`` names the runner whose round times decide which rounds count (see the module's note).

    ``max_time`` bounds a slow model (a 1024-px encoder takes seconds a run): once a round has been
    timed three times and ``max_time`` seconds have passed, timing stops; a round that alone takes a
    tenth of ``max_time`` ends the warm-up and is timed itself (first-call costs are milliseconds
    against seconds, and the median of three ignores one slow run)."""
    if not runners:
        raise LoweringError("bench: measure() needs at least one runner.")
    if repeats < 1 or warmup < 0:
        raise LoweringError(f"bench: need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    if steady is not None and steady not in runners:
        raise LoweringError(f"bench: steady={steady!r} is not one of the runners {sorted(runners)}.")
    names = list(runners)
    samples: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    rnd = 0
    while True:
        timed = rnd >= warmup
        done = len(_steady_rounds(samples, steady, slack, repeats)) if steady else len(samples[names[0]])
        spent = time.perf_counter() - start
        if timed and done >= repeats and (min_time is None or spent >= min_time):
            break
        if timed and steady and len(samples[steady]) >= STEADY_CAP * repeats:
            break
        if timed and max_time is not None and done >= 3 and spent >= max_time:
            break
        shift = rnd % len(names)
        took: dict[str, float] = {}
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            runners[name]()
            took[name] = (time.perf_counter() - t0) * 1e3
        if not timed and max_time is not None and sum(took.values()) >= max_time * 100:  # ms: a tenth
            timed, warmup = True, rnd  # a slow round: warm enough, and it counts
        if timed:
            for name, ms in took.items():
                samples[name].append(ms)
        if rnd + 1 == warmup:
            start = time.perf_counter()  # min_time counts timed rounds only
        rnd += 1
    keep = _steady_rounds(samples, steady, slack, repeats) if steady else None
    out = {}
    for name, ms in samples.items():
        ms = [ms[i] for i in keep] if keep is not None else ms
        p25, med, p75 = np.percentile(ms, [25, 50, 75])
        out[name] = Timing(float(med), float(p25), float(p75), len(ms))
    return out


def _steady_rounds(samples: dict[str, list[float]], steady: str, slack: float, repeats: int) -> list[int]:
    """The rounds whose ``steady`` runner ran within ``slack`` of its fastest round; when fewer than
    ``repeats``, and the rounds are at their cap, the ``repeats`` rounds where it ran fastest."""
    ref = samples[steady]
    if not ref:
        return []
    best = min(ref)
    keep = [i for i, ms in enumerate(ref) if ms <= (1 + slack) * best]
    if len(keep) < repeats and len(ref) >= STEADY_CAP * repeats:
        keep = sorted(sorted(range(len(ref)), key=ref.__getitem__)[:repeats])
    return keep
