"""``vg.instrument`` and ``vg.materialize``: the gated graph and its compact rewrite.

``instrument(g, spec)`` copies the traced graph and runs the instrument passes the spec asks for:
a gate per coupled group (``InsertUnitGatesPass``, width), exit classifiers (``InsertExitsPass``)
and block or branch gates (``InsertBlockGatesPass``, depth); it attaches the width method and the
depth gates, which price their decisions with one cost model (``Pricer``) under one budget. The
result is an ``nn.Module`` with three modes (``open``: exactly the original; ``train``: the
methods' differentiable masks and sampled gates; ``eval``: the hard decisions ``materialize``
bakes in) and the hooks the training loop uses (``param_groups``, ``penalties``, ``aux_logits``,
``after_step``, ``freeze``, ``status``).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from vitgraph.analysis.shapes import propagate_shapes
from vitgraph.errors import SpecError
from vitgraph.budget import Pricer
from vitgraph.depth import DepthGates, DepthUnit, choose_exit, depth_units, exit_reasons, head_path, influence, reachable_fractions
from vitgraph.gates import UnitGate
from vitgraph.graph import VitGraph
from vitgraph.passes.insert_block_gates_pass import InsertBlockGatesPass
from vitgraph.passes.insert_exits_pass import InsertExitsPass
from vitgraph.passes.insert_unit_gates_pass import InsertUnitGatesPass
from vitgraph.passes.remove_pruned_units_pass import RemovePrunedUnitsPass
from vitgraph.passes.remove_skipped_blocks_pass import RemoveSkippedBlocksPass
from vitgraph.passes.truncate_at_exit_pass import TruncateAtExitPass
from vitgraph.spec import Spec
from vitgraph.width import Site, WidthMethod, build_method, magnitude_importance

MODES = ("open", "train", "eval")


class GatedModel(nn.Module):
    """A traced ViT with gates at its coupled groups and blocks, and the methods that drive them."""

    def __init__(self, gm: fx.GraphModule, graph: VitGraph, spec: Spec, method: WidthMethod,
                 gates: dict[str, UnitGate], skipped: dict[str, str], *, depth: DepthGates | None = None,
                 pricer: Pricer | None = None, exits: tuple[int, ...] = (), depth_skipped: dict[str, str] | None = None
                 ) -> None:
        super().__init__()
        self.gm = gm
        self.method = method
        method._gm = gm
        self.depth = depth
        self.graph = graph
        self.spec = spec
        self.gates = gates              # group name -> gate (modules registered under gm.vg_gates)
        self.skipped = skipped          # site -> why the spec's axes do not apply there
        self.depth_skipped = depth_skipped or {}  # block -> why it cannot be skipped
        self.pricer = pricer
        self.exits = tuple(exits)
        # -1: not chosen yet, 0: the final head, e: cut after block e (a buffer: checkpoints keep it)
        self.register_buffer("exit_chosen", torch.tensor(-1 if exits else 0))
        self.exit_data: Any = None      # validation data that chooses the exit at freeze (set by compress)
        self.exit_top1: dict[str, float] = {}
        self.one_shot_margins: Tensor | None = None  # block influence, when depth is decided without training
        self.mode = "train"
        self._penalties: dict[str, Tensor] = {}
        self._aux: dict[str, Tensor] = {}

    # -- running --------------------------------------------------------------------------------
    def _run(self, *args: Any) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Set every gate for the current mode, run the graph: (final logits, exit logits)."""
        masks = self.method.masks(self.mode)
        for name, gate in self.gates.items():
            gate.mask = None if masks is None else masks[name]
        if self.depth is not None:
            self.depth.apply(self.mode)
        learning = self.mode == "train" and torch.is_grad_enabled()
        self._penalties = {**self.method.penalties(), **(self.depth.penalties() if self.depth is not None else {})} \
            if learning else {}
        if self.depth is not None:
            self.depth.u = None  # the gates keep this forward's sample; pricing goes back to hard decisions
        out = self.gm(*args)
        return (out[0], tuple(out[1:])) if self.exits else (out, ())

    def forward(self, *args: Any) -> Any:
        final, exits = self._run(*args)
        self._aux = {}
        chosen = self.exit_after()
        if self.mode == "open" or not self.exits:
            return final
        if chosen is not None:  # cut: the exit is the model's head from here on
            return exits[self.exits.index(chosen)]
        if self.mode == "train" and torch.is_grad_enabled():
            self._aux = {f"exit{e}": x for e, x in zip(self.exits, exits)}
        return final

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
        """The methods' loss terms from the last forward in ``train`` mode."""
        return dict(self._penalties)

    def aux_logits(self) -> dict[str, Tensor]:
        """Logits of every exit classifier from the last forward in ``train`` mode (each gets the task loss)."""
        return dict(self._aux)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        extra = dict(self.method.param_groups())
        if self.depth is not None:
            extra.update(self.depth.param_groups())
        method_params = {id(p) for ps in extra.values() for p in ps}
        weights = [p for p in self.gm.parameters() if id(p) not in method_params] + extra.get("weights", [])
        return {"weights": weights, **{k: v for k, v in extra.items() if k != "weights"}}

    def optim_defaults(self) -> dict[str, dict[str, Any]]:
        out = dict(self.method.optim_defaults(self.spec.train.search_steps))
        if self.depth is not None:
            out.update(self.depth.optim_defaults(self.spec.train.search_steps))
        return out

    def after_step(self, step: int, lr: float) -> None:
        self.method.after_step(step, lr)
        if self.depth is not None:
            self.depth.after_step()

    @property
    def frozen(self) -> bool:
        return bool(self.method.is_frozen) and (self.depth is None or bool(self.depth.is_frozen)) \
            and int(self.exit_chosen) >= 0

    @property
    def searches(self) -> bool:
        """Whether training should search first and ``freeze`` after (fit's two phases)."""
        return not self.frozen

    def freeze(self) -> None:
        """Fix every decision, in order: the exit, the skipped blocks, then the widths, which close
        the remaining gap to the budget."""
        budget = self.spec.budget
        if int(self.exit_chosen) < 0:
            self.exit_chosen.fill_(self._choose_exit())
        if self.pricer is not None:
            self.pricer.exit = self.exit_after()
        if self.depth is not None and not bool(self.depth.is_frozen):
            sites = self.method.sites
            learned = {name: float(m.sum()) / m.numel() for name, m in self.method.learned_masks("eval").items()}

            def cost_at(keep: Tensor, widths: str) -> float:
                width = {s.name: (s.round(0.0) / s.units if widths == "floor" else
                                  learned[s.name] if widths == "learned" else 1.0) for s in sites}
                return float(self.pricer(width, depth=keep.float()))

            one_shot = self.one_shot_margins is not None
            self.depth.freeze(cost_at, budget.tolerance, width=bool(sites), fill=one_shot,
                              margins=self.one_shot_margins)
        if not bool(self.method.is_frozen):
            self.method.freeze()

    def status(self) -> dict[str, float]:
        out = self.method.status()
        if self.depth is not None:
            out.update(self.depth.status())
        return out

    # -- exits ------------------------------------------------------------------------------------
    def exit_after(self) -> int | None:
        """The block (1-based) the model is cut after, or None (the final head)."""
        e = int(self.exit_chosen)
        return e if e > 0 else None

    def _choose_exit(self) -> int:
        d = self.spec.depth
        if d.exit is not None:
            return d.exit
        if self.exit_data is None:
            self.exit_top1 = {"reason": "no validation data to choose an exit: kept the final head"}  # type: ignore
            return 0
        top1 = self.exit_accuracy(self.exit_data)
        self.exit_top1 = top1
        budget = self.spec.budget

        def reachable(e: int) -> bool:  # the cut model at full width still reaches down to the budget
            width = {s.name: 1.0 for s in self.method.sites}
            return float(self.pricer(width, exit=e)) >= budget.flops - budget.tolerance
        chosen = choose_exit(self.exits, [top1[f"exit{e}"] for e in self.exits], top1["final"], d.exit_tolerance,
                             reachable)
        return 0 if chosen is None else chosen

    @torch.no_grad()
    def exit_accuracy(self, data: Any, batch_size: int = 256) -> dict[str, float]:
        """Top-1 of the final head and of every exit, in ``eval`` mode, on ``data`` (image, label) pairs."""
        from torch.utils.data import DataLoader

        correct = torch.zeros(len(self.exits) + 1)
        total = 0
        was = self.training
        self.eval()
        try:
            for x, y in DataLoader(data, batch_size=batch_size):
                final, exits = self._run(x)
                for i, logits in enumerate((final, *exits)):
                    correct[i] += float((logits.argmax(-1) == y).sum())
                total += int(y.numel())
        finally:
            self.train(was)
        acc = (correct / max(total, 1)).tolist()
        return {"final": acc[0], **{f"exit{e}": a for e, a in zip(self.exits, acc[1:])}}

    # -- decisions and cost --------------------------------------------------------------------
    def decisions(self) -> dict[str, list[int]]:
        """Per group, the units ``eval`` mode keeps (what ``materialize`` keeps)."""
        masks = self.method.masks("eval") or {}
        return {name: torch.nonzero(m > 0.5).flatten().tolist() for name, m in masks.items()}

    def depth_decisions(self) -> dict[str, bool]:
        """Per depth unit (block or branch), whether ``eval`` mode keeps it."""
        return self.depth.decisions() if self.depth is not None else {}

    def skipped_units(self) -> list[DepthUnit]:
        """The depth units (blocks or branches) ``eval`` mode skips."""
        kept = self.depth_decisions()
        return [u for u in (self.depth.units if self.depth is not None else []) if not kept[u.name]]

    def removed_blocks(self) -> list[int]:
        """Indices of the blocks the compact graph will not have (skipped whole, or after the exit)."""
        out = {u.block for u in self.skipped_units() if u.kind == "block"}
        e = self.exit_after()
        if e is not None:
            out |= {b.index for b in self.graph.structure.blocks if b.index >= e}
        return sorted(out)

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
    todo = {"width.head_dim": spec.width.head_dim, "attention.to_conv": spec.attention.to_conv,
            "tokens.stages": bool(spec.tokens.stages)}
    asked = [k for k, v in todo.items() if v]
    if asked:
        raise SpecError(f"spec asks for {', '.join(asked)}, which this version of vitgraph does not implement yet; "
                        f"set {asked[0]} to its default (false / []) - width pruning of heads and MLP units, "
                        f"depth.skip_blocks and depth.exits work")


