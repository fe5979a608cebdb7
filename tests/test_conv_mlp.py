"""Pointwise-conv MLPs (Conv1x1 -> BatchNorm -> act -> Conv1x1 on a (B, C, H, W) stream) are MLP sites.

They are recognised, gated on the channel axis, sliced and priced exactly as Linear MLPs are:
gated ``eval`` equals the compact graph, the cost model equals FlopCounterMode on it, ONNX Runtime
agrees with it, and a 0.5 FLOPs budget lands on timm's EfficientFormer-L1 (whose four 4-D stages
are pooling mixers and such MLPs).
"""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import vitgraph as vg
from vitgraph.analysis.cost import flop_counter_flops
from vitgraph.analysis.ops import linear_info
from vitgraph.gated import instrument, materialize
from vitgraph.meta import ROLE
from vitgraph.spec import Spec
from tests.checks import random_batchnorm

MAGNITUDE = Spec.from_dict({"budget": {"flops": 0.5}, "width": {"method": "magnitude", "align": 1}})


class ConvMlp(nn.Module):
    """The MLP over channels: Conv1x1 -> BN -> GELU -> dropout -> Conv1x1 -> BN."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.norm1 = nn.Conv2d(dim, hidden, 1), nn.BatchNorm2d(hidden)
        self.act, self.drop = nn.GELU(), nn.Dropout(0.0)
        self.fc2, self.norm2 = nn.Conv2d(hidden, dim, 1), nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.fc2(self.drop(self.act(self.norm1(self.fc1(x))))))


class ConvBlock(nn.Module):
    """A token mixer (average pooling, PoolFormer-style, or a depthwise 3x3 conv) and a conv MLP, each
    residual; the MLP branch has a per-channel layer scale."""

    def __init__(self, dim: int, hidden: int, mixer: str) -> None:
        super().__init__()
        self.mixer = mixer
        self.mix = nn.AvgPool2d(3, 1, 1) if mixer == "pool" else nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.mlp = ConvMlp(dim, hidden)
        self.scale = nn.Parameter(torch.rand(dim, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + (self.mix(x) - x if self.mixer == "pool" else self.mix(x))
        return x + self.scale * self.mlp(x)


class ConvMlpNet(nn.Module):
    """Patch conv -> two stages of conv blocks (a strided 3x3 conv between) -> mean pool -> head."""

    def __init__(self, chans: int = 3, dims: tuple[int, int] = (16, 24), hidden: tuple[int, int] = (40, 64),
                 classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(chans, dims[0], 4, 4)
        self.stage0 = nn.Sequential(ConvBlock(dims[0], hidden[0], "pool"), ConvBlock(dims[0], hidden[0], "dw"))
        self.down = nn.Conv2d(dims[0], dims[1], 3, 2, 1)
        self.stage1 = nn.Sequential(ConvBlock(dims[1], hidden[1], "dw"), ConvBlock(dims[1], hidden[1], "pool"))
        self.head = nn.Linear(dims[1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.down(self.stage0(self.stem(x))))
        return self.head(x.mean((2, 3)))


def conv_mlp_net(**kwargs) -> nn.Module:
    """Random weights and BatchNorm statistics, so a wrongly sliced channel shows in the output."""
    torch.manual_seed(0)
    return random_batchnorm(ConvMlpNet(**kwargs).eval())


def _graph() -> vg.VitGraph:
    return vg.trace(conv_mlp_net(), torch.randn(2, 3, 32, 32))


def test_conv_mlps_are_mlp_sites_with_batchnorm_slices():
    g = _graph()
    s = g.structure
    assert [m.name for m in s.mlps] == [f"stage{i}.{j}.mlp" for i in (0, 1) for j in (0, 1)]
    assert [m.hidden for m in s.mlps] == [40, 40, 64, 64]
    assert all(m.prunable["mlp"] is None and not m.gated for m in s.mlps)
    nodes = {n.name: n for n in g.gm.graph.nodes}
    for m in s.mlps:
        for name, role in ((m.fc1[0], "mlp.fc1"), (m.fc2, "mlp.fc2")):
            assert nodes[name].meta[ROLE].kind == role and linear_info(nodes[name], g.gm).channel_axis == 1
    # the patch conv, the strided 3x3 and the depthwise convs stay convolutions
    assert s.tokens.embed == "stem"
    for name in ("stem", "down", "stage0_1_mix", "stage1_0_mix"):
        assert linear_info(nodes[name], g.gm) is None
    group = next(gr for gr in s.groups if gr.name == "stage1.0.mlp.mlp")
    assert {sl.target for sl in group.slices} == {
        "stage1.0.mlp.fc1.weight", "stage1.0.mlp.fc1.bias", "stage1.0.mlp.fc2.weight",
        *(f"stage1.0.mlp.norm1.{p}" for p in ("weight", "bias", "running_mean", "running_var"))}
    # every MLP sits on a residual (so a group keeping no unit can delete it); the depthwise mixer pairs with it
    assert [b.mlp.name for b in s.blocks] == [m.name for m in s.mlps]
    assert [b.mixer for b in s.blocks] == [None, "conv3", "conv3", None]
    assert all(any(r.kind == "mlp" for r in b.residuals) for b in s.blocks)


def test_gate_masks_the_channel_axis_and_compact_equals_eval():
    g = _graph()
    x = g.example_inputs[0]
    gated = instrument(g, MAGNITUDE)
    gate = gated.gm.get_submodule("vg_gates.stage0_0_mlp_mlp")
    assert gate.channel_axis == 1
    with torch.no_grad():
        dense = g.gm(x)
        assert torch.equal(gated.set_mode("open")(x), dense)
    method = gated.axes["width"].method
    gen = torch.Generator().manual_seed(3)
    for i, site in enumerate(method.sites):
        mask = torch.rand(site.units, generator=gen) < 0.5
        mask[0] = True
        if i == 1:
            mask[:] = False  # every unit of one MLP pruned: its residual branch goes
        getattr(method, f"frozen_{i}").copy_(mask)
    method.is_frozen.fill_(True)
    with torch.no_grad():
        masked = gated.set_mode("eval")(x)
        compact = materialize(gated)
        out = compact(x)
    scale = dense.abs().max()
    assert (masked - dense).abs().max() > 1e-3 * scale, "the decisions changed nothing (the test cannot fail)"
    assert (out - masked).abs().max() <= 1e-5 * scale
    kept = [int(getattr(method, f"frozen_{i}").sum()) for i in range(len(method.sites))]
    fc1 = compact.get_submodule("stage1.1.mlp.fc1")
    assert fc1.weight.shape[:2] == (kept[3], 24) and fc1.out_channels == kept[3]
    assert compact.get_submodule("stage1.1.mlp.norm1").num_features == kept[3]
    assert "stage0_1_mlp" not in compact.code and "vg_gates" not in compact.code
    # priced as the gates predicted, and as FlopCounterMode counts the compact graph
    cg = vg.trace(compact, g.example_inputs)
    assert cg.structure.flops == pytest.approx(gated.cost()["flops"], rel=1e-9)
    assert cg.structure.flops == flop_counter_flops(compact, g.example_inputs, 2)


def test_one_shot_budget_and_onnx_parity_of_the_compact_graph(tmp_path):
    g = _graph()
    gated = instrument(g, MAGNITUDE)
    assert abs(gated.cost()["fraction"] - 0.5) <= 0.03
    compact = materialize(gated)
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in g.gm.parameters())
    report = vg.targets.onnx.lower(compact, g.example_inputs, tmp_path / "m.onnx", atol=1e-4)
    assert report.max_abs_err <= 1e-4


def test_uvc_learns_on_conv_mlps_and_rewrites_exactly():
    """A learned method reads the conv consumers' columns (norms, proximal shrinking) on 4-D weights."""
    from vitgraph.train.data import load_data
    from vitgraph.train.loop import fit

    x = torch.randn(2, 1, 16, 16)
    g = vg.trace(conv_mlp_net(chans=1), x)
    spec = Spec.from_dict({"budget": {"flops": 0.6}, "width": {"method": "uvc", "align": 4},
                           "train": {"steps": 8, "search": 0.5, "batch_size": 16}})
    gated = instrument(g, spec)
    fc2 = gated.gm.get_parameter("stage1.0.mlp.fc2.weight")
    before = fc2.detach().clone()
    fit(gated, load_data("digits", (1, 16, 16), 16).train, spec.train, progress=False)
    assert not torch.equal(fc2.detach(), before) and gated.axes["width"].frozen
    assert abs(gated.cost()["fraction"] - 0.6) <= 0.03
    gated.eval()  # BatchNorm on its running statistics
    with torch.no_grad():
        masked = gated(x)
        out = materialize(gated)(x)
    assert (out - masked).abs().max() <= 1e-5 * masked.abs().max()


