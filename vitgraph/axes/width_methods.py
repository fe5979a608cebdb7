"""Width methods: which units of each gated group to keep, learned or scored.

A method owns the parameters that decide (scores, thresholds, counts, per-group multipliers) and
turns them into per-group masks for the three modes of methods.md §0. Every method ends the same
way: ``freeze`` takes its hard decisions, projects the kept counts onto the FLOPs budget
(``allocate``) and stores them as buffers; from then on the masks are those buffers, and
``materialize`` bakes exactly them in. The budget term itself is not a method's: ``expected()``
gives the kept fractions it learns with, and ``GatedModel``'s one ``Budget`` prices them.

* ``magnitude`` / ``taylor`` — one-shot importance, no training; ``width.allocation`` picks the
  per-group kept fractions: ``uniform`` (one keep ratio everywhere) or ``global`` (one ranking of
  normalised importance per group kind across the layers, ``allocate_global``).
* ``wdpruning`` — per-unit scores, per-group learnable threshold, top-k masks, priced by their
  expected kept fraction under the augmented Lagrangian (methods.md §2).
* ``uvc`` — learned count of units to drop per group, lowest-norm groups selected, proximal
  shrinking, primal-dual updates under the plain Lagrangian (methods.md §4, width part).
* ``spvit`` — a learned keep logit per unit, concrete samples, under the quadratic FLOPs loss (methods.md
  §1, the MLP part of the attention->convolution search).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vitgraph.axes.base import Learner
from vitgraph.errors import SpecError
from vitgraph.gates.units import ceil_ste, clamp_ste, concrete, least_sum, ste_step, topk_hard
from vitgraph.axes.allocation import CostFn, Site, allocate, allocate_global
from vitgraph.spec import WIDTH_ALLOCATIONS

# -- the methods ---------------------------------------------------------------------------------
class WidthMethod(Learner):
    """Base: frozen decisions as buffers, budget projection, the mode logic."""

    name = "base"
    budget_form: str | None = None  # how it learns against the budget (see vitgraph.cost.budget.Budget)

    def __init__(self, sites: Sequence[Site], budget: float, weight: Callable[[str], Tensor]) -> None:
        super().__init__()
        self.sites = list(sites)
        self.budget = budget
        self.weight = weight  # parameter name -> the gated graph's live parameter
        for i, s in enumerate(self.sites):
            self.register_buffer(f"frozen_{i}", torch.ones(s.units, dtype=torch.bool))
        self.register_buffer("is_frozen", torch.zeros((), dtype=torch.bool))
        self.projection: dict[str, float] = {}

    # what subclasses provide
    def ranking(self) -> dict[str, Tensor]:
        """Per group, a score per unit: the higher, the more a unit deserves to stay."""
        raise NotImplementedError

    def learned_masks(self, mode: str) -> dict[str, Tensor]:
        """Per group, a mask over units (differentiable in ``train`` mode, hard in ``eval``)."""
        raise NotImplementedError

    def expected(self) -> dict[str, Any]:
        """Per group, the kept fraction the budget term prices while learning (differentiable)."""
        return {s.name: 1.0 for s in self.sites}

    # shared
    def frozen_masks(self) -> dict[str, Tensor]:
        return {s.name: getattr(self, f"frozen_{i}").float() for i, s in enumerate(self.sites)}

    def masks(self, mode: str) -> dict[str, Tensor] | None:
        if mode == "open":
            return None
        if bool(self.is_frozen):
            return self.frozen_masks()
        return self.learned_masks(mode)

    def kept_fractions(self, mode: str) -> dict[str, float]:
        masks = self.masks(mode) or {}
        return {s.name: float(masks[s.name].sum()) / s.units if masks else 1.0 for s in self.sites}

    @torch.no_grad()
    def freeze(self, cost: CostFn) -> None:
        """Fix the decisions: learned kept counts, projected onto the budget (priced by ``cost``),
        best-ranked units kept."""
        counts = {name: float(m.sum()) for name, m in self.learned_masks("eval").items()}
        before = float(cost({s.name: counts[s.name] / s.units for s in self.sites}))
        kept = self.project(counts, cost)
        ranking = self.ranking()
        for i, s in enumerate(self.sites):
            getattr(self, f"frozen_{i}").copy_(s.top(ranking[s.name], kept[s.name]).bool())
        self.is_frozen.fill_(True)
        self.projection = {"learned": before, "final": float(cost(self.kept_fractions("eval")))}

    def project(self, counts: Mapping[str, float], cost: CostFn) -> dict[str, int]:
        """Kept counts on the budget, shaped like the learned counts (``allocate``). Learned methods
        keep this shape whatever ``width.allocation`` says: they learn per-layer widths already."""
        fractions = {s.name: max(counts[s.name], 1.0) / s.units for s in self.sites}
        return allocate(self.sites, fractions, self.budget, cost)

    # weights the methods read
    def consumer_weight(self, site: Site) -> Tensor:
        return self.weight(site.consumer)

    def tie_broken(self, learned: Sequence[Tensor]) -> dict[str, Tensor]:
        """Learned per-unit values first; the consumer column norm breaks the ties of untrained ones."""
        out = {}
        for i, s in enumerate(self.sites):
            norms = self.column_norms(s)
            out[s.name] = learned[i].detach() + 1e-6 * norms / (1 + norms.max())
        return out

    def column_norms(self, site: Site) -> Tensor:
        """Squared norm of each unit's consumer columns (W_o head columns, W_2 unit columns)."""
        w = self.consumer_weight(site).detach().float()  # (out, in), or (out, in, 1, 1) for a pointwise conv
        cols = w.pow(2).transpose(0, 1).reshape(w.shape[1], -1).sum(1)
        owner = site.channel_unit.to(cols.device)
        keep = owner >= 0
        return torch.zeros(site.units, device=cols.device).index_add_(0, owner[keep], cols[keep])


