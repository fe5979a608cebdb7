"""The round trip every width rewrite is held to, in one place.

``decide`` writes decisions into the gated graph's frozen masks; then: gates open == the original
graph exactly; the decisions change the output (else the test could not fail); the materialized graph
== the gated ``eval`` graph; no gate is left; the cost model prices the compact graph as the gates
predicted, and ``FlopCounterMode`` (math SDPA kernel) agrees.
"""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import vitgraph as vg
from vitgraph.analysis.cost import flop_counter_flops
from vitgraph.gated import materialize


def round_trip(g: vg.VitGraph, gated, decide: Callable[[], object], key: str) -> torch.fx.GraphModule:
    """Open == original, eval == compact, cost == FlopCounterMode; returns the compact graph."""
    x = g.example_inputs[0]
    with torch.no_grad():
        dense = g.gm(x)
        assert torch.equal(gated.set_mode("open")(x), dense), "gates open must be exactly the original graph"
        decide()
        masked = gated.set_mode("eval")(x)
        compact = materialize(gated)
        out = compact(x)
    scale = dense.abs().max()
    assert (masked - dense).abs().max() > 1e-3 * scale, "random decisions changed nothing (test cannot fail)"
    assert (out - masked).abs().max() <= 1e-5 * scale, f"{key}: compact graph differs from the gated eval graph"
    assert "vg_gates" not in compact.code
    cg = vg.trace(compact, g.example_inputs)  # same batch: XCiT's positional encoding is batch-independent
    assert cg.structure.flops == pytest.approx(gated.cost()["flops"], rel=1e-9)
    assert cg.structure.flops == pytest.approx(flop_counter_flops(compact, g.example_inputs, 2), rel=0.01)
    return compact


def value_dim_mask(site, k: int, gen: torch.Generator) -> torch.Tensor:
    """A value-dim group's mask: ``k`` random channels in every head, each head its own."""
    per = site.units // site.segments
    return torch.cat([torch.zeros(per).index_fill_(0, torch.randperm(per, generator=gen)[:k], 1)
                      for _ in range(site.segments)]).bool()


def random_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Random BatchNorm statistics and affine terms (in place), so a wrongly sliced channel shows in the output."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
    return model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny graphs: one thread is several times faster than two fighting over a shared CPU (a module that
    imports this fixture runs its tests on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
