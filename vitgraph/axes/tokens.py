"""The token axis: selectors that keep the most-attended tokens and fold the rest into package tokens.

Method ``attention`` (one-shot, methods.md §3.7, no training): before each stage block b, a content
token's score is the attention it receives from the prefix queries in block b-1 (from every query
when there is no prefix token); the top K_s stay, the rest become one score-weighted package token
appended at the end. K_s = round(rho_s x patches), rho_s from ``tokens.keep`` or, when empty, rho_s =
base^s with base bisected on the pricer so that the model lands on ``budget.flops`` (selector costs
included). Instrument: ``InsertTokenSelectorsPass``; materialize (``static``): ``PackTokensPass``.
Factors: ``tokens.<i>``, the fraction of the dense token count entering block i; cost terms: the
selectors' score products.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from vitgraph.analysis.tokens import default_stages, score_source
from vitgraph.axes.base import Axis, AxisContext, Factors, Pricer, Run
from vitgraph.errors import SpecError
from vitgraph.gates import DropPackages, TokenSelector
from vitgraph.meta import TOKENS, submodule_name
from vitgraph.passes.insert_token_selectors_pass import UNPACK, InsertTokenSelectorsPass, Stage
from vitgraph.passes.pack_tokens_pass import PackTokensPass

if TYPE_CHECKING:
    from vitgraph.passes.base import VitPass

POOLINGS = ("token", "avg", "attn")


class TokenAxis(Axis):
    """Static top-K token selectors with package tokens (one-shot attention scores)."""

    name = "tokens"
    freeze_order = 30        # after exits and blocks, before the widths that close the rest
    materialize_order = 30

    def __init__(self, ctx: AxisContext, stages: list[Stage], unpack_after: str | None) -> None:
        super().__init__(ctx)
        info = ctx.graph.structure.tokens
        self.stages = stages
        self.unpack_after = unpack_after
        self.prefix, self.tokens = info.prefix_tokens, info.tokens
        self.patches = info.tokens - info.prefix_tokens
        self.register_buffer("kept", torch.full((len(stages),), -1, dtype=torch.long))  # K_s; -1: not frozen yet
        self.selectors: list[TokenSelector] = []
        self.unpack: DropPackages | None = None

    @classmethod
    def from_spec(cls, ctx: AxisContext) -> TokenAxis | None:
        t, g = ctx.spec.tokens, ctx.graph
        if not t.on:
            return None
        for key, asked, alone in (("tokens.method spvit (learned selectors)", t.method == "spvit", "attention"),
                                  ("tokens.mode dynamic", t.mode == "dynamic", "static"),
                                  ("tokens with depth.skip_blocks", ctx.spec.depth.skip_blocks, ""),
                                  # the scores average q k^T over the heads; pruned heads would change them
                                  ("tokens with width.heads", ctx.spec.width.heads and ctx.spec.width.enabled,
                                   "false (MLP units combine)"),
                                  ("tokens with depth.exits", bool(ctx.spec.depth.exits), "")):
            if asked:
                fix = f"set it to {alone}" if alone else "drop one of the two"
                raise SpecError(f"{key} is not implemented yet; {fix} (tokens.method: attention, mode: static works)")
        blocks, info = g.structure.blocks, g.structure.tokens
        if info.pooling not in POOLINGS:
            raise SpecError(f"tokens: {g.name}'s head pools its tokens as {info.pooling!r}, not from prefix tokens, "
                            f"a mean or an attention pool; token pruning cannot tell what it may drop")
        stages = t.stages or default_stages(blocks)
        if not stages:
            raise SpecError(f"tokens: no block of {g.name} can drop tokens (see 'vitgraph inspect'); drop the tokens "
                            f"section")
        if t.keep and len(t.keep) != len(stages):
            raise SpecError(f"tokens.keep has {len(t.keep)} ratios for the {len(stages)} default stages {list(stages)}; "
                            f"give one per stage, or list tokens.stages")
        plans = []
        for i, b in enumerate(stages):
            if b >= len(blocks):
                raise SpecError(f"tokens.stages: {g.name} has blocks 0..{len(blocks) - 1}, so no block {b}")
            why = blocks[b].token_reason if not blocks[b].token_prunable else None
            source = score_source(g.gm, blocks, info, b) if why is None else why
            if isinstance(source, str):
                raise SpecError(f"tokens.stages: {g.name} cannot drop tokens before block {b} ({blocks[b].name}): "
                                f"{source}; see 'vitgraph inspect' and pick other stages")
            plans.append(Stage(b, blocks[b].name, blocks[b].input, source, info.prefix_tokens, i))
        if any(x.tokens_in != info.tokens for x in blocks[stages[0]:]):
            raise SpecError(f"tokens: {g.name}'s blocks after block {stages[0]} do not all see its {info.tokens} tokens")
        return cls(ctx, plans, blocks[-1].output if info.pooling == "avg" else None)

    def instrument_passes(self) -> list[VitPass]:
        return [InsertTokenSelectorsPass(self.stages, self.unpack_after)]

    def setup(self, gm: fx.GraphModule) -> None:
        self.selectors = [gm.get_submodule(submodule_name(TOKENS, s.name)) for s in self.stages]
        self.unpack = gm.get_submodule(UNPACK) if self.unpack_after is not None else None
        if self.spec.tokens.keep:  # decided by the spec: learned axes search with the tokens already cut
            self.kept.copy_(torch.tensor(self.counts(list(self.spec.tokens.keep))))

    @property
    def one_shot(self) -> bool:
        return True

    def apply(self, mode: str) -> None:
        active = mode != "open" and self.frozen
        for sel, k in zip(self.selectors, self.kept.tolist()):
            sel.keep = int(k) if active else None
        if self.unpack is not None:
            self.unpack.count = len(self.stages) if active else None

    # -- freezing --------------------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return bool((self.kept >= 0).all())

    def counts(self, rho: list[float]) -> list[int]:
        return [max(1, min(self.patches, round(r * self.patches))) for r in rho]

    def freeze(self, pricer: Pricer, run: Run) -> None:
        self.kept.copy_(torch.tensor(self._from_budget(pricer)))  # (explicit tokens.keep froze at setup)

    def _from_budget(self, pricer: Pricer) -> list[int]:
        """rho_s = base^s, base bisected so that the priced cost lands nearest the budget."""
        target, n = self.spec.budget.flops, len(self.stages)

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
        later = [a.name for a in pricer.axes if not a.frozen and a.freeze_order > self.freeze_order]
        if later and not self.spec.tokens.keep:
            raise SpecError(f"tokens.keep is empty, so the token ratios would take the whole budget before "
                            f"{', '.join(later)} decide; list tokens.keep (one ratio per stage) when combining axes")

    # -- pricing ---------------------------------------------------------------------------------
    def as_factors(self, kept: list[int]) -> Factors:
        """tokens.<i>: the tokens entering block i (prefix + kept + packages so far) over the dense count."""
        out: Factors = {}
        starts = [s.block for s in self.stages] + [len(self.graph.structure.blocks)]
        for s, k in enumerate(kept):
            for i in range(starts[s], starts[s + 1]):
                out[f"tokens.{i}"] = (self.prefix + k + s + 1) / self.tokens
        return out

    def factors(self, mode: str) -> Factors:
        if self.frozen:
            return self.as_factors(self.kept.tolist())
        return self.as_factors([1] * len(self.stages)) if mode == "floor" else {}

    def cost_terms(self, factors: Factors) -> dict[str, Any]:
        """The selectors' score products: one row of logits per prefix query (all rows without a prefix)."""
        if not factors:
            return {}
        out = {}
        for s in self.stages:
            src = s.source
            if src.scale is None:  # it reads the probabilities the attention computed anyway
                continue
            n = factors.get(f"tokens.{src.block}", 1.0) * self.tokens
            out[s.name] = 2.0 * src.heads * src.head_dim * n * (self.prefix if self.prefix else n)
        return out

    # -- results ---------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return f"tokens ({self.spec.tokens.method})"

    def decisions(self) -> dict[str, int]:
        return {s.name: int(k) for s, k in zip(self.stages, self.kept.tolist())}

    def materialize_passes(self) -> list[VitPass]:
        return [PackTokensPass({s.name: (k if k >= 0 else None) for s, k in zip(self.stages, self.kept.tolist())})]

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.spec.tokens.method, "mode": self.spec.tokens.mode,
                               "stages": [s.block for s in self.stages], "kept_tokens": self.decisions(),
                               "patches": self.patches, "prefix": self.prefix}
        if self.unpack_after is not None:
            out["pooling"] = "mean over the kept content tokens, without packages (not over every patch)"
        return {"tokens": out}
