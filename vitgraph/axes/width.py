"""The width axis: attention heads and MLP units (WDPruning, UVC, one-shot magnitude / Taylor).

Instrument: a ``UnitGate`` at each coupled group's consumer (``InsertUnitGatesPass``). Method: one
of ``width_methods`` per spec (``width.method``). Materialize: every group sliced to the units its
frozen mask keeps (``RemovePrunedUnitsPass``). Factors: each group's kept fraction; a group that
keeps nothing deletes its residual branch (``branch.<i>.<kind>`` = 0).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from vitgraph.analysis.depth import branch_factor
from vitgraph.axes.base import Axis, AxisContext, Factors, Pricer, Run
from vitgraph.axes.importance import magnitude_importance, taylor_importance
from vitgraph.axes.width_methods import Site, WidthMethod, build_method
from vitgraph.errors import SpecError
from vitgraph.gates.units import UnitGate
from vitgraph.analysis.graph import VitGraph
from vitgraph.meta import GATES, CoupledGroup, submodule_name
from vitgraph.passes.insert_unit_gates_pass import InsertUnitGatesPass
from vitgraph.passes.prune_value_dims_pass import PruneValueDimsPass
from vitgraph.passes.remove_pruned_units_pass import RemovePrunedUnitsPass, probe
from vitgraph.spec import Spec

if TYPE_CHECKING:
    from vitgraph.passes.base import VitPass


def chosen_groups(g: VitGraph, spec: Spec) -> tuple[list[CoupledGroup], dict[str, str]]:
    """The groups the spec's width settings gate, and for every site left dense the reason."""
    width, skipped, chosen = spec.width, {}, []
    kinds = {"heads"} if width.heads else set()
    kinds |= {"mlp"} if width.mlp else set()
    kinds |= {"head_dim"} if width.head_dim else set()
    kinds |= {"embed"} if width.embed else set()
    cut_values = {a.name for a in g.structure.attention if a.prunable.get("head_dim") is None}
    for group in g.structure.groups:
        if group.kind in kinds and group.units > 1 and (group.kind != "head_dim" or group.site in cut_values):
            chosen.append(group)
    have = {(gr.site, gr.kind) for gr in chosen}
    single = {(gr.site, gr.kind): _single(gr) for gr in g.structure.groups if gr.units <= 1}
    for a in g.structure.attention:
        if width.heads and (a.name, "heads") not in have:
            skipped[a.name] = (a.prunable.get("heads") or single.get((a.name, "heads"))
                               or "no head group was built for this site")
        elif width.head_dim and (a.name, "head_dim") not in have:
            why = (a.prunable.get("head_dim") or single.get((a.name, "head_dim"))
                   or "no value-dim group was built for this site")
            skipped[a.name] = f"value dims: {why}"
    if width.embed and ("embed", "embed") not in have:
        why = g.structure.embed_reason or single.get(("embed", "embed")) or "no embedding group was built"
        skipped["embed"] = f"embedding channels: {why}"
    for m in g.structure.mlps:
        if width.mlp and (m.name, "mlp") not in have:
            skipped[m.name] = (m.prunable.get("mlp") or single.get((m.name, "mlp"))
                               or "no hidden-unit group was built for this MLP")
    return chosen, skipped


def _single(group: CoupledGroup) -> str:
    """Why a group of one unit stays: cutting its only unit would delete the layer, which is depth's job."""
    what = {"heads": "head", "head_dim": "value dim", "mlp": "hidden unit", "embed": "channel"}.get(group.kind, "unit")
    return (f"it has a single {what}: removing it would remove the layer (remove the branch with "
            "depth.per_branch instead)")


