"""``vg.instrument`` and ``vg.materialize``: the gated graph and its compact rewrite.

``instrument(g, spec)`` copies the traced graph, inserts a gate per coupled group the spec asks for
(``InsertUnitGatesPass``) and attaches the spec's width method. The result is an ``nn.Module`` with
three modes (``open``: exactly the original; ``train``: the method's differentiable masks;
``eval``: the hard decisions ``materialize`` bakes in) and the hooks the training loop uses
(``param_groups``, ``penalties``, ``after_step``, ``freeze``, ``status``).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from vitgraph.analysis.cost import evaluate
from vitgraph.analysis.shapes import propagate_shapes
from vitgraph.errors import SpecError
from vitgraph.gates import UnitGate
from vitgraph.graph import VitGraph
from vitgraph.passes.insert_unit_gates_pass import InsertUnitGatesPass, branch_nodes
from vitgraph.passes.remove_pruned_units_pass import RemovePrunedUnitsPass
from vitgraph.spec import Spec
from vitgraph.width import Site, WidthMethod, build_method, magnitude_importance

MODES = ("open", "train", "eval")


class GatedModel(nn.Module):
    """A traced ViT with gates at its coupled groups, and the method that drives them."""

    def __init__(self, gm: fx.GraphModule, graph: VitGraph, spec: Spec, method: WidthMethod,
                 gates: dict[str, UnitGate], skipped: dict[str, str]) -> None:
        super().__init__()
        self.gm = gm
        self.method = method
        method._gm = gm
        self.graph = graph
        self.spec = spec
        self.gates = gates              # group name -> gate (modules registered under gm.vg_gates)
        self.skipped = skipped          # site -> why the spec's axes do not apply there
        self.mode = "train"
        self._penalties: dict[str, Tensor] = {}

    # -- running --------------------------------------------------------------------------------
    def forward(self, *args: Any) -> Any:
        masks = self.method.masks(self.mode)
        for name, gate in self.gates.items():
            gate.mask = None if masks is None else masks[name]
        self._penalties = self.method.penalties() if self.mode == "train" and torch.is_grad_enabled() else {}
        return self.gm(*args)

    def train(self, mode: bool = True) -> GatedModel:
        """``train()`` / ``eval()`` also switch the gates between learning and hard decisions
        (an explicit ``open`` stays open)."""
        super().train(mode)
        if getattr(self, "mode", None) != "open":
            self.mode = "train" if mode else "eval"
        return self

    def set_mode(self, mode: str) -> GatedModel:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        return self

    @contextmanager
    def using(self, mode: str) -> Iterator[GatedModel]:
        previous = self.mode
        try:
            yield self.set_mode(mode)
        finally:
            self.mode = previous

    # -- what the training loop calls ------------------------------------------------------------
    def penalties(self) -> dict[str, Tensor]:
        """The method's loss terms from the last forward in ``train`` mode."""
        return dict(self._penalties)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        extra = self.method.param_groups()
        method_params = {id(p) for ps in extra.values() for p in ps}
        weights = [p for p in self.gm.parameters() if id(p) not in method_params] + extra.get("weights", [])
        return {"weights": weights, **{k: v for k, v in extra.items() if k != "weights"}}

    def optim_defaults(self) -> dict[str, dict[str, Any]]:
        return self.method.optim_defaults(self.spec.train.search_steps)

    def after_step(self, step: int, lr: float) -> None:
        self.method.after_step(step, lr)

    def freeze(self) -> None:
        self.method.freeze()

    def status(self) -> dict[str, float]:
        return self.method.status()

    # -- decisions and cost --------------------------------------------------------------------
    def decisions(self) -> dict[str, list[int]]:
        """Per group, the units ``eval`` mode keeps (what ``materialize`` keeps)."""
        masks = self.method.masks("eval") or {}
        return {name: torch.nonzero(m > 0.5).flatten().tolist() for name, m in masks.items()}

    def cost(self) -> dict[str, float]:
        """FLOPs per image under the ``eval`` decisions, and their fraction of the dense model."""
        fraction = self.method.hard_fraction()
        return {"flops": fraction * self.graph.structure.flops, "fraction": fraction}


def _sites(g: VitGraph, spec: Spec, gates: dict[str, UnitGate]) -> list[Site]:
    sites = []
    for group in g.structure.groups:
        if group.name not in gates:
            continue
        consumer = next(s.target for s in group.slices if s.what == "weight.in")
        weights = tuple((s.target, s.axis, s.indices) for s in group.slices if s.what in ("weight.out", "weight.in"))
        gate = gates[group.name]
        sites.append(Site(group.name, group.kind, group.units, 1 if group.kind == "heads" else spec.width.align,
                          gate.min_units, consumer, gate.channel_unit.clone(), weights))
    return sites


