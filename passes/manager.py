"""The pass manager: runs passes in order and checks the graph between them.

After every pass (whose own ``requires`` / ``ensures`` already ran): the graph lints; with example
inputs, it runs and every node gets its shape re-recorded (so the next pass reads true shapes);
every role in ``node.meta`` is a ``Role`` and every linear role sits on a linear. In debug mode
(``VITGRAPH_DEBUG=1``, ``vitgraph --debug``; the test suite turns it on) the cost model must also
agree with ``FlopCounterMode`` (math SDPA kernel) on the intermediate graph.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from vitgraph.analysis.cost import flop_counter_flops, node_flops
from vitgraph.analysis.ops import is_linear
from vitgraph.analysis.shapes import propagate_shapes
from vitgraph.errors import AnalysisError, PostconditionError
from vitgraph.meta import ROLE, SHAPE, VALUE, Role
from vitgraph.passes.base import PassResult, VitPass, verify_graph

DEBUG_ENV = "VITGRAPH_DEBUG"
COST_RTOL = 1e-6
_LINEAR_ROLES = {"attn.qkv", "attn.qk", "attn.kv", "attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2"}


def debug() -> bool:
    """Whether the expensive checks between passes are on."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


@dataclass
class PassManager:
    """``PassManager(example_inputs).run(gm, passes)`` -> the rewritten graph and each pass's result."""

    example_inputs: tuple[torch.Tensor, ...] | None = None
    check_cost: bool = field(default_factory=debug)
    results: list[tuple[str, PassResult]] = field(default_factory=list)

    def run(self, gm: fx.GraphModule, passes: Sequence[VitPass]) -> fx.GraphModule:
        for p in passes:
            result = p(gm)
            gm = result.gm
            self.results.append((p.name, result))
            self.check(gm, p.name)
        return gm

    def check(self, gm: fx.GraphModule, after: str) -> None:
        verify_graph(gm, after)
        for node in gm.graph.nodes:
            role = node.meta.get(ROLE)
            if role is None:
                continue
            if not isinstance(role, Role):
                raise PostconditionError(f"{after}: {node.format_node()} has a role that is not a Role: {role!r}")
            if role.kind in _LINEAR_ROLES and node.op in ("call_module", "call_function") \
                    and not is_linear(node, gm):
                raise PostconditionError(f"{after}: {node.format_node()} has role {role.kind} but is no longer a "
                                         f"linear")
        if self.example_inputs is None:
            return
        try:
            propagate_shapes(gm, self.example_inputs, fake=True)
        except AnalysisError as e:
            raise PostconditionError(f"{after}: the rewritten graph does not run on the example inputs: {e}") from None
        missing = [n for n in gm.graph.nodes if SHAPE not in n.meta and VALUE not in n.meta]
        if missing:
            raise PostconditionError(f"{after}: {missing[0].format_node()} has no recorded shape")
        if self.check_cost:
            self._check_cost(gm, after)

    def _check_cost(self, gm: fx.GraphModule, after: str) -> None:
        model = sum(node_flops(n, gm) for n in gm.graph.nodes)  # whole example batch, as counted below
        counted = flop_counter_flops(gm, self.example_inputs, 1)
        if abs(model - counted) > COST_RTOL * max(1, counted):
            raise PostconditionError(f"{after}: the cost model prices the graph at {model} FLOPs (example batch), "
                                     f"FlopCounterMode counts {counted}; a node's cost is missing or wrong")