def _exits(g: VitGraph, spec: Spec) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The spec's exits, checked against the model: (exits, the head path their copies follow)."""
    exits = tuple(sorted(set(spec.depth.exits)))
    if not exits:
        return (), ()
    path, why = head_path(g.gm, g.structure.blocks)
    reasons = exit_reasons(g.gm, g.structure.blocks, why)
    for e in exits:
        if e not in reasons:
            raise SpecError(f"depth.exits: {g.name} has blocks 1..{len(g.structure.blocks)}, so no exit after block "
                            f"{e}; exits are 1-based block numbers")
        if reasons[e] is not None:
            raise SpecError(f"depth.exits: no exit after block {e} of {g.name}: {reasons[e]}; "
                            f"see 'vitgraph inspect' for the blocks, and drop {e} from depth.exits")
    if spec.depth.exit is not None and spec.depth.exit not in exits:
        raise SpecError(f"depth.exit {spec.depth.exit} is not one of depth.exits {list(exits)}; add it there")
    return exits, path


def instrument(g: VitGraph, spec: Spec, *, calibration: Iterable[tuple[Tensor, Tensor]] | None = None
               ) -> GatedModel:
    """Insert the spec's gates into a copy of ``g``'s graph and attach its width method and depth gates."""
    _unsupported(spec)
    depth_on, exits_on = spec.depth.skip_blocks, bool(spec.depth.exits)
    if not spec.width.enabled and not depth_on and not exits_on:
        raise SpecError("the spec compresses nothing: set width.heads and/or width.mlp, depth.skip_blocks or "
                        "depth.exits")
    groups, skipped = _chosen_groups(g, spec) if spec.width.enabled else ([], {})
    if spec.width.enabled and not groups and not (depth_on or exits_on):
        reasons = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3])
        raise SpecError(f"{g.name}: the spec asks for width pruning but no site of this model allows it ({reasons})")
    gm = copy.deepcopy(g.gm)
    gates: dict[str, UnitGate] = {}
    if groups:
        p = InsertUnitGatesPass(groups, g.structure.blocks)
        gm = p(gm).gm
        gates = p.gates
    exits, path = _exits(g, spec)
    if exits:
        gm = InsertExitsPass(exits, g.structure.blocks, path)(gm).gm
    units, depth_skipped = depth_units(g.structure.blocks, spec.depth.per_branch) if depth_on else ([], {})
    if depth_on and not units:
        why = "; ".join(f"{k}: {v}" for k, v in list(depth_skipped.items())[:3])
        raise SpecError(f"depth.skip_blocks: no block of {g.name} can be skipped ({why}); set it to false")
    block_gates: dict[str, Any] = {}
    if units:
        bp = InsertBlockGatesPass(units)
        gm = bp(gm).gm
        block_gates = bp.gates

    sites = _sites(g, spec, gates)
    pricer = Pricer(g, [s.name for s in sites], units, exits, path)
    if spec.depth.exit is not None:
        pricer.exit = spec.depth.exit  # a fixed exit is priced from the start: the budget is met with it
    learned_width = spec.learned and bool(sites)
    depth = None
    if units:
        warmup = round(spec.depth.warmup * spec.train.search_steps)
        depth = DepthGates(units, spec.budget.flops, warmup=warmup, own_budget=not learned_width)
        depth.gates = block_gates
        depth.cost_fn = lambda: pricer({s.name: 1.0 for s in sites})
        pricer.depth_values = depth.values
    _check_budget(g, spec, sites, units, exits, pricer)

    importance = None
    if spec.width.method == "magnitude":
        importance = magnitude_importance(gm, sites)
    elif spec.width.method == "taylor" and sites:
        if calibration is None:
            raise SpecError("width.method taylor scores units with gradients and needs data: pass --data digits or "
                            "--data imagefolder:PATH, or use method magnitude with --data none")
        importance = taylor_importance(gm, gates, calibration, final_only=bool(exits))
    elif spec.width.method == "taylor":
        importance = {}
    method = build_method(spec.width.method, sites, pricer, spec.budget.flops, importance)
    gated = GatedModel(gm, g, spec, method, gates, skipped, depth=depth, pricer=pricer, exits=exits,
                       depth_skipped=depth_skipped)
    if depth is not None and spec.train.steps == 0:  # one-shot depth: skip what changes the stream least
        gated.one_shot_margins = influence(g.gm, units, [g.example_inputs])
    if importance is not None and depth is None and not exits:
        gated.freeze()  # one-shot width alone: the decisions are final now
    return gated