def _chosen_groups(g: VitGraph, spec: Spec) -> tuple[list, dict[str, str]]:
    width, skipped, chosen = spec.width, {}, []
    kinds = {"heads"} if width.heads else set()
    kinds |= {"mlp"} if width.mlp else set()
    for group in g.structure.groups:
        if group.kind in kinds and group.units > 1:
            chosen.append(group)
    have = {(gr.site, gr.kind) for gr in chosen}
    for a in g.structure.attention:
        if width.heads and (a.name, "heads") not in have:
            skipped[a.name] = a.prunable.get("heads") or "heads are not separable here"
    for m in g.structure.mlps:
        if width.mlp and (m.name, "mlp") not in have:
            skipped[m.name] = m.prunable.get("mlp") or "hidden units are not separable here"
    return chosen, skipped


def _unsupported(spec: Spec) -> None:
    todo = {"width.head_dim": spec.width.head_dim, "depth.skip_blocks": spec.depth.skip_blocks,
            "depth.exits": bool(spec.depth.exits), "attention.to_conv": spec.attention.to_conv,
            "tokens.stages": bool(spec.tokens.stages)}
    asked = [k for k, v in todo.items() if v]
    if asked:
        raise SpecError(f"spec asks for {', '.join(asked)}, which this version of vitgraph does not implement yet; "
                        f"set {asked[0]} to its default (false / []) - width pruning of heads and MLP units works")


def instrument(g: VitGraph, spec: Spec, *, calibration: Iterable[tuple[Tensor, Tensor]] | None = None
               ) -> GatedModel:
    """Insert the spec's gates into a copy of ``g``'s graph and attach its width method."""
    _unsupported(spec)
    if not spec.width.enabled:
        raise SpecError("the spec compresses nothing: set width.heads and/or width.mlp to true")
    groups, skipped = _chosen_groups(g, spec)
    if not groups:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3])
        raise SpecError(f"{g.name}: the spec asks for width pruning but no site of this model allows it ({reasons})")
    gm = copy.deepcopy(g.gm)
    p = InsertUnitGatesPass(groups, g.structure.blocks)
    gm = p(gm).gm
    sites = _sites(g, spec, p.gates)
    dense = g.structure.flops

    blocks = {b.index: b for b in g.structure.blocks}
    removable = {s.name: branch_nodes(g.gm, blocks, g.structure.group(s.name)) for s in sites if s.min_units == 0}

    def cost(kept: Any) -> Any:
        total = evaluate(g.gm, kept)
        for name, nodes in removable.items():  # a branch with no unit left is deleted whole
            if float(torch.as_tensor(kept.get(name, 1.0)).detach()) == 0.0:
                total = total - evaluate(g.gm, kept, nodes=nodes)
        return total / dense

    floor = float(cost({s.name: s.round(0.0) / s.units for s in sites}))
    if spec.budget.flops < floor - spec.budget.tolerance:
        raise SpecError(f"budget.flops {spec.budget.flops} is impossible for {g.name} with this spec: pruning every "
                        f"allowed unit still leaves {floor:.3f} of the dense FLOPs; raise the budget or enable more "
                        f"axes")
    importance = None
    if spec.width.method == "magnitude":
        importance = magnitude_importance(gm, sites)
    elif spec.width.method == "taylor":
        if calibration is None:
            raise SpecError("width.method taylor scores units with gradients and needs data: pass --data digits or "
                            "--data imagefolder:PATH, or use method magnitude with --data none")
        importance = taylor_importance(gm, p.gates, calibration)
    method = build_method(spec.width.method, sites, cost, spec.budget.flops, importance)
    gated = GatedModel(gm, g, spec, method, p.gates, skipped)
    if importance is not None:
        gated.freeze()  # one-shot: the decisions are final now
    return gated


def taylor_importance(gm: fx.GraphModule, gates: dict[str, UnitGate], batches: Iterable[tuple[Tensor, Tensor]],
                      max_batches: int = 8) -> dict[str, Tensor]:
    """First-order Taylor importance of each unit: |dL/d(mask)| summed over calibration batches."""
    scores = {name: torch.zeros(g.units) for name, g in gates.items()}
    was_training = gm.training
    gm.eval()
    try:
        for i, (x, y) in enumerate(batches):
            if i >= max_batches:
                break
            for gate in gates.values():
                gate.mask = torch.ones(gate.units, requires_grad=True)
            loss = nn.functional.cross_entropy(gm(x), y)
            grads = torch.autograd.grad(loss, [g.mask for g in gates.values()])
            for (name, _), grad in zip(gates.items(), grads):
                scores[name] += grad.abs()
    finally:
        for gate in gates.values():
            gate.mask = None
        gm.train(was_training)
    return scores


def materialize(gated: GatedModel) -> fx.GraphModule:
    """The compact graph: ``eval`` decisions baked in, pruned units removed for real."""
    kept = gated.decisions()
    for gate in gated.gates.values():
        gate.mask = None
    gm = copy.deepcopy(gated.gm)
    g = gated.graph
    result = RemovePrunedUnitsPass(g.structure.groups, g.structure.blocks, kept)(gm)
    compact = result.gm
    compact.eval()
    propagate_shapes(compact, g.example_inputs)  # node shapes describe the compact graph, not the dense one
    return compact