class OneShot(WidthMethod):
    """Importance from weights (``magnitude``) or from gradients on calibration data (``taylor``).

    ``allocation``: ``uniform`` keeps one fraction in every group, projected onto the budget;
    ``global`` ranks normalised importance across the layers per kind (``allocate_global``).
    """

    def __init__(self, sites: Sequence[Site], budget: float, weight: Callable[[str], Tensor],
                 importance: Mapping[str, Tensor], name: str, allocation: str = "uniform") -> None:
        super().__init__(sites, budget, weight)
        if allocation not in WIDTH_ALLOCATIONS:
            raise SpecError(f"width.allocation {allocation!r} is not one of {', '.join(WIDTH_ALLOCATIONS)}")
        self.name = name
        self.allocation = allocation
        for i, s in enumerate(self.sites):
            self.register_buffer(f"importance_{i}", importance[s.name].detach().float().clone())

    def project(self, counts: Mapping[str, float], cost: CostFn) -> dict[str, int]:
        if self.allocation == "global":
            return allocate_global(self.sites, self.ranking(), self.budget, cost)
        return super().project(counts, cost)

    def ranking(self) -> dict[str, Tensor]:
        return {s.name: getattr(self, f"importance_{i}") for i, s in enumerate(self.sites)}

    def learned_masks(self, mode: str) -> dict[str, Tensor]:
        return {s.name: torch.ones(s.units) for s in self.sites}  # uniform shape; freeze() projects it


