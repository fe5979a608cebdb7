"""Shape propagation on fake tensors (what vg.trace and every pass's postcondition check run) records what a
real run does; the FLOPs per image it prices do not depend on the batch a model is traced at."""
from __future__ import annotations

import timm
import torch
from torch import nn

import vitgraph as vg
from vitgraph.analysis.cost import flop_counter_flops
from vitgraph.analysis.shapes import propagate_shapes
from vitgraph.meta import LEAF_FLOPS, SHAPE, VALUE


def _recorded(gm: torch.fx.GraphModule) -> dict[str, tuple]:
    return {n.name: (n.meta.get(SHAPE), n.meta.get(VALUE), n.meta.get(LEAF_FLOPS)) for n in gm.graph.nodes}


def test_fake_propagation_records_the_real_shapes_values_and_leaf_flops():
    # convit: block 0's gated positional attention kept whole as a leaf, priced by FlopCounterMode (export
    # enters timm's notrace modules: only a leaf the user names stays one call)
    model = timm.create_model("convit_tiny", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=4,
                              local_up_to_layer=1).eval()
    leaf = type(model.blocks[0].attn)
    g = vg.trace(model, torch.randn(2, 3, 32, 32), leaf_modules=[leaf])  # (records shapes on fake tensors itself)
    propagate_shapes(g.gm, g.example_inputs)
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



class _SharedWork(nn.Module):
    """Three kinds of cost a batch does not simply multiply: a position MLP over a coordinate table (once per
    call, as vit_relpos / swinv2 run it), a position encoding built from the image size (XCiT), and a class
    token expanded to the batch before its own linear (per image, though no input flows into it: CaiT)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 8, 8)
        self.table = nn.Parameter(torch.randn(7, 2))
        self.pos_mlp = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 1))
        self.size_proj = nn.Conv2d(2, 16, 1)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.cls_proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, _, h, w = x.shape
        ys = torch.arange(h, dtype=x.dtype).view(1, 1, h, 1).expand(1, 1, h, w)
        xs = torch.arange(w, dtype=x.dtype).view(1, 1, 1, w).expand(1, 1, h, w)
        x = x + self.size_proj(torch.cat([ys, xs], 1))  # built from the size once, broadcast over the batch
        t = x.flatten(2).transpose(1, 2) * self.pos_mlp(self.table).sum()
        cls = self.cls_proj(self.cls.expand(b, -1, -1))
        return self.head(torch.cat([cls, t], 1).mean(1))


def test_flops_per_image_do_not_depend_on_the_traced_batch():
    """Priced as one image alone costs, whatever the example batch: vit_relpos' MLP over its position table
    was priced at half at a traced batch of 2 (found by bench/survey.py), and pricing every input-independent
    op in full mispriced XCiT's and CaiT's."""
    model = _SharedWork().eval()
    flops = {b: vg.trace(model, torch.randn(b, 3, 32, 32)).structure.flops for b in (1, 2, 3)}
    one = flop_counter_flops(model, (torch.randn(1, 3, 32, 32),), 1)
    assert flops[1] == flops[2] == flops[3] == one
    assert flop_counter_flops(model, (torch.randn(3, 3, 32, 32),), 3) == one  # counted on one image too
    relpos = timm.create_model("vit_relpos_small_patch16_224", img_size=64, patch_size=16, depth=2).eval()
    assert vg.trace(relpos, torch.randn(2, 3, 64, 64)).structure.flops == flop_counter_flops(
        relpos, (torch.randn(1, 3, 64, 64),), 1)
