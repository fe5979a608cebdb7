"""The attention->convolution axis (SPViT, He et al.; methods.md §1): per attention site, a single-path
choice of ``msa`` / ``conv3`` / ``conv1`` / ``skip``, the convolutions derived from the site's own value
and output weights.

Instrument: ``InsertConvGatesPass`` (an ``AttentionConv`` on each site's projection output); learning:
``op_logits`` (``arch:conv``) under the two-sided quadratic FLOPs loss lambda (T - cost)^2 (the budget's
``quadratic`` form, shared with the MLP units of the ``spvit`` width method), the tap assignment and
BatchNorms with the weights; freeze: the eval decisions; materialize: ``AttentionToConvPass``.
Pricing: the set factor ``msa.<i>`` scales every node of block i's attention branch (1 = kept); the
conv branches are cost terms: conv3 = 20 S C d FLOPs, conv1 = 4 S C d, C times the embedding group's kept
fraction when ``width.embed`` narrows the stream (the convs' input and output channels are stream channels:
they read the value projection's gated input, and the materialized layers are sliced with the group).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from vitgraph.analysis.conv import ConvSite, conv_sites, stream_slices
from vitgraph.analysis.depth import branch_factor
from vitgraph.analysis.tokens import default_stages
from vitgraph.axes.base import Axis, AxisContext, Factors, Pricer, Run
from vitgraph.gates.conv import CHOICES, AttentionConv
from vitgraph.errors import SpecError
from vitgraph.meta import CONV_GATES, CoupledGroup, submodule_name
from vitgraph.passes.attention_to_conv_pass import AttentionToConvPass
from vitgraph.passes.insert_conv_gates_pass import InsertConvGatesPass

if TYPE_CHECKING:
    from vitgraph.passes.base import VitPass


class ConvAxis(Axis):
    """Single-path attention / 3x3 conv / 1x1 conv / skip per attention site."""

    name = "conv"
    freeze_order = 25        # after depth, before tokens and the widths that close the budget
    materialize_order = 25

    def __init__(self, ctx: AxisContext, sites: list[ConvSite], refused: dict[str, str],
                 stream: CoupledGroup | None = None) -> None:
        super().__init__(ctx)
        self.sites, self.refused = sites, refused
        self.stream = stream  # the embedding group the convolutions narrow with (width.embed), or None
        self.register_buffer("choice", torch.full((len(sites),), -1, dtype=torch.long))  # index in CHOICES
        self.gates: list[AttentionConv] = []

    @classmethod
    def from_spec(cls, ctx: AxisContext) -> ConvAxis | None:
        spec, g = ctx.spec, ctx.graph
        if not spec.attention.to_conv:
            return None
        sites, refused = conv_sites(g)
        stream = next((gr for gr in g.structure.groups if gr.kind == "embed"), None) \
            if spec.width.embed and spec.width.enabled else None
        if stream is not None:  # each conv's channels must be ones the group slices
            why = {s.name: r for s in sites if isinstance(r := stream_slices(s, stream), str)}
            refused.update(why)
            sites = [s for s in sites if s.name not in why]
        stages = (spec.tokens.stages or default_stages(g.structure.blocks)) if spec.tokens.on else ()
        first = min(stages) if stages else None
        if first is not None:  # token pruning breaks the grid: only blocks before the first stage convert
            last = first - 1 if spec.tokens.method == "attention" else first  # (its attention scores the stage)
            refused.update({s.name: f"it comes after the first token stage (block {first}) or its attention "
                                    f"scores that stage" for s in sites if s.block >= last})
            sites = [s for s in sites if s.block < last]
        if not sites:
            why = "; ".join(f"{k}: {v}" for k, v in list(refused.items())[:3])
            raise SpecError(f"attention.to_conv: no attention of {g.name} can become a convolution ({why}); "
                            f"see 'vitgraph inspect'")
        return cls(ctx, sites, refused, stream)

    def instrument_passes(self) -> list[VitPass]:
        return [InsertConvGatesPass(self.sites)]

    def setup(self, gm: fx.GraphModule) -> None:
        self.gates = [gm.get_submodule(submodule_name(CONV_GATES, s.name)) for s in self.sites]

    # -- running and learning ----------------------------------------------------------------------
    def apply(self, mode: str) -> None:
        for i, gate in enumerate(self.gates):
            if mode == "open":
                gate.choice = None
            elif self.frozen:
                gate.choice = CHOICES[int(self.choice[i])]
            else:
                gate.choice = "learn" if mode == "train" else gate.decision()

    @property
    def budget_form(self) -> str | None:
        return "quadratic"

    def learns_budget(self) -> bool:
        return not self.frozen

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"arch:conv": [g.op_logits for g in self.gates]}

    def optim_defaults(self, search_steps: int) -> dict[str, dict[str, Any]]:
        # methods.md §1.5: AdamW lr 1e-3, wd 0, every step, over ~25k steps. (decision) Over a shorter search
        # the three choice logits of a site get their own group whose lr lets them travel about 5 (from 1.5,
        # msa, to well below 0); MLP unit logits keep 1e-3. With one shared Adam lr the hundreds of unit
        # logits (Adam steps every parameter alike) met the budget alone on digits and no site converted.
        lr = max(1e-3, 5.0 / max(1, search_steps))
        return {"arch:conv": {"lr": lr, "weight_decay": 0.0, "schedule": "constant", "optimizer": "adamw"}}

    # -- freezing ----------------------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return bool((self.choice >= 0).all())

    def freeze(self, pricer: Pricer, run: Run) -> None:
        self.choice.copy_(torch.tensor([CHOICES.index(g.decision()) for g in self.gates]))

    # -- pricing -------------------------------------------------------------------------------------
    def set_factors(self) -> dict[str, frozenset[str]]:
        return {f"msa.{s.block}": s.msa_nodes for s in self.sites}

    def as_factors(self, gates: list[Any]) -> Factors:
        """``msa.<i>`` = km and ``conv.<i>`` (no node's factor) = (k1, k3, km) for ``cost_terms``."""
        out: Factors = {}
        for s, k in zip(self.sites, gates):
            out[f"msa.{s.block}"] = k[2]
            out[f"conv.{s.block}"] = (k[0], k[1], k[2])
        return out

    def factors(self, mode: str) -> Factors:
        if mode == "full":
            return {}
        if mode == "floor":
            return self.as_factors([(0.0, 0.0, 0.0)] * len(self.sites))
        if mode == "train" and not self.frozen:
            return self.as_factors([g.cost_gates() for g in self.gates])
        chosen = [CHOICES[int(c)] for c in self.choice] if self.frozen else [g.decision() for g in self.gates]
        return self.as_factors([tuple(float(CHOICES.index(c) > i) for i in range(3)) for c in chosen])

    def cost_terms(self, factors: Factors) -> dict[str, Any]:
        """The convolutions of each converted site, kept only as far as its block and branch are."""
        out = {}
        for s in self.sites:
            if f"conv.{s.block}" not in factors:
                continue
            k1, k3, km = factors[f"conv.{s.block}"]
            scd = s.patches * s.channels * s.dim * (factors.get(self.stream.name, 1.0) if self.stream else 1.0)
            kept = factors.get(f"block.{s.block}", 1.0) * factors.get(branch_factor(s.block, "attn"), 1.0)
            out[s.name] = (k3 * (1 - km) * 20.0 * scd + k1 * (1 - k3) * 4.0 * scd) * kept
        return out

    # -- results -------------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return "spvit_conv"

    def decisions(self) -> dict[str, str]:
        if self.frozen:
            return {s.name: CHOICES[int(c)] for s, c in zip(self.sites, self.choice)}
        return {s.name: g.decision() for s, g in zip(self.sites, self.gates)}

    def materialize_passes(self) -> list[VitPass]:
        return [AttentionToConvPass(self.sites, self.decisions(), self.stream)]

    def status(self, pricer: Pricer) -> dict[str, float]:
        d = list(self.decisions().values())
        return {"conv": float(sum(c in ("conv3", "conv1") for c in d)), "skip": float(d.count("skip"))}

    def report(self) -> dict[str, Any]:
        return {"conv": {"decisions": self.decisions(), "not_convertible": dict(self.refused)}}
