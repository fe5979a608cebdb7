"""The exits axis: WDPruning's exit classifiers (methods.md §2.1, §2.3, §2.5).

Instrument: a fresh copy of the model's own head path after each block of ``depth.exits``
(``InsertExitsPass``); the graph returns ``(final, *exits)`` and each exit's logits get the task
loss. Freeze: the exit is ``depth.exit``, or the shallowest whose validation top-1 is within
``depth.exit_tolerance`` of the final head's and from which the budget is still reachable.
Materialize: the model is cut there (``TruncateAtExitPass``), and the exit takes the head's names.
Factors: ``cut.<e>`` = 0 removes everything after block e but the head, which the exit's copy
replaces (so the exit is priced as the head, at the stream's kept width); ``block.<i>`` = 0 for the
blocks cut away.

With ``width.embed`` the exit calls the stream's gate where the head does (for the final norm, over
the kept channels, and on the classifier's input), and once cut it holds the head's names, which the
stream's channel group slices: the exit narrows with the stream.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vitgraph.analysis.depth import cut_factor, exit_reasons, head_path, truncated_nodes
from vitgraph.axes.base import Axis, AxisContext, Factors, Pricer, Outputs, Run
from vitgraph.errors import SpecError
from vitgraph.passes.insert_exits_pass import InsertExitsPass
from vitgraph.passes.truncate_at_exit_pass import TruncateAtExitPass

if TYPE_CHECKING:
    from vitgraph.passes.base import VitPass


class ExitsAxis(Axis):
    """Exit classifiers after chosen blocks, and the one the model is cut at."""

    name = "exits"
    freeze_order = 10        # first: which blocks exist at all decides what the others may remove
    materialize_order = 10

    def __init__(self, ctx: AxisContext, exits: tuple[int, ...], path: tuple[str, ...]) -> None:
        super().__init__(ctx)
        self.exits = exits
        self.path = path           # the head path each exit copies
        self.fixed = ctx.spec.depth.exit
        self.val_data = ctx.val_data
        self.top1: dict[str, Any] = {}
        self.aux_outputs = tuple(f"exit{e}" for e in exits)
        # -1: not chosen yet, 0: the final head, e: cut after block e (a buffer: checkpoints keep it)
        self.register_buffer("exit_chosen", torch.tensor(-1))

    @classmethod
    def from_spec(cls, ctx: AxisContext) -> ExitsAxis | None:
        """The spec's exits, checked against the model."""
        g, spec = ctx.graph, ctx.spec
        exits = tuple(sorted(set(spec.depth.exits)))
        if not exits:
            return None
        path, why = head_path(g.gm, g.structure.blocks)
        reasons = exit_reasons(g.gm, g.structure.blocks, why)
        for e in exits:
            if e not in reasons:
                raise SpecError(f"depth.exits: {g.name} has blocks 1..{len(g.structure.blocks)}, so no exit after "
                                f"block {e}; exits are 1-based block numbers")
            if reasons[e] is not None:
                raise SpecError(f"depth.exits: no exit after block {e} of {g.name}: {reasons[e]}; "
                                f"see 'vitgraph inspect' for the blocks, and drop {e} from depth.exits")
        if spec.depth.exit is not None and spec.depth.exit not in exits:
            raise SpecError(f"depth.exit {spec.depth.exit} is not one of depth.exits {list(exits)}; add it there")
        return cls(ctx, exits, path)

    def instrument_passes(self) -> list[VitPass]:
        return [InsertExitsPass(self.exits, self.graph.structure.blocks)]

    def exit_after(self) -> int | None:
        """The block (1-based) the model is cut after, or None (the final head)."""
        e = int(self.exit_chosen)
        return e if e > 0 else None

    def outputs(self, main: Tensor, aux: dict[str, Tensor], mode: str, learning: bool) -> Outputs:
        chosen = self.exit_after()
        if mode == "open":
            return main, {}
        if chosen is not None:  # cut: the exit is the model's head from here on
            return aux[f"exit{chosen}"], {}
        return main, ({name: aux[name] for name in self.aux_outputs} if mode == "train" and learning else {})

    # -- freezing --------------------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return int(self.exit_chosen) >= 0

    def freeze(self, pricer: Pricer, run: Run) -> None:
        if not self.frozen:
            self.exit_chosen.fill_(self._choose(pricer, run))

    def _choose(self, pricer: Pricer, run: Run) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.val_data is None:
            self.top1 = {"reason": "no validation data to choose an exit: kept the final head"}
            return 0
        self.top1 = self.accuracy(run, self.val_data)
        budget = self.spec.budget

        def reachable(e: int) -> bool:  # the cut model, nothing else removed, still reaches down to the budget
            return float(pricer("full", {self.name: self.cut(e)})) >= budget.fraction - budget.slack

        chosen = choose_exit(self.exits, [self.top1[f"exit{e}"] for e in self.exits], self.top1["final"],
                             self.spec.depth.exit_tolerance, reachable)
        return 0 if chosen is None else chosen

    @torch.no_grad()
    def accuracy(self, run: Run, data: Any, batch_size: int = 256) -> dict[str, float]:
        """Top-1 of the final head and of every exit, in ``eval`` mode, on ``data`` (image, label) pairs."""
        from torch.utils.data import DataLoader

        correct = torch.zeros(len(self.exits) + 1)
        total = 0
        for x, y in DataLoader(data, batch_size=batch_size):
            final, aux = run(x)
            for i, logits in enumerate((final, *(aux[name] for name in self.aux_outputs))):
                correct[i] += float((logits.argmax(-1) == y).sum())
            total += int(y.numel())
        acc = (correct / max(total, 1)).tolist()
        return {"final": acc[0], **{f"exit{e}": a for e, a in zip(self.exits, acc[1:])}}

    # -- pricing ---------------------------------------------------------------------------------
    def set_factors(self) -> dict[str, frozenset[str]]:
        g = self.graph
        return {cut_factor(e): truncated_nodes(g.gm, g.structure.blocks, e, self.path) for e in self.exits}

    def factors(self, mode: str) -> Factors:
        # a fixed exit is priced from the start: the budget is met with it
        e = self.exit_after() if self.frozen else self.fixed if self.fixed is not None else \
            min(self.exits) if mode == "floor" else None
        return {} if e is None else self.cut(e)

    def cut(self, e: int) -> Factors:
        """Cutting after block e: the cut's node set, and every block from e on (0-based), so that what another
        axis adds inside a cut block (an attention's convolutions, ``cost_terms``) goes with it."""
        return {cut_factor(e): 0.0, **{f"block.{b.index}": 0.0 for b in self.graph.structure.blocks if b.index >= e}}

    # -- results ---------------------------------------------------------------------------------
    def decisions(self) -> dict[str, int | None]:
        return {"exit": self.exit_after()}

    def removed_blocks(self) -> set[int]:
        e = self.exit_after()
        return set() if e is None else {b.index for b in self.graph.structure.blocks if b.index >= e}

    def materialize_passes(self) -> list[VitPass]:
        return [TruncateAtExitPass(self.exits, self.exit_after())]

    def report(self) -> dict[str, Any]:
        return {"depth": {"exits": list(self.exits), "exit": self.exit_after(), "exit_top1": self.top1}}


def choose_exit(exits: Sequence[int], top1: Sequence[float], final: float, tolerance: float,
                reachable: Callable[[int], bool]) -> int | None:
    """The shallowest exit (1-based block) within ``tolerance`` of the final head's top-1 from which
    the budget can still be reached; None keeps the final head."""
    for e, acc in sorted(zip(exits, top1)):
        if acc >= final - tolerance and reachable(e):
            return e
    return None
