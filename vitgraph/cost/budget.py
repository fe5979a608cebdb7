"""One cost model for every decision of every axis, and one budget constraint for every learned one.

``Pricer(g, axes)(mode)`` is the fraction of the dense model's FLOPs left under the axes'
decisions in ``mode`` (see ``vitgraph.axes.base``). Every node of the dense graph costs its FLOPs
times the product of its factors: those the cost model wrote on it (a coupled group's kept
fraction, ``block.<i>``, ``tokens.<i>``) and the *set factors* whose node sets hold it —
``branch.<i>.<kind>`` (the nodes only that residual branch computes; an axis that deletes the
branch sets it to 0) and whatever sets the axes declare (``cut.<e>``: what an exit after block e
removes). Values may be tensors, so a budget loss differentiates through it. Axes' ``cost_terms``
add what the dense graph does not have (a latency table also prices their ``op_terms``). With hard decisions it equals the compact graph's cost
exactly (tests/test_depth.py, tests/test_width.py).

The cost function is a table, ``(factor names, cost)`` rows (``flops_table``: the dense graph's
node FLOPs, nodes with the same factors summed): a latency budget is another table over the same
factors, passed as ``Pricer(g, axes, table=...)``, not another pricer.

``Budget`` is the constraint ``cost <= target`` as a min-max problem: dual variables take ascent
steps, the primal term prices the axes' ``train`` factors. Two forms, as the methods specify:
``augmented`` (WDPruning, methods.md §2.3: ``l1 gap + l2 gap^2``, ``gap = relu(cost - target)``)
and ``linear`` (UVC, methods.md §4.5: ``z (cost - target)``).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vitgraph.analysis.depth import branch_sets
from vitgraph.axes.base import PRICE_MODES, Axis, Decision, Factors
from vitgraph.analysis.graph import VitGraph
from vitgraph.meta import COST, NodeCost


Table = list[tuple[tuple[str, ...], float]]  # (factor names, cost of the nodes that carry exactly those)


def flops_table(g: VitGraph, sets: Mapping[str, frozenset[str]]) -> Table:
    """Per-image FLOPs of the dense graph's nodes, by the factors that scale them (the cost model's on the
    node, then the set factors whose node set holds it); nodes with the same factors are summed."""
    member: dict[str, list[str]] = defaultdict(list)
    for name, nodes in sets.items():
        for n in nodes:
            member[n].append(name)
    table: dict[tuple[str, ...], float] = defaultdict(int)
    for node in g.gm.graph.nodes:
        cost: NodeCost | None = node.meta.get(COST)
        if cost is not None and cost.flops:
            for flops, factors in cost.rows():
                table[factors + tuple(member.get(node.name, ()))] += flops
    return list(table.items())


class Pricer:
    """Prices the axes' decisions on the dense graph ``g``, as a fraction of its cost."""

    def __init__(self, g: VitGraph, axes: Sequence[Axis],
                 table: Callable[[VitGraph, Mapping[str, frozenset[str]]], Table] = flops_table,
                 terms: Mapping[str, float] | None = None, scale: float = 1.0) -> None:
        self.axes = list(axes)
        sets = branch_sets(g.gm, g.structure.blocks)
        for axis in self.axes:
            sets.update(axis.set_factors())
        self.terms = table(g, sets)
        # the dense graph's price over the reference's: 1 for FLOPs; a table measured on a quantized runtime
        # prices against the dense fp32 model, whose price is the dense graph's over its measured ratio
        self.dense = sum(cost for _, cost in self.terms) / scale
        # the axes' hooks adding what the dense graph lacks, and the table's units per unit of each
        self.terms_of = {"cost_terms": 1.0} if terms is None else dict(terms)

    def per_axis(self, mode: str = "eval", override: Mapping[str, Factors] | None = None) -> dict[str, Factors]:
        """Every axis's factors in ``mode``, or ``override[axis name]`` where given."""
        if mode not in PRICE_MODES:
            raise ValueError(f"price mode must be one of {PRICE_MODES}, got {mode!r}")
        return {a.name: override[a.name] if override is not None and a.name in override else a.factors(mode)
                for a in self.axes}

    def __call__(self, mode: str = "eval", override: Mapping[str, Factors] | None = None) -> Decision:
        """Fraction of the dense FLOPs left under the decisions of ``mode``. Two axes scaling the same factor
        multiply (a branch deleted by either is deleted); each axis's cost terms follow its own factors (and
        read the others': the width of the stream a token package sums over)."""
        own = self.per_axis(mode, override)
        kept: Factors = {}
        for factors in own.values():
            for k, v in factors.items():
                kept[k] = kept[k] * v if k in kept else v
        total: Any = 0
        for names, flops in self.terms:
            term: Any = flops
            for f in names:
                v = kept.get(f)
                if v is not None:
                    term = term * v
            total = total + term
        for hook, scale in self.terms_of.items():
            for axis in self.axes:  # its own factors, and the others' (a package's width is the stream's)
                for extra in getattr(axis, hook)({**kept, **own[axis.name]}).values():
                    total = total + extra * scale
        return total / self.dense


