"""Measuring latency tables (``vitgraph profile``) and landing a compiled model on a measured latency.

``profile(g, target, batch)`` compresses ``g`` one-shot under random decisions on every axis that
applies to it (heads, value dims, MLP units in steps of ``width.align``, embedding channels, whole
blocks, token counts; allocation uniform or global), materializes each, and times each compact
model interleaved with the dense one on the runtime (``vitgraph.targets.bench``: round-robin,
medians, ONNX Runtime with spinning off). The measured ratios fit the coefficients of
``vitgraph.cost.latency.LatencyTable``. On ``onnx-int8`` (dynamic INT8) every ratio, the dense model's
own included, is to the dense fp32 ONNX model: the budget is a fraction of what the user runs today. Attention -> convolution choices need training to decide, so the
profile does not sample them; their conv branches are priced by their FLOPs and ops.

``table_for(g, budget)`` is what ``budget.latency`` uses: the file ``budget.table``, else a table
cached per model, input size, runtime, batch, thread count and machine under
``$VITGRAPH_CACHE`` (default ``~/.cache/vitgraph``), else a fresh profile, saved there.

``land(...)`` checks a compiled model by measurement: the compact and dense models are timed
interleaved; when the ratio misses ``budget.latency`` by more than ``budget.latency_tolerance``, a
one-shot spec is compiled again with its target moved by the measured error, then between the aims
measured on either side (``budget.rounds`` rounds at most), and ``report.json`` gets every round.
"""
from __future__ import annotations

import hashlib
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitgraph.errors import SpecError
from vitgraph.analysis.graph import VitGraph
from vitgraph.cost.latency import LatencyTable, features, machine
from vitgraph.spec import Budget, Spec

Build = Callable[[Spec], tuple[Any, nn.Module]]  # a spec -> (gated model, compact module): how to compile one

SAMPLES = 8       # compact configurations measured per table (plus the dense model): 4 coefficients to fit
REPEATS = 10      # interleaved rounds per measurement


def _runner(module: nn.Module, g: VitGraph, target: str, batch: int, int8_plan: str = "auto"
            ) -> Callable[[], Any]:
    from vitgraph.targets import bench

    example = tuple(x[:1] for x in g.example_inputs)
    return bench.runners(module, example, batch=batch, targets=(target,), atol=1e-3, int8_plan=int8_plan)[target]


def reference(target: str) -> str:
    """The runtime a target's ratios are measured against: itself, except that a quantized runtime is held
    to the dense fp32 model (``budget.latency: 0.3`` on onnx-int8 means 0.3 of dense fp32 ONNX Runtime)."""
    return "onnx" if target == "onnx-int8" else target


def measure_ratio(dense: Callable[[], Any], compact: Callable[[], Any], repeats: int = REPEATS
                  ) -> tuple[float, float, float]:
    """(compact / dense, dense ms, compact ms): medians of interleaved rounds, over the rounds in which the
    dense model ran within 10 % of its fastest (a burst of machine load slows INT8 more than fp32)."""
    from vitgraph.targets import bench

    t = bench.measure({"dense": dense, "compact": compact}, warmup=2, repeats=repeats, steady="dense")
    return t["compact"].median_ms / t["dense"].median_ms, t["dense"].median_ms, t["compact"].median_ms


