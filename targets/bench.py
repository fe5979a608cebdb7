"""Interleaved micro-benchmarks of lowered models.

Invariant: runners are timed round-robin (every round calls each runner once, the starting runner
rotating between rounds), so a drift in machine load lands on all of them alike; results are
medians with the interquartile range, never means.

Fairness: torch keeps its default thread count and ONNX Runtime gets as many intra-op threads
(``torch.get_num_threads()``), with spinning off so neither steals cycles while idle.
"""
from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitgraph.targets._common import LoweringError, batched_inputs, check_example_inputs, model_name

__all__ = ["Timing", "measure", "runners", "TARGETS"]

TARGETS = ("eager", "compile", "onnx")


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
            min_time: float | None = None, max_time: float | None = None) -> dict[str, Timing]:
    """Time zero-argument ``runners`` interleaved; ``repeats`` rounds at least, and at least
    ``min_time`` seconds in all when given. Warm-up rounds (also interleaved) are not timed.

    ``max_time`` bounds a slow model (a 1024-px encoder takes seconds a run): once a round has been
    timed three times and ``max_time`` seconds have passed, timing stops; a round that alone takes a
    tenth of ``max_time`` ends the warm-up and is timed itself (first-call costs are milliseconds
    against seconds, and the median of three ignores one slow run)."""
    if not runners:
        raise LoweringError("bench: measure() needs at least one runner.")
    if repeats < 1 or warmup < 0:
        raise LoweringError(f"bench: need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    names = list(runners)
    samples: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    rnd = 0
    while True:
        timed = rnd >= warmup
        done = len(samples[names[0]])
        spent = time.perf_counter() - start
        if timed and done >= repeats and (min_time is None or spent >= min_time):
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
    out = {}
    for name, ms in samples.items():
        p25, med, p75 = np.percentile(ms, [25, 50, 75])
        out[name] = Timing(float(med), float(p25), float(p75), len(ms))
    return out


def runners(module: nn.Module, example_inputs: Sequence[torch.Tensor], *, batch: int = 1,
            targets: Sequence[str] = TARGETS, workdir: str | os.PathLike | None = None,
            atol: float = 1e-4, name: str | None = None) -> dict[str, Callable[[], Any]]:
    """Zero-argument runners of ``module`` at ``batch`` on each target, ready for :func:`measure`.

    Every lowered runner is parity-checked first (on the same batch size). ``workdir`` keeps the
    ONNX file; without it the file lives in a temporary directory removed once the session holds
    the model. All runners see the same inputs.
    """
    from vitgraph.targets import compile as compile_target
    from vitgraph.targets import onnx as onnx_target

    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise LoweringError(f"bench: unknown target(s) {unknown}; choose from {list(TARGETS)}.")
    name = model_name(module, name)
    example = check_example_inputs(example_inputs, "bench")
    inputs = batched_inputs(example, batch, seed=0)
    out: dict[str, Callable[[], Any]] = {}
    for target in targets:
        if target == "eager":
            out[target] = _under_inference_mode(module, inputs)
        elif target == "compile":
            fn = compile_target.lower(module, inputs, atol=atol, dynamic=False, name=name)  # one graph per batch
            out[target] = _under_inference_mode(fn, inputs)
        else:
            with tempfile.TemporaryDirectory(prefix="vitgraph-bench-") as scratch:
                path = Path(workdir if workdir is not None else scratch) / f"{name}.onnx"
                onnx_target.lower(module, example, path, atol=atol, check_batches=(batch,), name=name)
                sess = onnx_target.session(path, threads=torch.get_num_threads())  # loaded: file may go
            feed = {i.name: x.detach().cpu().numpy() for i, x in zip(sess.get_inputs(), inputs)}
            out[target] = lambda sess=sess, feed=feed: sess.run(None, feed)
    return out


def add_timing_args(parser: Any, batches: str = "1,16") -> None:
    """The flags every speed script takes: --batches, --targets, --repeats, --warmup, --json."""
    parser.add_argument("--batches", default=batches, help="comma-separated batch sizes")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated: eager,compile,onnx")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", metavar="OUT", help="write every figure here")


def timing_args(args: Any) -> tuple[list[int], list[str]]:
    """(batch sizes, targets) from the flags of :func:`add_timing_args`."""
    return [int(b) for b in args.batches.split(",")], [t for t in args.targets.split(",") if t]


def compare(models: dict[str, nn.Module], example_inputs: Sequence[torch.Tensor], *, batch: int,
            targets: Sequence[str] = TARGETS, warmup: int = 3, repeats: int = 20,
            workdir: str | os.PathLike | None = None, name: str = "model", atol: float = 1e-3
            ) -> dict[str, dict[str, Timing]]:
    """Every model on every target at ``batch``, all runners interleaved: ``{target: {model: Timing}}``."""
    run = {f"{label}/{target}": fn for label, module in models.items()
           for target, fn in runners(module, example_inputs, batch=batch, targets=targets, workdir=workdir,
                                     name=f"{name}-{label}", atol=atol).items()}
    timing = measure(run, warmup=warmup, repeats=repeats)
    return {t: {label: timing[f"{label}/{t}"] for label in models} for t in targets}


def _under_inference_mode(fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    def runner() -> Any:
        with torch.inference_mode():
            return fn(*inputs)
    return runner