def test_plain_vit_is_unaffected():
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2,
                              num_heads=2).eval()
    g = vg.trace(model, torch.randn(2, 3, 32, 32))
    nodes = {n.name: n for n in g.gm.graph.nodes}
    assert [m.hidden for m in g.structure.mlps] == [256, 256]
    assert all(linear_info(nodes[m.fc2], g.gm).channel_axis == -1 for m in g.structure.mlps)
    assert linear_info(nodes[g.structure.tokens.embed], g.gm) is None  # the 8x8 patch conv
    assert {gr.name.rsplit(".", 1)[-1] for gr in g.structure.groups} == {"heads", "v_dims", "mlp", "embed"}


def test_efficientformer_l1_lands_on_half_its_flops():
    torch.manual_seed(0)
    model = timm.create_model("efficientformer_l1").eval()
    spec = Spec.from_dict({"budget": {"flops": 0.5}, "width": {"method": "magnitude"}})
    result = vg.compress(model, spec, example_inputs=(torch.randn(1, 3, 224, 224),), data="none", progress=False,
                         latency_targets=())
    report = result.report
    assert 0.47 <= report["budget"]["achieved"] <= 0.53
    assert report["parity"]["max_abs_err"] <= 1e-4
    assert len(report["kept"]) == 16  # 15 MLPs (14 of them conv MLPs) and the one attention's heads
    # (with VITGRAPH_DEBUG, set by conftest, the pipeline has checked the cost model against FlopCounterMode)
    assert report["compressed"]["flops"] == flop_counter_flops(result.compact, (torch.randn(1, 3, 224, 224),), 1)