def sample_specs(g: VitGraph, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` one-shot specs with random decisions on the axes ``g`` has, alternating which axes combine."""
    from vitgraph.analysis.tokens import default_stages

    rng = random.Random(seed)
    kinds = {grp.kind for grp in g.structure.groups}
    stages = default_stages(g.structure.blocks)
    depth = any(b.skippable for b in g.structure.blocks) and len(g.structure.blocks) > 2
    out = []
    for i in range(n):
        # alternate the families that combine: widths with blocks, widths with tokens (and blocks, every other
        # time); tokens take no head decisions: their scores read every head of the attention before them
        tokens = bool(stages) and i % 3 == 2
        spec: dict[str, Any] = {"budget": {"flops": round(rng.uniform(0.35, 0.95), 3), "tolerance": 0.05}}
        width = {"method": "magnitude", "heads": "heads" in kinds and not tokens and rng.random() < 0.8,
                 "mlp": "mlp" in kinds and rng.random() < 0.8, "embed": "embed" in kinds and rng.random() < 0.4,
                 "head_dim": "head_dim" in kinds and not tokens and rng.random() < 0.3,
                 "allocation": rng.choice(["uniform", "global"])}
        use_width = any(width[k] for k in ("heads", "mlp", "embed", "head_dim"))
        spec["width"] = width if use_width else {"heads": False, "mlp": False}
        if depth and (i % 3 == 1 or (tokens and i % 2 == 0) or not use_width):
            spec["depth"] = {"skip_blocks": True, "per_branch": rng.random() < 0.5}
        if tokens:
            base = rng.uniform(0.5, 0.95)
            spec["tokens"] = {"method": "attention", "stages": list(stages),
                              "keep": [round(base ** (s + 1), 3) for s in range(len(stages))]}
            if not use_width and "depth" not in spec:
                spec["budget"]["flops"] = 1.0  # the keep ratios decide alone
        out.append(spec)
    return out


def measure_specs(g: VitGraph, specs: list[dict[str, Any]], target: str, batch: int, want: int, build: Build,
                  repeats: int = REPEATS, progress: bool = True) -> tuple[list[dict[str, Any]], float]:
    """Compile ``specs`` one-shot with ``build`` in turn (skipping those some axis cannot reach) until ``want``
    compact models are timed interleaved with the dense one. Returns their ``{"label", "spec", "features",
    "ratio"}`` rows and the dense model's median milliseconds."""
    dense = _runner(g.gm, g, reference(target), batch)
    rows: list[dict[str, Any]] = []
    dense_ms: list[float] = []
    task = _progress(progress, f"profiling {g.name} on {target}, batch {batch}", want)
    plan = "auto"
    if target != reference(target):  # the dense model quantized: the INT8 gain, and the op plan every sample keeps
        plan = _int8_plan(g, batch)
        ratio, d_ms, _ = measure_ratio(dense, _runner(g.gm, g, target, batch, plan), repeats)
        dense_ms.append(d_ms)
        rows.append({"label": "dense", "spec": None, "features": features(g, []), "ratio": ratio})
    base = len(rows)
    for raw in specs:
        if len(rows) - base >= want:
            break
        try:
            gated, compact = build(Spec.from_dict(raw))
        except SpecError:  # a random budget some axis set cannot reach: draw the next one
            continue
        ratio, d_ms, _ = measure_ratio(dense, _runner(compact, g, target, batch, plan), repeats)
        dense_ms.append(d_ms)
        rows.append({"label": _label(raw), "spec": raw, "features": features(g, list(gated.axes.values())),
                     "ratio": ratio})
        task(len(rows) - base)
    return rows, (sorted(dense_ms)[len(dense_ms) // 2] if dense_ms else float("nan"))


def profile(g: VitGraph, target: str, batch: int, build: Build, *, samples: int = SAMPLES, repeats: int = REPEATS,
            seed: int = 0, progress: bool = True) -> LatencyTable:
    """Measure ``g`` under random compact configurations (compiled by ``build``, e.g.
    ``vitgraph.gated.builder(g)``) on ``target`` at ``batch`` and fit its table."""
    rows, ms = measure_specs(g, sample_specs(g, samples * 2, seed), target, batch, samples, build, repeats,
                             progress)
    if len(rows) - (target != reference(target)) < 3:
        raise SpecError(f"profile: only {len(rows)} random compact configurations of {g.name} compiled; a "
                        f"latency table needs at least 3 (does the model have prunable heads, MLPs or blocks? see "
                        f"'vitgraph inspect')")
    if target == reference(target):
        rows.insert(0, {"label": "dense", "features": features(g, []), "ratio": 1.0})
    return LatencyTable(model=g.name, input_size=list(g.input_size), target=target, batch=batch,
                        threads=torch.get_num_threads(), machine=machine(), dense_flops=g.structure.flops,
                        dense_ms=ms, coef=LatencyTable.fit_coef(rows, ms), samples=rows)


def _int8_plan(g: VitGraph, batch: int) -> str:
    """The INT8 op plan ``int8.quantize`` picks by measurement for the dense model, kept for every sample (one
    measurement of the plans instead of one per sample: narrower widths do not change which ops quantize)."""
    import tempfile

    from vitgraph.targets import int8, onnx as onnx_target

    example = tuple(x[:1] for x in g.example_inputs)
    with tempfile.TemporaryDirectory(prefix="vitgraph-profile-") as tmp:
        fp32 = Path(tmp) / "dense.onnx"
        onnx_target.lower(g.gm, example, fp32, atol=1e-3, check_batches=(batch,), name=g.name)
        return int8.quantize(fp32, Path(tmp) / "dense.int8.onnx", mode="dynamic").plan


def _label(spec: dict[str, Any]) -> str:
    w = spec.get("width", {})
    parts = [k for k in ("heads", "head_dim", "mlp", "embed") if w.get(k)]
    parts += ["depth"] if spec.get("depth") else []
    parts += ["tokens"] if spec.get("tokens") else []
    return f"{'+'.join(parts) or 'dense'} @ {spec['budget']['flops']}"


def _progress(on: bool, what: str, total: int) -> Callable[[int], None]:
    if not on:
        return lambda done: None
    print(f"{what}: {total} compact configurations, timed interleaved with the dense model", file=sys.stderr)

    def step(done: int) -> None:
        print(f"  [{done}/{total}]", file=sys.stderr, flush=True)
    return step


def cache_path(g: VitGraph, target: str, batch: int) -> Path:
    root = Path(os.environ.get("VITGRAPH_CACHE", Path.home() / ".cache" / "vitgraph")) / "latency"
    key = f"{g.name}|{list(g.input_size)}|{g.structure.flops}|{target}|{batch}|{torch.get_num_threads()}|{machine()}"
    if target != reference(target):  # a quantized runtime runs what its plans make of the model: new plans, new table
        from vitgraph.targets.int8 import PLANS

        key += "|" + ",".join(p.name for p in PLANS)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in g.name)[:60]
    return root / f"{safe}-{target}-b{batch}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"


def table_for(g: VitGraph, budget: Budget, build: Build, progress: bool = True) -> LatencyTable:
    """The latency table ``budget.latency`` prices with: ``budget.table``, the cached one, or a new profile
    (of models compiled by ``build``)."""
    if budget.table is not None:
        table = LatencyTable.load(budget.table)
        table.check(g, budget.target, budget.batch, source=f"budget.table {budget.table}")
        return table
    path = cache_path(g, budget.target, budget.batch)
    if path.exists():
        try:
            return LatencyTable.load(path)
        except SpecError:
            pass  # a stale cache entry: measure again
    table = profile(g, budget.target, budget.batch, build, progress=progress)
    table.save(path)
    return table


def land(g: VitGraph, spec: Spec, build: Build, gated: Any, compact: nn.Module,
         progress: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """Measure ``compact`` against the dense model; while it misses ``budget.latency`` and the spec is
    one-shot, rebuild (``build(spec) -> (gated, compact)``) with the target corrected by the measured error.
    Returns the final (gated, compact) and ``report.json``'s ``budget.latency``."""
    b = spec.budget
    goal = float(b.latency)  # type: ignore[arg-type]
    dense = _runner(g.gm, g, reference(b.target), b.batch)
    rounds: list[dict[str, float]] = []
    aim = goal
    while True:
        predicted = float(gated.pricer("eval"))
        ratio, dense_ms, compact_ms = measure_ratio(dense, _runner(compact, g, b.target, b.batch), 2 * REPEATS)
        rounds.append({"aim": round(aim, 4), "predicted": round(predicted, 4), "measured": round(ratio, 4),
                       "dense_ms": round(dense_ms, 3), "compressed_ms": round(compact_ms, 3)})
        if progress:
            print(f"latency on {b.target}, batch {b.batch}: predicted {predicted:.3f}, measured {ratio:.3f} "
                  f"of dense (target {goal} +- {b.latency_tolerance})", file=sys.stderr)
        if abs(ratio - goal) <= b.latency_tolerance or len(rounds) > b.rounds or spec.trains:
            break
        aim = next_aim(rounds, goal)
        try:
            gated, compact = build(_aimed(spec, aim))
        except SpecError:
            break  # the corrected target is out of the axes' reach: keep the measured model and say so
    last = rounds[-1]
    report = {"target": goal, "tolerance": b.latency_tolerance, "runtime": b.target, "reference": reference(b.target),
              "batch": b.batch,
              "predicted": last["predicted"], "measured": last["measured"], "dense_ms": last["dense_ms"],
              "compressed_ms": last["compressed_ms"], "rounds": rounds, "adjusted": len(rounds) > 1,
              "within": abs(last["measured"] - goal) <= b.latency_tolerance}
    return gated, compact, report


def next_aim(rounds: list[dict[str, float]], goal: float) -> float:
    """The budget to compile at next: interpolated between the nearest aims measured on either side of
    ``goal`` once there are some (a noisy or curved table makes a plain rescaling oscillate around it), else
    the aim nearest the goal rescaled by its measured error (which is assumed to persist there)."""
    below = [r for r in rounds if r["measured"] < goal]
    above = [r for r in rounds if r["measured"] > goal]
    if below and above:
        lo = max(below, key=lambda r: r["measured"])
        hi = min(above, key=lambda r: r["measured"])
        t = (goal - lo["measured"]) / (hi["measured"] - lo["measured"])
        aim = lo["aim"] + t * (hi["aim"] - lo["aim"])
    else:
        near = min(rounds, key=lambda r: abs(r["measured"] - goal))
        aim = near["aim"] * goal / near["measured"]
    return min(1.0, max(0.02, aim))


def _aimed(spec: Spec, aim: float) -> Spec:
    import dataclasses

    return dataclasses.replace(spec, budget=dataclasses.replace(spec.budget, latency=aim))
