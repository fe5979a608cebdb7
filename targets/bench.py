"""Interleaved micro-benchmarks of lowered models (the timing itself: ``_timing.measure``, re-exported here).

Invariant: runners are timed round-robin (every round calls each runner once, the starting runner
rotating between rounds), so a drift in machine load lands on all of them alike; results are
medians with the interquartile range, never means.

Fairness: torch keeps its default thread count and ONNX Runtime gets as many intra-op threads
(``torch.get_num_threads()``), with spinning off so neither steals cycles while idle.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitgraph.targets._common import LoweringError, batched_inputs, check_example_inputs, model_name
from vitgraph.targets._timing import Timing, measure

__all__ = ["Timing", "measure", "runners", "TARGETS", "DEFAULT_TARGETS"]

TARGETS = ("eager", "compile", "onnx", "onnx-int8")   # onnx-int8: dynamic INT8 (weights), int8.quantize's plan
DEFAULT_TARGETS = ("eager", "compile", "onnx")


def runners(module: nn.Module, example_inputs: Sequence[torch.Tensor], *, batch: int = 1,
            targets: Sequence[str] = DEFAULT_TARGETS, workdir: str | os.PathLike | None = None,
            atol: float = 1e-4, name: str | None = None, int8_plan: str = "auto") -> dict[str, Callable[[], Any]]:
    """Zero-argument runners of ``module`` at ``batch`` on each target, ready for :func:`measure`.

    Every lowered runner is parity-checked first (on the same batch size; ``onnx-int8``: its fp32 file, then
    top-1 agreement of the dynamic INT8 file with it, see :mod:`vitgraph.targets.int8`). ``workdir`` keeps the
    ONNX files; without it the file lives in a temporary directory removed once the session holds
    the model. ``int8_plan``: which ops ``onnx-int8`` quantizes ("auto": measured, see ``int8.PLANS``).
    All runners see the same inputs.
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
                if target == "onnx-int8":
                    path = _int8(path, name, int8_plan)
                sess = onnx_target.session(path, threads=torch.get_num_threads())  # loaded: file may go
            feed = {i.name: x.detach().cpu().numpy() for i, x in zip(sess.get_inputs(), inputs)}
            out[target] = lambda sess=sess, feed=feed: sess.run(None, feed)
    return out


def add_timing_args(parser: Any, batches: str = "1,16") -> None:
    """The flags every speed script takes: --batches, --targets, --repeats, --warmup, --json."""
    parser.add_argument("--batches", default=batches, help="comma-separated batch sizes")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated: " + ",".join(TARGETS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", metavar="OUT", help="write every figure here")


def timing_args(args: Any) -> tuple[list[int], list[str]]:
    """(batch sizes, targets) from the flags of :func:`add_timing_args`."""
    return [int(b) for b in args.batches.split(",")], [t for t in args.targets.split(",") if t]


def compare(models: dict[str, nn.Module], example_inputs: Sequence[torch.Tensor], *, batch: int,
            targets: Sequence[str] = DEFAULT_TARGETS, warmup: int = 3, repeats: int = 20,
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


def _int8(fp32: Path, name: str, plan: str = "auto") -> Path:
    """The dynamic INT8 file beside ``fp32``, its agreement with fp32 checked (random inputs)."""
    from vitgraph.targets import int8

    path = fp32.with_name(f"{name}.int8.onnx")
    report = int8.quantize(fp32, path, mode="dynamic", plan=plan)
    int8.check(report, fp32, None, name=name, repeats=3, images=16)  # a sanity check: the runner is for timing
    return path
