"""The compression-axis protocol: one lifecycle for every way of making a ViT smaller.

An axis is an ``nn.Module`` (its learned parameters and decision buffers live in checkpoints)
that owns three things: the instrument passes that put its gates into the graph, the method that
decides (learned or one-shot), and the materialize passes that bake the decisions in. ``GatedModel``,
the pricer and the training loop only ever loop over axes; none of them names one.

Lifecycle, in the order ``vg.instrument`` / ``fit`` / ``vg.materialize`` call it::

    axis = SomeAxis.from_spec(ctx)        # None: the spec does not ask for this axis
    axis.instrument_passes()              # run by the pass manager, in the spec's order of axes
    axis.setup(gm)                        # once, on the instrumented graph: build the method
    axis.check_budget(pricer)             # refuse a budget its decisions cannot reach
    # each forward:   axis.apply(mode); axis.see(args); gm(...); axis.penalties(); axis.outputs(...)
    # each step:      axis.after_step(step, lr)
    axis.freeze(pricer, run)              # once, in ``freeze_order``; then ``frozen`` is true
    axis.materialize_passes()             # in ``materialize_order``

Pricing: ``factors(mode)`` maps factor names to kept values. A factor is either one the cost model
writes on nodes (a coupled group's name, ``block.<i>``, ``tokens.<i>``) or a *set factor* an axis
or the pricer declares (``set_factors``: a name and the dense nodes it scales, e.g. ``cut.<e>``).
``cost_terms(factors)`` prices what the dense graph does not have (a node an axis adds or substitutes),
in FLOPs per image. Modes: ``eval`` (hard decisions), ``train`` (differentiable, what the budget
term learns from), ``full`` (nothing removed), ``floor`` (the most the axis may remove). A frozen
axis prices its frozen decisions in every mode.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch.fx as fx
from torch import Tensor, nn

if TYPE_CHECKING:
    from vitgraph.analysis.graph import VitGraph
    from vitgraph.passes.base import VitPass
    from vitgraph.spec import Spec

Decision = Any                    # a float, or a scalar tensor the budget differentiates through
Factors = dict[str, Decision]
Outputs = tuple[Tensor, dict[str, Tensor]]     # (the model's output, auxiliary outputs by name)
Run = Callable[..., Outputs]                   # runs the gated graph in ``eval`` mode on a batch
PRICE_MODES = ("eval", "train", "full", "floor")


class Pricer(Protocol):
    """What an axis sees of ``vitgraph.cost.budget.Pricer``: every axis, and the price of a mode
    (with some axes' factors overridden) as a fraction of the dense FLOPs."""

    axes: Sequence[Axis]

    def __call__(self, mode: str = "eval", override: Mapping[str, Factors] | None = None) -> Decision: ...


@dataclass(frozen=True)
class AxisContext:
    """What an axis is built from: the traced dense model, the spec, and data where the spec needs it."""

    graph: VitGraph
    spec: Spec
    calibration: Iterable[tuple[Tensor, Tensor]] | None = None  # batches for gradient-based scores
    val_data: Any = None                                        # (image, label) pairs for choices at freeze


class Learner(nn.Module):
    """The training-loop hooks an axis (and a method inside one) may implement; neutral defaults."""

    def penalties(self) -> dict[str, Tensor]:
        """Loss terms besides the budget (the budget term is ``GatedModel``'s)."""
        return {}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {}

    def optim_defaults(self, search_steps: int) -> dict[str, dict[str, Any]]:
        return {}

    def after_step(self, step: int, lr: float) -> None:
        """Run after each optimizer step (proximal updates, counters)."""


class Axis(Learner):
    """Base class with neutral defaults: an axis overrides what it does."""

    name: ClassVar[str] = "axis"
    freeze_order: ClassVar[int] = 50        # smaller freezes first (exits 10, depth 20, width 40)
    materialize_order: ClassVar[int] = 50   # smaller rewrites first (coarse removals before slicing)
    aux_outputs: tuple[str, ...] = ()       # names of the outputs its passes append to the graph's output

    def __init__(self, ctx: AxisContext) -> None:
        super().__init__()
        self.graph = ctx.graph
        self.spec = ctx.spec

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, ctx: AxisContext) -> Axis | None:
        """The axis the spec asks for on this model, or None; raise SpecError when it cannot apply."""
        return None

    def instrument_passes(self) -> list[VitPass]:
        return []

    def setup(self, gm: fx.GraphModule) -> None:
        """Called once on the instrumented graph, before training: build the method."""

    @property
    def one_shot(self) -> bool:
        """Whether the decisions need no training (scored once): ``instrument`` then freezes at once
        when every axis is one-shot."""
        return False

    def check_budget(self, pricer: Pricer) -> None:
        """Raise SpecError when the budget is out of this axis's reach (``pricer.axes``: all of them)."""

    # -- running ---------------------------------------------------------------------------------
    def apply(self, mode: str) -> None:
        """Set this axis's gates for one forward in ``mode`` (``open`` | ``train`` | ``eval``)."""

    def see(self, args: tuple[Any, ...]) -> None:
        """The inputs of the coming ``train`` forward (for losses that need them, e.g. a teacher's features)."""

    def outputs(self, main: Tensor, aux: dict[str, Tensor], mode: str, learning: bool) -> Outputs:
        """The model's output and the auxiliary logits the loop trains (each gets the task loss)."""
        return main, {}

    # -- training --------------------------------------------------------------------------------
    @property
    def budget_form(self) -> str | None:
        """How this axis's method meets the budget: "augmented" (one-sided augmented Lagrangian),
        "linear" (a plain Lagrangian), or None when it does not learn against it."""
        return None

    def learns_budget(self) -> bool:
        """Whether the budget term prices this axis's learning on the current step."""
        return False

    # -- freezing --------------------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return True

    def freeze(self, pricer: Pricer, run: Run) -> None:
        """Fix the decisions; the axes frozen before this one price theirs from now on."""

    # -- pricing ---------------------------------------------------------------------------------
    def set_factors(self) -> dict[str, frozenset[str]]:
        """Set factors this axis prices: name -> the dense graph's nodes it scales."""
        return {}

    def factors(self, mode: str) -> Factors:
        return {}

    def op_terms(self, factors: Factors) -> dict[str, Decision]:
        """Runtime ops of nodes the dense graph lacks, by name, under ``factors`` (priced by a latency table)."""
        return {}

    def cost_terms(self, factors: Factors) -> dict[str, Decision]:
        """FLOPs per image of nodes the dense graph lacks, by name, under ``factors`` (this axis's, over every
        axis's: a width group's kept fraction scales what this axis adds on its channels)."""
        return {}

    # -- results ---------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """How report.json's ``method`` names what this axis did."""
        return self.name

    def decisions(self) -> dict[str, Any]:
        """What ``eval`` mode decides, per unit of this axis (what ``materialize`` bakes in)."""
        return {}

    @property
    def serving_batch(self) -> int | None:
        """The one batch size this axis's compact graph runs at (per-image token counts: 1), None: any."""
        return None

    def needed_blocks(self) -> dict[int, str]:
        """Blocks this axis's decisions read (index -> why), which an axis removing blocks must keep."""
        return {}

    def removed_blocks(self) -> set[int]:
        """Indices of the blocks the compact graph will not have because of this axis."""
        return set()

    def materialize_passes(self) -> list[VitPass]:
        return []

    def status(self, pricer: Pricer) -> dict[str, float]:
        """A few numbers for the progress bar and metrics.jsonl."""
        return {}

    def report(self) -> dict[str, Any]:
        """This axis's part of report.json (merged into it key by key)."""
        return {}
