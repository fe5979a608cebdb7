"""``vg.instrument``, ``vg.materialize`` and ``compile_spec``: from a traced graph to a gated model, and
from a gated model to its compact graph.

``instrument(g, spec)`` builds the axes the spec asks for (``vitgraph.axes``), runs their instrument passes
on a copy of the traced graph through the pass manager, hands the result and a ``Cost`` (FLOPs, or the
measured latency table) to a ``GatedModel``, and refuses a budget the allowed decisions cannot reach.
``materialize`` bakes the ``eval`` decisions in with the axes' materialize passes. ``compile_spec`` is
the two for a one-shot spec: what the profiler and the latency feedback loop are handed to build models.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch.fx as fx
from torch import Tensor

from vitgraph.analysis.graph import VitGraph
from vitgraph.axes import Axis, AxisContext, build_axes
from vitgraph.cost.budget import Cost
from vitgraph.cost.latency import LatencyTable
from vitgraph.errors import SpecError
from vitgraph.gated.model import GatedModel
from vitgraph.passes.manager import PassManager
from vitgraph.spec import Spec


def instrument(g: VitGraph, spec: Spec, *, calibration: Iterable[tuple[Tensor, Tensor]] | None = None,
               val_data: Any = None, axes: Sequence[type[Axis]] = (), latency: LatencyTable | None = None
               ) -> GatedModel:
    """Insert the gates of every axis the spec asks for (and of ``axes``, axes of your own) into a copy
    of ``g``'s graph. ``calibration``: batches for gradient-based scores; ``val_data``: (image, label)
    pairs for decisions taken on validation data at freeze (which exit to cut at); ``latency``: the
    measured table ``budget.latency`` prices with (``vitgraph.cost.profile.table_for``)."""
    if spec.budget.latency is not None and latency is None:
        raise SpecError("budget.latency needs a measured latency table: pass latency=vitgraph.cost.profile.table_for(g, "
                        "spec.budget) (vg.compress does), or use budget.flops")
    ctx = AxisContext(g, spec, calibration, val_data)
    built = build_axes(ctx, axes)
    manager = PassManager(g.example_inputs)
    gm = manager.run(copy.deepcopy(g.gm), [p for a in built for p in a.instrument_passes()])
    for axis in built:
        axis.setup(gm)
    gated = GatedModel(gm, g, spec, built, Cost(g, built, spec, latency))
    _check_budget(g, spec, gated)
    if all(a.one_shot for a in built):
        gated.freeze()  # nothing to learn: the one-shot decisions are final now
    return gated


def _check_budget(g: VitGraph, spec: Spec, gated: GatedModel) -> None:
    """Refuse a budget the allowed decisions cannot reach, before any training."""
    budget = spec.budget
    floor = float(gated.pricer("floor"))
    if budget.fraction < floor - budget.slack:
        left = [getattr(a, "skipped", None) for a in gated.axes.values()]
        dense = [f"{k}: {v}" for d in left if isinstance(d, dict) for k, v in d.items()]
        why = f" (sites left dense: {'; '.join(dense[:2])}" + (f"; {len(dense) - 2} more" if len(dense) > 2 else "") \
            + ")" if dense else ""
        raise SpecError(f"{budget.key} {budget.fraction} is impossible for {g.name} with this spec: pruning every "
                        f"allowed unit still leaves {floor:.3f} of the dense {budget.metric}{why}; raise the budget "
                        f"or enable more axes")
    for axis in gated.axes.values():
        axis.check_budget(gated.pricer)


def materialize(gated: GatedModel) -> fx.GraphModule:
    """The compact graph: ``eval`` decisions baked in by every axis's materialize passes, coarse removals
    (exits, blocks) first, then slicing what is left."""
    for axis in gated.axes.values():  # the copy's gates must not hold this model's masks or samples
        axis.apply("open")
    gm = copy.deepcopy(gated.gm)
    ordered = sorted(gated.axes.values(), key=lambda a: a.materialize_order)
    passes = [p for axis in ordered for p in axis.materialize_passes()]
    # the manager re-records shapes after every pass: they describe the compact graph, not the dense one
    compact = PassManager(gated.example_inputs()).run(gm, passes)
    compact.eval()
    if gated.serving_batch is not None:
        compact.serving_batch = gated.serving_batch  # read by the targets: export and check at that batch only
    return compact


def compile_spec(g: VitGraph, spec: Spec, **instrument_args: Any) -> tuple[GatedModel, fx.GraphModule]:
    """``spec``'s decisions taken now (one-shot, or the untrained learned ones) and baked in: (gated, compact)."""
    gated = instrument(g, spec, **instrument_args)
    gated.freeze()
    return gated.eval(), materialize(gated)


def builder(g: VitGraph, **instrument_args: Any) -> Callable[[Spec], tuple[GatedModel, fx.GraphModule]]:
    """``compile_spec`` for ``g``, as the function of a spec the profiler and ``land`` are handed."""
    return lambda spec: compile_spec(g, spec, **instrument_args)