class BothPricer:
    """Two budgets that must both hold, as one cost in the units of the first: ``max(a, b * ta / tb)`` is at
    most ``ta`` exactly when ``a <= ta`` and ``b <= tb`` (latency and FLOPs given together)."""

    def __init__(self, first: Pricer, first_target: float, second: Pricer, second_target: float) -> None:
        self.first, self.second = first, second
        self.scale = first_target / second_target
        self.axes = first.axes

    def __call__(self, mode: str = "eval", override: Mapping[str, Factors] | None = None) -> Decision:
        a, b = self.first(mode, override), self.second(mode, override) * self.scale
        return torch.maximum(torch.as_tensor(a), torch.as_tensor(b)) if isinstance(a, Tensor) or isinstance(
            b, Tensor) else max(a, b)


class Budget(nn.Module):
    """The FLOPs budget as a loss term: a constraint with dual variables (the ``dual`` parameter group), or
    a fixed two-sided quadratic.

    * ``augmented`` (WDPruning): l1 relu(c - T) + l2 relu(c - T)^2, duals ascending;
    * ``linear`` (UVC): z (c - T), z ascending;
    * ``quadratic`` (SPViT conv, methods.md §1.4): lambda (T - c)^2 with lambda fixed; it also pulls
      the cost *up* toward T, and is soft: the search lands near T, the freeze projection closes the rest.
    """

    FORMS = ("augmented", "linear", "quadratic")
    QUADRATIC_WEIGHT = 20.0  # (decision) methods.md's DeiT-Ti lambda, on cost and T as fractions of dense

    def __init__(self, target: float, form: str) -> None:
        super().__init__()
        if form not in self.FORMS:
            raise ValueError(f"budget form must be one of {self.FORMS}, got {form!r}")
        self.target = target
        self.form = form
        # augmented: (l1, l2) from 0; linear: z from 1e-3 (methods.md §4.1); quadratic: none
        self.duals = nn.Parameter(torch.zeros(2) if form == "augmented" else torch.full((1,), 1e-3)) \
            if form != "quadratic" else None

    def penalty(self, cost: Tensor) -> dict[str, Tensor]:
        if self.form == "quadratic":
            return {"budget": self.QUADRATIC_WEIGHT * (self.target - cost) ** 2}
        if self.form == "linear":
            return {"budget": self.duals[0] * (cost - self.target)}
        gap = torch.relu(cost - self.target)  # zero (and no gradient) once within budget
        return {"lagrangian": self.duals[0] * gap + self.duals[1] * gap * gap}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"dual": [self.duals]} if self.duals is not None else {}

    def optim_defaults(self, search_steps: int) -> dict[str, dict[str, Any]]:
        if self.form == "quadratic":
            return {}
        if self.form == "linear":
            return {"dual": {"lr": 1.0, "weight_decay": 0.0, "schedule": "constant", "optimizer": "sgd"}}
        return {"dual": {"lr": 10.0, "weight_decay": 0.0, "schedule": "cosine", "optimizer": "sgd"}}

    @staticmethod
    def for_axes(target: float, axes: Sequence[Axis]) -> Budget | None:
        """One budget term for every axis that learns against the budget, in the form of the first one (in spec
        order) that does: ``width.method uvc`` with block gates learns both under UVC's plain Lagrangian."""
        form = next((a.budget_form for a in axes if a.budget_form is not None), None)
        return None if form is None else Budget(target, form)


class Cost:
    """What a gated model's decisions cost: ``flops`` (the fraction of the dense FLOPs) and ``budget`` (in the
    units ``budget`` constrains: FLOPs, the latency table's predicted ratio, or both). The gated model asks it
    for prices and never builds a pricer itself; ``latency`` is the measured table when there is one."""

    def __init__(self, g: VitGraph, axes: Sequence[Axis], spec: Any, latency: Any = None) -> None:
        self.flops = Pricer(g, axes)
        self.latency = latency
        b = spec.budget
        if b.latency is None or latency is None:
            self.budget: Pricer | BothPricer = self.flops
            return
        latency.check(g, b.target, b.batch, source=b.table or "the cached latency table")
        timed = latency.pricer(g, list(axes))
        self.budget = timed if b.flops is None else BothPricer(timed, b.latency, self.flops, b.flops)