class WDPruning(WidthMethod):
    """Scores + a threshold per group; k = ceil(sigmoid(t) n) aligned; mask = top-k(scores)."""

    name = "wdpruning"
    budget_form = "augmented"

    def __init__(self, sites: Sequence[Site], budget: float, weight: Callable[[str], Tensor]) -> None:
        super().__init__(sites, budget, weight)
        self.scores = nn.ParameterList([nn.Parameter(torch.zeros(s.units)) for s in self.sites])
        self.thresholds = nn.ParameterList([nn.Parameter(torch.tensor(10.0)) for _ in self.sites])

    def _k(self, site: Site, t: Tensor) -> Tensor:
        keep = torch.sigmoid(t)
        a = site.align if site.units % site.align == 0 and site.units >= site.align else 1
        raw = ceil_ste(keep * site.units / a) * a  # ceil(sigmoid(t) n) rounded up to the alignment
        return clamp_ste(raw, max(a if site.min_units else 0, site.min_units), site.units)

    def ranking(self) -> dict[str, Tensor]:
        return self.tie_broken(list(self.scores))

    def learned_masks(self, mode: str) -> dict[str, Tensor]:
        out = {}
        ranking = self.ranking() if mode != "train" else None
        for i, s in enumerate(self.sites):
            k = self._k(s, self.thresholds[i])
            scores = self.scores[i] if mode == "train" else ranking[s.name]
            out[s.name] = s.top(scores, k) if mode == "train" else s.top(scores, int(k.item()))
        return out

    def expected(self) -> dict[str, Any]:
        """The expected kept fraction sigmoid(t) of each group (at least one unit)."""
        return {s.name: torch.maximum(torch.sigmoid(self.thresholds[i]), torch.tensor(1.0 / s.units))
                for i, s in enumerate(self.sites)}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"weights": list(self.scores), "arch": list(self.thresholds)}

    def optim_defaults(self, search_steps: int) -> dict[str, dict[str, Any]]:
        # (decision) the paper's threshold lr 2.5e-3 assumes ~100 epochs; scale it to the search so that,
        # under the cosine schedule, a threshold can travel from 10 (keep all) to about 0 (keep half);
        # twice that overshot to 0.17 of the FLOPs on the demo before the projection brought it back.
        arch_lr = max(2.5e-3, 20.0 / max(1, search_steps))
        # (decision) no first moment for thresholds: with Adam's momentum they coast well past the budget
        # once the Lagrangian falls silent (0.28 of the FLOPs for a 0.5 target on the demo)
        return {"arch": {"lr": arch_lr, "weight_decay": 0.0, "schedule": "cosine", "optimizer": "adamw",
                         "beta1": 0.0}}


class UVC(WidthMethod):
    """Learned fraction of units to drop per group; the lowest-norm units are the ones dropped.

    (decision) Counts are learned as fractions of the group (``removed = ceil(c n)``), so one step
    size serves 6 heads and 1536 MLP units alike; methods.md learns raw counts over ~75k steps.
    """

    name = "uvc"
    budget_form = "linear"

    def __init__(self, sites: Sequence[Site], budget: float, weight: Callable[[str], Tensor]) -> None:
        super().__init__(sites, budget, weight)
        self.counts = nn.ParameterList([nn.Parameter(torch.zeros(())) for _ in self.sites])
        # y_eff = 0.01 y: with the dual group's step 1, y_eff rises by 1e-4 x LeastSum per step (methods.md
        # §4.5) while the budget's z rises by (R - B)
        self.y = nn.Parameter(torch.full((len(self.sites),), 0.1))

    def _removed(self, i: int, s: Site) -> Tensor:
        return clamp_ste(ceil_ste(self.counts[i] * s.units, clip=1.0), 0, s.units - max(1, s.min_units))

    def ranking(self) -> dict[str, Tensor]:
        return {s.name: self.column_norms(s) for s in self.sites}

    def learned_masks(self, mode: str) -> dict[str, Tensor]:
        if mode == "train":  # stage 1 does not mask: proximal steps shrink the selected groups instead
            return {s.name: torch.ones(s.units) for s in self.sites}
        return {s.name: 1.0 - s.top(-self.column_norms(s), int(self._removed(i, s).item()))
                for i, s in enumerate(self.sites)}

    def expected(self) -> dict[str, Any]:
        return {s.name: 1.0 - self._removed(i, s) / s.units for i, s in enumerate(self.sites)}

    def penalties(self) -> dict[str, Tensor]:
        if bool(self.is_frozen):
            return {}
        terms = [0.01 * self.y[i] * least_sum(self.column_norms(s), self._removed(i, s))
                 for i, s in enumerate(self.sites)]
        return {"groups": torch.stack(terms).sum()}

    @torch.no_grad()
    def after_step(self, step: int, lr: float) -> None:
        if bool(self.is_frozen):
            return
        for i, s in enumerate(self.sites):
            self.counts[i].clamp_(0.0, 1.0 - max(1, s.min_units) / s.units)
        masks = self.learned_masks("eval")  # once per step, after the counts are clamped
        for i, s in enumerate(self.sites):
            selected = 1.0 - masks[s.name]
            if selected.any():
                w = self.consumer_weight(s)
                cols = torch.cat([selected, selected.new_zeros(1)])[s.channel_unit.to(w.device)].bool()
                w[:, cols] /= 1.0 + 2.0 * lr * 0.01 * float(self.y[i])

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"arch": list(self.counts), "dual": [self.y]}

    def optim_defaults(self, search_steps: int) -> dict[str, dict[str, Any]]:
        return {"arch": {"lr": 0.02, "weight_decay": 0.0, "schedule": "constant", "optimizer": "sgd"},
                "dual": {"lr": 1.0, "weight_decay": 0.0, "schedule": "constant", "optimizer": "sgd"}}