def _check_budget(g: VitGraph, spec: Spec, sites: list[Site], units: list, exits: tuple[int, ...],
                  pricer: Pricer) -> None:
    """Refuse a budget the allowed decisions cannot reach, before any training."""
    budget = spec.budget
    floor_width = {s.name: s.round(0.0) / s.units for s in sites}
    no_depth = torch.zeros(len(units)) if units else None
    shallowest = spec.depth.exit if spec.depth.exit is not None else (min(exits) if exits else None)
    floor = float(pricer(floor_width, depth=no_depth, exit=shallowest))
    if budget.flops < floor - budget.tolerance:
        raise SpecError(f"budget.flops {budget.flops} is impossible for {g.name} with this spec: pruning every "
                        f"allowed unit still leaves {floor:.3f} of the dense FLOPs; raise the budget or enable more "
                        f"axes")
    if sites or not units or exits:
        return
    # depth alone: only the sums of whole blocks (or branches) are reachable
    full = float(pricer({}, depth=torch.ones(len(units)), exit=None))
    costs = []
    for i in range(len(units)):
        keep = torch.ones(len(units))
        keep[i] = 0.0
        costs.append(full - float(pricer({}, depth=keep, exit=None)))
    near = reachable_fractions(costs, full)
    if not any(abs(f - budget.flops) <= budget.tolerance for f in near):
        below = max((f for f in near if f <= budget.flops), default=min(near))
        above = min((f for f in near if f >= budget.flops), default=max(near))
        hint = "" if spec.depth.per_branch else "set depth.per_branch: true (finer steps), "
        raise SpecError(f"budget.flops {budget.flops} is out of reach of depth alone for {g.name}: skipping whole "
                        f"{'branches' if spec.depth.per_branch else 'blocks'} gives {below:.3f} or {above:.3f} of the "
                        f"dense FLOPs, not within +-{budget.tolerance}; {hint}enable width pruning (width.heads / "
                        f"width.mlp) to close the gap, or set budget.flops near one of those")


