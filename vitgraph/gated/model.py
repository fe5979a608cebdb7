"""``GatedModel``: the traced graph with the gates of every axis (built by ``vg.instrument``, see
``vitgraph.gated.build``): an ``nn.Module`` with three modes (``open``: exactly the original; ``train``: the
axes' differentiable masks and sampled gates; ``eval``: the hard decisions ``materialize`` bakes
in) and the hooks the training loop uses (``param_groups``, ``penalties``, ``aux_logits``,
``after_step``, ``freeze``, ``status``). Every hook loops over the axes; the ``Cost`` it is handed prices
all their decisions (it does not know whether in FLOPs or on a latency table), and one ``Budget`` term
(when a method learns against it) constrains them.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from vitgraph.analysis.graph import VitGraph
from vitgraph.axes import Axis
from vitgraph.cost.budget import Budget, Cost
from vitgraph.errors import SpecError
from vitgraph.spec import Spec

MODES = ("open", "train", "eval")


class GatedModel(nn.Module):
    """A traced ViT with the gates of its axes, the axes' methods, and the budget over all of them."""

    def __init__(self, gm: fx.GraphModule, graph: VitGraph, spec: Spec, axes: Sequence[Axis], cost: Cost) -> None:
        super().__init__()
        self.gm = gm
        self.graph = graph
        self.spec = spec
        self.axes = nn.ModuleDict({a.name: a for a in axes})
        self.flops_pricer = cost.flops     # the fraction of the dense FLOPs
        self.pricer = cost.budget          # what the budget constrains (FLOPs, predicted latency, or both)
        self.latency = cost.latency
        self.budget = Budget.for_axes(spec.budget.fraction, axes)
        self.aux_names = tuple(name for a in axes for name in a.aux_outputs)
        self.learned: float | None = None  # the cost of the learned decisions, before freeze projected them
        self.mode = "train"
        self._penalties: dict[str, Tensor] = {}
        self._aux: dict[str, Tensor] = {}

    # -- running --------------------------------------------------------------------------------
    def _run(self, *args: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """Set every gate for the current mode, run the graph: (the final output, auxiliary outputs)."""
        learning = self.mode == "train" and torch.is_grad_enabled()
        for axis in self.axes.values():
            axis.apply(self.mode)
            if learning:
                axis.see(args)
        out = self.gm(*args)
        self._penalties = self._losses() if learning else {}  # some read what this forward decided
        return (out[0], dict(zip(self.aux_names, out[1:]))) if self.aux_names else (out, {})

    def _losses(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for axis in self.axes.values():
            out.update(axis.penalties())
        if self.budget is not None and any(a.learns_budget() for a in self.axes.values()):
            out.update(self.budget.penalty(self.pricer("train")))
        return out

    def forward(self, *args: Any) -> Any:
        out, aux = self._run(*args)
        learning = self.mode == "train" and torch.is_grad_enabled()
        self._aux = {}
        for axis in self.axes.values():
            out, extra = axis.outputs(out, aux, self.mode, learning)
            self._aux.update(extra)
        return out

    @torch.no_grad()
    def outputs(self, *args: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """Every output of the gated graph in ``eval`` mode: the final one and the auxiliary ones by name."""
        was = self.training
        self.eval()
        try:
            with self.using("eval"):
                return self._run(*args)
        finally:
            self.train(was)

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
        """The axes' loss terms and the budget term from the last forward in ``train`` mode."""
        return dict(self._penalties)

    def aux_logits(self) -> dict[str, Tensor]:
        """Auxiliary logits of the last forward in ``train`` mode (exit classifiers; each gets the task loss)."""
        return dict(self._aux)

    def _owners(self) -> list[Any]:
        return [*self.axes.values(), *([self.budget] if self.budget is not None else [])]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        extra: dict[str, list[nn.Parameter]] = {}
        for owner in self._owners():
            for name, params in owner.param_groups().items():
                extra.setdefault(name, []).extend(params)
        method_params = {id(p) for ps in extra.values() for p in ps}
        weights = [p for p in self.gm.parameters() if id(p) not in method_params] + extra.get("weights", [])
        return {"weights": weights, **{k: v for k, v in extra.items() if k != "weights"}}

    def optim_defaults(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for owner in self._owners():
            for name, settings in owner.optim_defaults(self.spec.train.search_steps).items():
                if name in out and out[name] != settings:
                    raise SpecError(f"two axes ask for different optimizer settings of group {name!r}: {out[name]} "
                                    f"and {settings}; give one of them a group of its own (arch:NAME / dual:NAME)")
                out[name] = settings
        return out

    def after_step(self, step: int, lr: float) -> None:
        for axis in self.axes.values():
            axis.after_step(step, lr)

    @property
    def frozen(self) -> bool:
        return all(a.frozen for a in self.axes.values())

    @property
    def searches(self) -> bool:
        """Whether training should search first and ``freeze`` after (fit's two phases)."""
        return not self.frozen

    def freeze(self) -> None:
        """Fix every decision, axis by axis in ``freeze_order`` (exits, blocks, then the widths, which
        close the remaining gap to the budget); each prices what the earlier ones decided."""
        if self.learned is None:
            self.learned = float(self.pricer("eval"))
        for axis in sorted(self.axes.values(), key=lambda a: a.freeze_order):
            if not axis.frozen:
                axis.freeze(self.pricer, self.outputs)

    @torch.no_grad()
    def status(self) -> dict[str, float]:
        out = {"flops": float(self.flops_pricer("eval"))}
        if self.latency is not None:
            out["latency"] = float(self.pricer("eval"))
        for axis in self.axes.values():
            out.update(axis.status(self.pricer))
        return out

    # -- decisions and cost --------------------------------------------------------------------
    def decisions(self) -> dict[str, dict[str, Any]]:
        """Per axis, what ``eval`` mode decides (what ``materialize`` bakes in)."""
        return {name: axis.decisions() for name, axis in self.axes.items()}

    @property
    def serving_batch(self) -> int | None:
        """The one batch size the compact graph runs at (None: any batch)."""
        fixed = [b for a in self.axes.values() if (b := a.serving_batch) is not None]
        return min(fixed) if fixed else None

    def example_inputs(self) -> tuple[Tensor, ...]:
        """The dense graph's example inputs, cut to the serving batch."""
        b = self.serving_batch
        return tuple(x[:b] for x in self.graph.example_inputs) if b else self.graph.example_inputs

    def removed_blocks(self) -> list[int]:
        """Indices of the blocks the compact graph will not have."""
        return sorted(set().union(*(a.removed_blocks() for a in self.axes.values())))

    def cost(self) -> dict[str, float]:
        """FLOPs per image under the ``eval`` decisions, and their fraction of the dense model."""
        fraction = float(self.flops_pricer("eval"))
        return {"flops": fraction * self.graph.structure.flops, "fraction": fraction}

    def report(self) -> dict[str, Any]:
        """The axes' parts of report.json, one dictionary each (``vg.compress`` merges them key by key)."""
        return {name: axis.report() for name, axis in self.axes.items()}