class WidthAxis(Axis):
    """Heads and MLP units of every gated coupled group."""

    name = "width"
    freeze_order = 40        # last: the widths close the gap the coarser decisions leave
    materialize_order = 40   # after blocks and exits are gone: only the groups still in the graph are sliced

    def __init__(self, ctx: AxisContext, groups: list[CoupledGroup], skipped: dict[str, str]) -> None:
        super().__init__(ctx)
        self.groups = groups
        self.skipped = skipped      # site -> why the spec's width settings do not apply there
        self.calibration = ctx.calibration
        self.sites: list[Site] = []
        self.gates: dict[str, UnitGate] = {}
        self.branch: dict[str, str] = {}  # group -> the set factor of the residual branch it can delete
        # no units until setup() finds the gates in the instrumented graph and builds the spec's method there
        self.method: WidthMethod = build_method("magnitude", [], ctx.spec.budget.fraction, lambda p: None, {})

    @classmethod
    def from_spec(cls, ctx: AxisContext) -> WidthAxis | None:
        g, spec = ctx.graph, ctx.spec
        if not spec.width.enabled:
            return None
        groups, skipped = chosen_groups(g, spec)
        for name, why in probe(g.gm, groups, g.example_inputs).items():  # vitgraph's own gap, named: left dense
            group = next(x for x in groups if x.name == name)
            skipped[name] = (f"removing a unit of {name} breaks the rewritten graph ({why}); recognition missed a "
                             "tensor this group must shrink, so it stays dense")
            groups.remove(group)
        if not groups:
            reasons = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3]) or (
                "it has no attention heads, MLP or embedding groups the spec's width keys enable")
            if not (spec.depth.skip_blocks or spec.depth.exits):
                raise SpecError(f"{g.name}: the spec asks for width pruning but no site of this model allows it "
                                f"({reasons}); `vitgraph inspect` lists each site and why it can or cannot be pruned")
        return cls(ctx, groups, skipped)

    def instrument_passes(self) -> list[VitPass]:
        return [InsertUnitGatesPass(self.groups, self.graph.structure.blocks)] if self.groups else []

    def setup(self, gm: fx.GraphModule) -> None:
        spec = self.spec
        self.gates = {gr.name: gm.get_submodule(submodule_name(GATES, gr.name)) for gr in self.groups}
        self.sites = [self._site(gr) for gr in self.groups]
        self.branch = {gr.name: branch_factor(gr.block, gr.branch) for gr, s in zip(self.groups, self.sites)
                       if s.min_units == 0}
        importance = None
        if spec.width.method == "magnitude":
            importance = magnitude_importance(gm, self.sites)
        elif spec.width.method == "taylor":
            if self.sites and self.calibration is None:
                raise SpecError("width.method taylor scores units with gradients and needs data: pass --data digits "
                                "or --data imagefolder:PATH, or use method magnitude with --data none")
            aux = isinstance(next(n for n in gm.graph.nodes if n.op == "output").args[0], tuple)
            importance = taylor_importance(gm, self.gates, self.calibration, final_only=aux) if self.sites else {}
        self.method = build_method(spec.width.method, self.sites, spec.budget.fraction, gm.get_parameter, importance,
                                   allocation=spec.width.allocation)

    def _site(self, group: CoupledGroup) -> Site:
        consumer = next(s.target for s in group.slices if s.what == "weight.in")
        weights = tuple((s.target, s.axis, s.indices) for s in group.slices if s.what in ("weight.out", "weight.in"))
        gate = self.gates[group.name]
        align, segments, min_units = self.spec.width.align, 1, gate.min_units
        if group.kind == "heads":
            align = 1
        elif group.kind == "head_dim":  # the same count in every head, aligned per head, at least one chunk each
            segments = self.graph.structure.attention_site(group.site).heads
            per_head = group.units // segments
            align = segments * (align if per_head % align == 0 and per_head >= 2 * align else 1)
            min_units = align
        elif group.kind == "embed":
            min_units = align
        return Site(group.name, group.kind, group.units, align, min_units, consumer, gate.channel_unit.clone(),
                    weights, segments)

    # -- running and training -------------------------------------------------------------------
    def apply(self, mode: str) -> None:
        masks = self.method.masks(mode)
        for name, gate in self.gates.items():
            gate.mask = None if masks is None else masks[name]

    @property
    def one_shot(self) -> bool:
        return self.spec.width.method in ("magnitude", "taylor") or not self.sites

    @property
    def budget_form(self) -> str | None:
        return self.method.budget_form if self.sites else None

    def learns_budget(self) -> bool:
        return self.budget_form is not None and not self.frozen

    def penalties(self) -> dict[str, Tensor]:
        return self.method.penalties()

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return self.method.param_groups()

    def optim_defaults(self, search_steps: int) -> dict[str, dict[str, Any]]:
        return self.method.optim_defaults(search_steps)

    def after_step(self, step: int, lr: float) -> None:
        self.method.after_step(step, lr)

    @property
    def frozen(self) -> bool:
        return not self.sites or bool(self.method.is_frozen)

    def freeze(self, pricer: Pricer, run: Run) -> None:
        # the heads of an attention another axis reads (a token stage's scores) may not all go: keep one at least
        needed = {b for a in pricer.axes if a is not self for b in a.needed_blocks()}
        self.method.sites = [replace(s, min_units=max(s.min_units, 1)) if gr.kind == "heads" and gr.block in needed
                             else s for gr, s in zip(self.groups, self.method.sites)]
        self.branch = {k: v for k, v in self.branch.items()
                       if next(s for s in self.method.sites if s.name == k).min_units == 0}
        self.method.freeze(lambda fractions: pricer("eval", {self.name: self.as_factors(fractions)}))

    # -- pricing ----------------------------------------------------------------------------------
    def as_factors(self, fractions: Mapping[str, Any]) -> Factors:
        """Kept fraction per group; a group keeping nothing deletes its branch where it can go."""
        out: Factors = dict(fractions)
        for name, branch in self.branch.items():
            if name in fractions and float(torch.as_tensor(fractions[name]).detach()) == 0.0:
                out[branch] = 0.0
        return out

    def factors(self, mode: str) -> Factors:
        if self.frozen or mode == "eval":
            return self.as_factors(self.method.kept_fractions("eval"))
        if mode == "train":
            return self.as_factors(self.method.expected())
        if mode == "floor":
            return self.as_factors({s.name: s.round(0.0) / s.units for s in self.sites})
        return {}

    # -- results ----------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return self.spec.width.method

    def decisions(self) -> dict[str, list[int]]:
        """Per group, the units ``eval`` mode keeps."""
        masks = self.method.masks("eval") or {}
        return {name: torch.nonzero(m > 0.5).flatten().tolist() for name, m in masks.items()}

    def materialize_passes(self) -> list[VitPass]:
        if not self.sites:
            return []
        st, decisions = self.graph.structure, self.decisions()
        units = {k: v for k, v in decisions.items() if st.group(k).kind != "head_dim"}
        passes: list[VitPass] = [RemovePrunedUnitsPass(st.groups, st.blocks, units)]
        values = {st.group(k).site: v for k, v in decisions.items() if st.group(k).kind == "head_dim"}
        if values:
            passes.append(PruneValueDimsPass(st.attention, self._value_dims_per_head(values, decisions)))
        return passes

    def _value_dims_per_head(self, values: Mapping[str, list[int]], decisions: Mapping[str, list[int]]
                             ) -> dict[str, list[list[int]]]:
        """Per attention, for each head the heads decision keeps (renumbered as sliced), its kept value dims."""
        out = {}
        for site, kept in values.items():
            a = self.graph.structure.attention_site(site)
            heads = decisions.get(f"{site}.heads", list(range(a.heads)))
            per = a.v_head_dim
            out[site] = [[u - h * per for u in kept if u // per == h] for h in heads]
        return out

    def status(self, pricer: Pricer) -> dict[str, float]:
        if self.budget_form is None:
            return {}
        return {"expected": float(pricer("eval", {self.name: self.as_factors(self.method.expected())}))}

    def report(self) -> dict[str, Any]:
        return {"kept": {k: len(v) for k, v in self.decisions().items()},
                "units": {s.name: s.units for s in self.sites}, "skipped_sites": self.skipped}
