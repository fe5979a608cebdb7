"""Shape propagation on fake tensors (what every pass's postcondition check runs) records what a real run does."""
from __future__ import annotations

import timm
import torch
from torch import nn

import vitgraph as vg
from vitgraph.analysis.shapes import propagate_shapes
from vitgraph.meta import LEAF_FLOPS, SHAPE, VALUE


def _recorded(gm: torch.fx.GraphModule) -> dict[str, tuple]:
    return {n.name: (n.meta.get(SHAPE), n.meta.get(VALUE), n.meta.get(LEAF_FLOPS)) for n in gm.graph.nodes}


def test_fake_propagation_records_the_real_shapes_values_and_leaf_flops():
    # convit: block 0's gated positional attention is a notrace leaf, priced by FlopCounterMode
    model = timm.create_model("convit_tiny", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=4,
                              local_up_to_layer=1).eval()
    g = vg.trace(model, torch.randn(2, 3, 32, 32))
    real = _recorded(g.gm)
    assert any(v[2] for v in real.values())
    for n in g.gm.graph.nodes:
        n.meta.pop(SHAPE, None), n.meta.pop(VALUE, None), n.meta.pop(LEAF_FLOPS, None)
    out = propagate_shapes(g.gm, g.example_inputs, fake=True)
    assert type(out).__name__ == "FakeTensor" and _recorded(g.gm) == real


class _DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = torch.nonzero(x[0, 0] > 0)  # a shape read from the data: fake tensors cannot answer it
        return x.flatten(1)[:, : kept.shape[0] + 1]


def test_fake_propagation_falls_back_to_real_tensors_where_an_op_needs_data():
    gm = torch.fx.symbolic_trace(_DataDependent())
    x = torch.tensor([[[1.0, -1.0, 2.0, 3.0]]])
    out = propagate_shapes(gm, (x,), fake=True)
    assert isinstance(out, torch.Tensor) and type(out).__name__ == "Tensor" and tuple(out.shape) == (1, 4)