def taylor_importance(gm: fx.GraphModule, gates: dict[str, UnitGate], batches: Iterable[tuple[Tensor, Tensor]],
                      max_batches: int = 8, final_only: bool = False) -> dict[str, Tensor]:
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
            out = gm(x)
            loss = nn.functional.cross_entropy(out[0] if final_only else out, y)
            grads = torch.autograd.grad(loss, [g.mask for g in gates.values()])
            for (name, _), grad in zip(gates.items(), grads):
                scores[name] += grad.abs()
    finally:
        for gate in gates.values():
            gate.mask = None
        gm.train(was_training)
    return scores


def materialize(gated: GatedModel) -> fx.GraphModule:
    """The compact graph: ``eval`` decisions baked in, pruned units, skipped blocks and everything
    after the chosen exit removed for real."""
    g = gated.graph
    removed = set(gated.removed_blocks())
    skipped_branches = {(u.block, u.kind) for u in gated.skipped_units() if u.kind != "block"}

    def dead(name: str) -> bool:  # a group whose block or branch goes anyway is left as it is
        group = g.structure.group(name)
        return group.block in removed or (group.block, group.branch) in skipped_branches

    kept = {k: v for k, v in gated.decisions().items() if not dead(k)}
    for gate in gated.gates.values():
        gate.mask = None
    if gated.depth is not None:
        for gate in gated.depth.gates.values():
            gate.u = None
    gm = copy.deepcopy(gated.gm)
    compact = RemovePrunedUnitsPass(g.structure.groups, g.structure.blocks, kept)(gm).gm
    if gated.depth is not None:
        compact = RemoveSkippedBlocksPass(gated.depth_decisions())(compact).gm
    if gated.exits:
        compact = TruncateAtExitPass(gated.exits, gated.exit_after())(compact).gm
    compact.eval()
    propagate_shapes(compact, g.example_inputs)  # node shapes describe the compact graph, not the dense one
    return compact
