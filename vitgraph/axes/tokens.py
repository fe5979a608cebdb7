"""The token axis: selectors that keep the tokens that matter and fold the rest into package tokens.

Two methods (methods.md §3), both placed before the blocks of ``tokens.stages``:

* ``attention`` (one-shot, §3.7): a content token's score is the attention it receives from the prefix
  queries of the attention before the stage; the top K_s stay.
* ``spvit`` (learned, §3.1-3.4): a head-weight net and a shared local/global scorer per stage, Gumbel
  keep/drop while learning with the keys of dropped tokens masked in every later attention, the
  keep-ratio loss and token distillation (``vitgraph.axes.token_methods``); at freeze K_s is fixed.

K_s = round(rho_s x patches), rho_s from ``tokens.keep`` or, when empty, rho_s = base^s with base
bisected on the pricer so that the model lands on its budget, FLOPs or latency (scorer costs included).
Learned selectors with a learned width and no ``tokens.keep`` share one budget: the width's Lagrangian prices
their expected keep (``train`` factors) with the widths', no keep-ratio loss; at freeze K_s is what they learned
(``token_methods.on_budget``), the widths close the rest.
Instrument: ``InsertTokenSelectorsPass``; materialize: ``PackTokensPass`` (``static``: top-K,
fixed shapes; ``dynamic``: per-image gather, batch 1). Factors: ``tokens.<i>``, the fraction of the
dense token count entering block i; cost terms: the scorers.

Learned selectors combine with ``depth.skip_blocks``: the keep flags go from selector to selector and to the key
masks directly, never through the stream, so a skipped block (stream passed through) cuts nothing, and a stage's
own block may go (its selector stays, in front of the next block). With ``width.embed`` the scorers read each
head's kept channels (``LearnedTokenSelector.narrow``), so this axis then materializes after the widths (45).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from vitgraph.analysis.depth import cut_factor
from vitgraph.analysis.tokens import default_stages, mask_sites, score_source
from vitgraph.axes import joint
from vitgraph.axes.base import Axis, AxisContext, Factors, Pricer, Run
from vitgraph.axes.token_methods import SPViT, on_budget, refuse_combinations
from vitgraph.errors import SpecError
from vitgraph.meta import GATES, TOKENS, submodule_name
from vitgraph.passes.insert_token_selectors_pass import FINAL, InsertTokenSelectorsPass, Stage
from vitgraph.passes.pack_tokens_pass import PackTokensPass
from vitgraph.gates.tokens import FinalTokens, LearnedTokenSelector

if TYPE_CHECKING:
    from vitgraph.passes.base import VitPass

POOLINGS = ("token", "avg", "attn")


class TokenAxis(Axis):
    """Token selectors with package tokens: one-shot attention scores or SPViT's learned selectors."""

    name = "tokens"
    freeze_order = 30        # after exits and blocks, before the widths that close the rest
    materialize_order = 30

    def __init__(self, ctx: AxisContext, stages: list[Stage], masks: list[Any], final: str | None) -> None:
        super().__init__(ctx)
        info = ctx.graph.structure.tokens
        self.stages, self.masks, self.final_after = stages, masks, final
        self.prefix, self.tokens = info.prefix_tokens, info.tokens
        self.patches = info.tokens - info.prefix_tokens
        self.pool_mean = info.pooling == "avg"
        # the coupled group of the stream's channels (width.embed), whose kept fraction sizes each package
        self.stream = next((g.name for g in ctx.graph.structure.groups if g.kind == "embed"), None)
        self.learned = ctx.spec.tokens.method == "spvit"
        self.dynamic = ctx.spec.tokens.mode == "dynamic"
        self.calibration = ctx.calibration
        self.split: dict[str, Any] = {}  # how the budget's reduction was shared (report["budget"])
        self.register_buffer("kept", torch.full((len(stages),), -1, dtype=torch.long))  # K_s; -1: not frozen yet
        self.selectors: list[nn.Module] = []
        self.head_groups: list[str | None] = []
        self.head_gates: list[nn.Module | None] = []
        self.final: FinalTokens | None = None
        self.method: SPViT | None = None
        self.stream_gate: tuple[nn.Module, ...] = ()  # (the stream's unit gate,) under width.embed (a tuple: not registered)
        self._peers: tuple[Axis, ...] = ()  # the other axes (a tuple: not registered): who decides the stream's channels

    @classmethod
    def from_spec(cls, ctx: AxisContext) -> TokenAxis | None:
        t, g = ctx.spec.tokens, ctx.graph
        if not t.on:
            return None
        refuse_combinations(ctx)
        blocks, info = g.structure.blocks, g.structure.tokens
        if info.pooling not in POOLINGS:
            raise SpecError(f"tokens: {g.name}'s head pools its tokens as {info.pooling!r}, not from prefix tokens, "
                            f"a mean or an attention pool; token pruning cannot tell what it may drop")
        stages = t.stages or default_stages(blocks)
        if not stages:
            first = next((b for b in blocks if b.token_reason), None)
            why = f" (block {first.index}: {first.token_reason})" if first is not None else ""
            raise SpecError(f"tokens: no block of {g.name} can drop tokens{why}; drop the tokens section "
                            f"(`vitgraph inspect` gives each block's reason)")
        if t.keep and len(t.keep) != len(stages):
            raise SpecError(f"tokens.keep has {len(t.keep)} ratios for the {len(stages)} default stages {list(stages)}; "
                            f"give one per stage, or list tokens.stages")
        plans = [_stage(ctx, b, i) for i, b in enumerate(stages)]
        odd = next((x for x in blocks[stages[0]:] if x.tokens_in != info.tokens and not x.reads_stream(info.tokens)),
                   None)
        if odd is not None:
            count = f"{odd.tokens_in} token" + ("s" if odd.tokens_in != 1 else "")
            raise SpecError(f"tokens: block {odd.index} ({odd.name}) of {g.name} takes {count}, not the "
                            f"{info.tokens} of the token stream (it pools or re-forms the token axis), and a selector "
                            f"before block {stages[0]} would change its input; put every tokens.stages entry after "
                            f"block {odd.index}, or drop the tokens section")
        masks: Any = []
        if t.method == "spvit":
            masks = mask_sites(g.gm, blocks, stages)
            if isinstance(masks, str):
                raise SpecError(f"tokens.method spvit masks the keys of dropped tokens in every later attention, but "
                                f"{masks} in {g.name}; use tokens.method: attention")
        final = blocks[-1].output if t.method == "spvit" or info.pooling == "avg" else None
        return cls(ctx, plans, masks, final)

    def instrument_passes(self) -> list[VitPass]:
        return [InsertTokenSelectorsPass(self.stages, self.masks, self.final_after, self.pool_mean)]

    def setup(self, gm: fx.GraphModule) -> None:
        self.selectors = [gm.get_submodule(submodule_name(TOKENS, s.name)) for s in self.stages]
        # the heads group of each stage's score source, and its gate when width prunes those heads
        self.head_groups = [self._heads_group(s) for s in self.stages]
        self.head_gates = [_submodule(gm, submodule_name(GATES, h)) if h else None for h in self.head_groups]
        self.final = gm.get_submodule(FINAL) if self.final_after is not None else None
        # width.embed narrows the stream: the learned scorers read its kept channels (masked here, narrowed in
        # the compact graph), so they are packed after the widths have sliced the stream
        gate = _submodule(gm, submodule_name(GATES, self.stream)) if self.stream else None
        self.stream_gate = (gate,) if gate is not None else ()
        if self.learned and self.stream_gate:
            for stage, sel in zip(self.stages, self.selectors):
                if not isinstance(sel, LearnedTokenSelector):
                    continue
                if gate.units != stage.dim:  # (the stream's channels are its units, in order)
                    raise SpecError(f"tokens.method spvit with width.embed: {self.graph.name}'s stream group "
                                    f"{self.stream} has {gate.units} units, not the {stage.dim} channels the scorer "
                                    f"before {stage.name} reads; drop width.embed or use tokens.method attention")
                sel.stream_gate = self.stream_gate
            self.materialize_order = 45  # (instance value) after the widths' 40
        if self.learned:
            self.method = SPViT(self.graph, [s for s in self.selectors if isinstance(s, LearnedTokenSelector)],
                                self.final, self.patches, self.prefix)
            self.method.stream_gate = self.stream_gate
        if self.spec.tokens.keep:  # decided by the spec: learned axes search with the tokens already cut
            self.targets = list(self.spec.tokens.keep)
            if not self.learned:
                self.kept.copy_(torch.tensor(self.counts(list(self.spec.tokens.keep))))

    def _heads_group(self, stage: Stage) -> str | None:
        """The coupled group of the heads whose attention scores ``stage`` (None: learned, or no such group)."""
        if stage.source is None:
            return None
        a = self.graph.structure.blocks[stage.source.block].attention
        return next((g.name for g in self.graph.structure.groups if a is not None and g.kind == "heads"
                     and g.site == a.name), None)

    @property
    def targets(self) -> list[float] | None:
        """rho_s, the kept fraction of the patches after each stage (None until known)."""
        return self.method.targets() if self.method is not None else None

    @targets.setter
    def targets(self, rho: list[float]) -> None:
        if self.method is not None:
            self.method.set_targets(rho)

    @property
    def one_shot(self) -> bool:
        return not self.learned

    def apply(self, mode: str) -> None:
        active = mode != "open"
        k = self.kept.tolist()
        top_k = self.frozen and not self.dynamic
        for s, sel in enumerate(self.selectors):
            if isinstance(sel, LearnedTokenSelector):
                sel.mode = None if not active else int(k[s]) if top_k else mode
                sel.always_package = self.dynamic
            else:
                sel.keep = int(k[s]) if active and self.frozen else None
                sel.candidates = (k[s - 1] if s and active and self.frozen else self.patches)
                gate = self.head_gates[s] if s < len(self.head_gates) else None
                sel.head_gate = (gate,) if active and gate is not None else None
        if self.final is not None:
            packages = sum(self.drops(k)) if self.frozen and not self.learned else 0
            self.final.packages = packages if active and packages else None
            self.final.kept = int(k[-1]) if active and top_k and self.learned else None
            self.final.record = mode == "train" and self.learned

    def see(self, args: tuple[Any, ...]) -> None:
        if self.method is not None:
            self.method.see(args)

    # -- learning (spvit) ------------------------------------------------------------------------
    def penalties(self) -> dict[str, Tensor]:
        return self.method.losses(not self.frozen) if self.method is not None else {}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return self._own(self.method.param_groups()) if self.method is not None else {}

    def optim_defaults(self, search_steps: int) -> dict[str, dict[str, Any]]:
        return self._own(self.method.optim_defaults(search_steps)) if self.method is not None else {}

    def _own(self, groups: dict[str, Any]) -> dict[str, Any]:
        """The selectors' ``arch`` group, as ``arch:tokens`` when another axis learns in ``arch`` (its settings)."""
        clash = any("arch" in a.param_groups() for a in self._peers)
        return {("arch:tokens" if k == "arch" and clash else k): v for k, v in groups.items()}

    # -- freezing --------------------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return bool((self.kept >= 0).all())

    def counts(self, rho: list[float]) -> list[int]:
        return [max(1, min(self.patches, round(r * self.patches))) for r in rho]

    def drops(self, kept: list[int]) -> list[bool]:
        """Whether each stage drops something (and so appends a package)."""
        return [self.dynamic or k < (kept[s - 1] if s else self.patches) for s, k in enumerate(kept)]

    def freeze(self, pricer: Pricer, run: Run) -> None:
        """K_s from the targets (``tokens.keep``, or spvit's), else the budget's share (all, or ``axes.joint``'s)."""
        before = float(pricer("eval", {self.name: {}}))
        rho = self.targets
        later = self._later(pricer)
        if rho is None and self._shares(later):  # learned under the widths' budget: start from what was learned
            self._freeze_learned(pricer, later, before)
            return
        if rho is not None or not later:
            self.kept.copy_(torch.tensor(self.counts(rho) if rho is not None else self._from_budget(pricer)))
            self.split = self._split(later, before, float(pricer("eval")), self.spec.budget.fraction)
            return
        target = self.spec.budget.fraction

        def place(share: float) -> None:
            self.kept.copy_(torch.tensor(self._from_budget(pricer, before - share * (before - target))))

        inputs = self._batch()
        with torch.no_grad():
            reference = self.graph.gm(*inputs)
        share, trials = joint.split(place, later, pricer, run, inputs, reference, target, self.spec.budget.slack)
        place(share)
        final = next(t.cost for t in trials if t.share == share)
        self.split = self._split(later, before, float(pricer("eval")), final)
        self.split["criterion"] = "output distortion on " + ("a calibration batch" if self.calibration is not None
                                                             else "the example inputs (data-free)")
        self.split["candidates"] = {f"{t.share:.3f}": {"cost": round(t.cost, 4), "distortion": round(t.distortion, 6)}
                                    for t in trials}

    def _freeze_learned(self, pricer: Pricer, later: list[Axis], before: float) -> None:
        """K_s from the keep fractions the selectors learned under the shared budget, moved only where the later
        axes could not close the gap from there (``on_budget``); the split is the learned one."""
        target = self.spec.budget.fraction

        def cost(rho: list[float], mode: str) -> float:
            return float(pricer("eval", {self.name: self.as_factors(self.counts(rho)),
                                         **{a.name: a.factors(mode) for a in later}}))
        learned = self.method.learned()  # (set up: spvit)
        rho = on_budget(learned or [1.0] * len(self.stages), cost, target)
        self.kept.copy_(torch.tensor(self.counts(rho)))
        self.split = self._split(later, before, cost(rho, "full"), target)
        self.split.update(how="learned: one Lagrangian priced the selectors' expected keep and the widths' "
                              "expected units; the widths close the rest at freeze",
                          learned_keep=[round(r, 4) for r in learned] if learned else None,
                          keep=[round(k / self.patches, 4) for k in self.kept.tolist()])

    def _shares(self, later: list[Axis]) -> bool:  # learned selectors and a learned axis after them: one budget
        return self.learned and not self.spec.tokens.keep and any(not a.one_shot for a in later)

    def _later(self, pricer: Pricer) -> list[Axis]:
        return [a for a in pricer.axes if not a.frozen and a.freeze_order > self.freeze_order]

    def _split(self, later: list[Axis], before: float, first: float, final: float) -> dict[str, Any]:
        """This axis's share of the budget's reduction and the later axes' (see ``axes.joint``)."""
        mine = joint.realised(before, first, final) if later else 1.0
        return {"split": {self.name: round(mine, 4), **{a.name: round((1.0 - mine) / len(later), 4) for a in later}}}

    def _batch(self) -> tuple[Tensor, ...]:
        """The batch the joint allocation scores candidates on: the first calibration batch, else the example inputs."""
        if self.calibration is not None:
            for x, _ in self.calibration:
                return (x[:32],)
        return tuple(self.graph.example_inputs)

    def _from_budget(self, pricer: Pricer, target: float | None = None) -> list[int]:
        """rho_s = base^s, base bisected so that the priced cost lands nearest ``target`` (the budget)."""
        target = self.spec.budget.fraction if target is None else target
        n = len(self.stages)

        def at(base: float) -> tuple[float, list[int]]:
            k = self.counts([base ** (s + 1) for s in range(n)])
            return float(pricer("eval", {self.name: self.as_factors(k)})), k

        lo, hi = 0.0, 1.0
        best = at(hi)
        for _ in range(40):
            mid = (lo + hi) / 2
            cost, k = at(mid)
            if abs(cost - target) < abs(best[0] - target):
                best = (cost, k)
            lo, hi = (mid, hi) if cost < target else (lo, mid)
        return best[1]

    def check_budget(self, pricer: Pricer) -> None:
        self._peers = tuple(a for a in pricer.axes if a is not self)
        if self.frozen:  # tokens.keep, one-shot: decided already; the axes after it take the rest
            before = float(pricer("eval", {self.name: {}}))
            self.split = self._split(self._later(pricer), before, float(pricer("eval")), self.spec.budget.fraction)
        learned = [a.name for a in self._later(pricer) if not a.one_shot]
        if learned and not self.spec.tokens.keep and not self.learned:
            raise SpecError(f"tokens.keep is empty and {', '.join(learned)} learns after the token ratios are fixed: "
                            f"the joint split of the budget scores frozen one-shot decisions, and a learned width "
                            f"has none yet; list tokens.keep (one ratio per stage), use a one-shot width method "
                            f"(magnitude, taylor), or tokens.method spvit (learns under the width's budget)")
        if self.learned and self.targets is None and not self._shares(self._later(pricer)):
            if self._later(pricer):  # the keep-ratio loss needs its targets before learning
                raise SpecError("tokens.method spvit learns toward keep ratios fixed before training, so it cannot "
                                "share the budget with one-shot widths deciding after it; list tokens.keep (one "
                                "ratio per stage), or use a learned width method (wdpruning, uvc)")
            self.targets = [k / self.patches for k in self._from_budget(pricer)]

    # -- pricing ---------------------------------------------------------------------------------
    def as_factors(self, kept: list[Any], drops: list[bool] | None = None) -> Factors:
        """tokens.<i>: the tokens entering block i (prefix + kept + packages so far) over the dense count;
        ``tokens.stage.<s>`` (no node's factor; for ``cost_terms``): stage s's candidates, the packages
        before it, and whether it packs."""
        out: Factors = {}
        starts = [s.block for s in self.stages] + [len(self.graph.structure.blocks)]
        packages = 0
        for s, (k, drop) in enumerate(zip(kept, self.drops(kept) if drops is None else drops)):
            out[f"tokens.stage.{s}"] = (kept[s - 1] if s else self.patches, packages, drop)
            packages += drop
            for i in range(starts[s], starts[s + 1]):
                out[f"tokens.{i}"] = (self.prefix + k + packages) / self.tokens
        return out

    def factors(self, mode: str) -> Factors:
        if self.frozen:
            return self.as_factors(self.kept.tolist())
        if mode == "floor":
            return self.as_factors([1] * len(self.stages))
        rho = self.targets
        if rho is None and self.method is not None:  # a shared budget: what the selectors learn (train: differentiable)
            expected = self.method.expected
            if mode == "train" and expected is not None:
                return self.as_factors([e * self.patches for e in expected], [True] * len(self.stages))
            rho = self.method.learned()
        return self.as_factors(self.counts(rho)) if rho is not None and mode in ("eval", "train") else {}

    def cost_terms(self, factors: Factors) -> dict[str, Any]:
        """Each packing stage: its scorer (one row of logits per prefix query, all rows without a prefix;
        or the learned scorer's linears over the content tokens) and the package's weighted sum."""
        out = {}
        width = self.graph.structure.tokens.embed_dim * (factors.get(self.stream, 1.0) if self.stream else 1.0)
        for i, (s, sel) in enumerate(zip(self.stages, self.selectors)):
            if f"tokens.stage.{i}" not in factors or self._cut_before(s, factors):
                continue
            candidates, before, drops = factors[f"tokens.stage.{i}"]
            if not drops:
                continue
            out[s.name] = 2.0 * candidates * width
            if isinstance(sel, LearnedTokenSelector):
                stream = factors.get(self.stream, 1.0) if self.stream_gate else 1.0
                out[s.name] += sel.flops_per_token(stream) * (candidates + before)
            elif s.source is not None and s.source.scale is not None:  # (probabilities: computed anyway)
                src, n = s.source, self.prefix + candidates + before
                heads = factors.get(self.head_groups[i], 1.0) if self.head_groups[i] else 1.0  # kept ones only
                out[s.name] += 2.0 * src.heads * heads * src.head_dim * n * (self.prefix if self.prefix else n)
        return out

    OPS_PER_STAGE = 16  # (measured) the runtime ops one static packing stage adds: scores, top-K, gathers, package

    def op_terms(self, factors: Factors) -> dict[str, Any]:
        """Each packing stage that drops tokens adds its packaging ops (the latency model's ``ops``)."""
        return {s.name: float(self.OPS_PER_STAGE) for i, s in enumerate(self.stages)
                if f"tokens.stage.{i}" in factors and factors[f"tokens.stage.{i}"][2] and not self._cut_before(s, factors)}

    def _cut_before(self, stage: Stage, factors: Factors) -> bool:
        """Whether the model is cut at an exit before ``stage``'s block (``cut.<e>`` 0, e < block, 1-based e):
        the selector goes with the blocks after the exit."""
        return any(factors.get(cut_factor(e)) == 0 for e in range(1, stage.block))

    # -- results ---------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return f"tokens ({self.spec.tokens.method})"

    def decisions(self) -> dict[str, int]:
        return {s.name: int(k) for s, k in zip(self.stages, self.kept.tolist())}

    @property
    def serving_batch(self) -> int | None:
        return 1 if self.dynamic else None

    def needed_blocks(self) -> dict[int, str]:
        return {s.source.block: f"its attention scores the tokens before {s.name}" for s in self.stages
                if s.source is not None}

    def materialize_passes(self) -> list[VitPass]:
        k = self.kept.tolist()
        kept = {s.name: ((k[i - 1] if i else self.patches), k[i]) if k[i] >= 0 else None
                for i, s in enumerate(self.stages)}
        return [PackTokensPass(kept, self.dynamic and self.frozen, self._stream_channels())]

    def _stream_channels(self) -> list[int] | None:
        """The stream's kept channels, as the axis deciding them (width.embed) keeps them; None: all."""
        if not self.learned or not self.stream_gate:
            return None
        for axis in self._peers:
            kept = axis.decisions()
            if isinstance(kept, dict) and self.stream in kept:
                return list(kept[self.stream])
        raise SpecError(f"tokens: the stream's channels are gated ({self.stream}) but no axis decides them; "
                        f"build the model with vg.instrument, which hands the token axis its sibling axes")

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.spec.tokens.method, "mode": self.spec.tokens.mode,
                               "stages": [s.block for s in self.stages], "kept_tokens": self.decisions(),
                               "patches": self.patches, "prefix": self.prefix}
        if self.targets is not None:
            out["keep_targets"] = [round(r, 4) for r in self.targets]
        if self.dynamic:
            out["dynamic"] = "the compact graph keeps each image's own tokens (batch 1); kept_tokens are the targets"
        if self.pool_mean:
            out["pooling"] = "mean over the kept content tokens, without packages (not over every patch)"
        return {"tokens": out, **({"budget": self.split} if self.split else {})}


def _stage(ctx: AxisContext, b: int, i: int) -> Stage:
    g, info = ctx.graph, ctx.graph.structure.tokens
    blocks = g.structure.blocks
    if b >= len(blocks):
        raise SpecError(f"tokens.stages: {g.name} has blocks 0..{len(blocks) - 1}, so no block {b}")
    why = blocks[b].token_reason if not blocks[b].token_prunable else None
    source = None
    if why is None and ctx.spec.tokens.method == "attention":
        found = score_source(g.gm, blocks, info, b)
        why, source = (found, None) if isinstance(found, str) else (None, found)
    if why is not None:
        raise SpecError(f"tokens.stages: {g.name} cannot drop tokens before block {b} ({blocks[b].name}): "
                        f"{why}; see 'vitgraph inspect' and pick other stages")
    a = blocks[b].attention
    return Stage(b, blocks[b].name, blocks[b].input, source, info.prefix_tokens, info.tokens - info.prefix_tokens,
                 i, info.embed_dim, a.heads if a is not None else 1)


def _submodule(gm: fx.GraphModule, target: str) -> nn.Module | None:
    try:
        return gm.get_submodule(target)
    except AttributeError:
        return None