class SPViTUnits(WidthMethod):
    """One learned logit per unit (methods.md §1.1, the MLP part of SPViT's conv search): while learning
    a unit is kept by a binary-concrete sample of sigmoid(phi) (one draw per forward); eval keeps
    sigmoid(phi) > 0.5; the budget prices sum_j 1[sigmoid(phi_j) > 0.5] with the surrogate gradient of
    sigmoid(sigmoid(phi) - 0.5), under the quadratic FLOPs loss it shares with ``attention.to_conv``."""

    name = "spvit"
    budget_form = "quadratic"

    def __init__(self, sites: Sequence[Site], budget: float, weight: Callable[[str], Tensor]) -> None:
        super().__init__(sites, budget, weight)
        self.logits = nn.ParameterList([nn.Parameter(torch.full((s.units,), 1.5)) for s in self.sites])

    def ranking(self) -> dict[str, Tensor]:
        return self.tie_broken(list(self.logits))

    def learned_masks(self, mode: str) -> dict[str, Tensor]:
        out = {}
        for i, s in enumerate(self.sites):
            q = torch.sigmoid(self.logits[i])
            m = concrete(q, 1.0) if mode == "train" else (q.detach() > 0.5).float()
            if s.min_units and not bool(m.detach().any()):  # a group that may not vanish keeps its best unit
                m = torch.maximum(m, topk_hard(q.detach(), 1))
            out[s.name] = m
        return out

    def expected(self) -> dict[str, Any]:
        out = {}
        for i, s in enumerate(self.sites):
            q = torch.sigmoid(self.logits[i])
            out[s.name] = ste_step(q, torch.sigmoid(q - 0.5)).mean()
        return out

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"arch": list(self.logits)}

    def optim_defaults(self, search_steps: int) -> dict[str, dict[str, Any]]:
        # methods.md §1.5: arch AdamW lr 1e-3, wd 0, every step
        return {"arch": {"lr": 1e-3, "weight_decay": 0.0, "schedule": "constant", "optimizer": "adamw"}}


def build_method(method: str, sites: Sequence[Site], budget: float, weight: Callable[[str], Tensor],
                 importance: Mapping[str, Tensor] | None = None, allocation: str = "uniform") -> WidthMethod:
    """The spec's width method over ``sites``. ``allocation`` (``width.allocation``) shapes the one-shot
    methods' kept fractions; the learned ones (wdpruning, uvc, spvit) ignore it: they learn per-layer
    widths, and their projection onto the budget keeps the learned shape."""
    if method in ("magnitude", "taylor"):
        if importance is None:
            raise SpecError(f"width.method {method} needs importance scores")
        return OneShot(sites, budget, weight, importance, method, allocation)
    if method == "wdpruning":
        return WDPruning(sites, budget, weight)
    if method == "uvc":
        return UVC(sites, budget, weight)
    if method == "spvit":
        return SPViTUnits(sites, budget, weight)
    raise SpecError(f"width.method {method!r} is not one of magnitude, taylor, wdpruning, uvc, spvit")
