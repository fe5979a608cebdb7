"""MLPs with a depthwise conv between fc1 and fc2 (PVT-v2, mobile-style MLPs) prune their hidden units.

fc1 -> tokens to a (B, hidden, H, W) map -> depthwise conv -> back to tokens -> act -> fc2: the conv keeps every
hidden channel apart, so a unit owns its fc1 row, its depthwise filter (and bias, and a BatchNorm channel after
the conv) and its fc2 column; the reshape sizes holding the hidden count move with the cut. Held to the width
round trip (open == original, gated eval == compact, priced == FlopCounterMode) and to ``vg.compress`` landing
a 0.5 FLOPs budget whose ``model.pt2`` reloads equal to the compact graph.
"""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import vitgraph as vg
from vitgraph.analysis.cost import flop_counter_flops
from vitgraph.gated import instrument
from vitgraph.spec import Spec
from tests.checks import random_batchnorm, round_trip
from tests.handmade import Attention

torch.set_num_threads(1)
HIDDEN = 40  # (the 8 x 8 grid makes 64 tokens: a hidden count apart from every other size)
WIDTH = {"budget": {"flops": 0.5}, "width": {"method": "magnitude", "heads": True, "mlp": True}}


class DwMlp(nn.Module):
    """fc1 -> depthwise conv over the tokens -> GELU -> fc2, the tokens turned into a map three ways:
    "shape" (PVT-v2: sizes read from the tensor), "literal" (the hidden count written out, channels-last, a
    BatchNorm after the conv), "1d" (a Conv1d along the token sequence)."""

    def __init__(self, dim: int, hidden: int, grid: int, style: str) -> None:
        super().__init__()
        self.style, self.hidden, self.grid = style, hidden, grid
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        conv = nn.Conv1d if style == "1d" else nn.Conv2d
        self.dw = conv(hidden, hidden, 3, padding=1, groups=hidden)
        self.bn = nn.BatchNorm2d(hidden) if style == "literal" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.fc1(x)
        if self.style == "shape":
            c = h.shape[-1]
            h = self.dw(h.transpose(1, 2).view(b, c, self.grid, self.grid)).flatten(2).transpose(1, 2)
        elif self.style == "literal":
            m = h.reshape(b, self.grid, self.grid, self.hidden).permute(0, 3, 1, 2)
            h = self.bn(self.dw(m)).permute(0, 2, 3, 1).reshape(b, n, self.hidden)
        else:
            h = self.dw(h.transpose(1, 2)).transpose(1, 2)
        return self.fc2(self.act(h))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, grid: int, style: str) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = Attention(dim, heads), DwMlp(dim, hidden, grid, style)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class DwViT(nn.Module):
    """Patch conv -> three blocks (one per MLP spelling) -> mean of the tokens -> head; no class token."""

    STYLES = ("shape", "literal", "1d")

    def __init__(self, image: int = 32, patch: int = 4, dim: int = 32, heads: int = 2, hidden: int = HIDDEN) -> None:
        super().__init__()
        grid = image // patch
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, grid, s) for s in self.STYLES)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.embed(img).flatten(2).transpose(1, 2)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(1))


def dw_vit() -> nn.Module:
    """Random filters, biases and BatchNorm statistics: a wrongly sliced channel shows in the output."""
    torch.manual_seed(0)
    model = DwViT().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups > 1:
                m.bias.normal_(0, 0.5)
    return random_batchnorm(model)


@pytest.fixture(scope="module")
def graph() -> vg.VitGraph:
    return vg.trace(dw_vit(), torch.randn(2, 3, 32, 32))


def test_the_units_own_the_depthwise_filters_and_the_reshape_sizes(graph):
    s = graph.structure
    assert [m.hidden for m in s.mlps] == [HIDDEN] * 3
    assert all(m.prunable["mlp"] is None for m in s.mlps), [m.prunable for m in s.mlps]
    groups = {gr.name: gr for gr in s.groups if gr.kind == "mlp"}
    assert set(groups) == {f"blocks.{i}.mlp.mlp" for i in range(3)}
    for i, gr in enumerate(groups.values()):
        targets = {sl.target: sl for sl in gr.slices}
        for p in ("weight", "bias"):
            dw = targets[f"blocks.{i}.mlp.dw.{p}"]
            assert dw.axis == 0 and dw.indices == tuple((u,) for u in range(HIDDEN))
    assert {f"blocks.1.mlp.bn.{p}" for p in ("weight", "bias", "running_mean", "running_var")} <= {
        sl.target for sl in groups["blocks.1.mlp.mlp"].slices}
    # the literal block writes the hidden count twice (tokens -> channels-last map, map -> tokens); the shape-read one reads
    # its channel count from the tensor (one size argument); the 1-D conv needs no reshape
    assert [len(gr.constants) for gr in groups.values()] == [1, 2, 0]
    assert all(c.value == HIDDEN and c.per_unit == 1 for gr in groups.values() for c in gr.constants)
    # the conv's FLOPs scale with the units kept
    nodes = {n.name: n for n in graph.gm.graph.nodes}
    for i in range(3):
        conv = next(n for n in nodes.values() if n.op == "call_module" and n.target == f"blocks.{i}.mlp.dw")
        assert f"blocks.{i}.mlp.mlp" in conv.meta["vg.cost"].factors


def _decide(gated, seed: int) -> dict[str, int]:
    gen = torch.Generator().manual_seed(seed)
    method = gated.axes["width"].method
    kept = {}
    for i, site in enumerate(method.sites):
        mask = torch.rand(site.units, generator=gen) < (0.4 if site.kind == "mlp" else 0.6)
        mask[0] = True
        getattr(method, f"frozen_{i}").copy_(mask)
        kept[site.name] = int(mask.sum())
    method.is_frozen.fill_(True)
    return kept


def test_random_cuts_slice_the_depthwise_conv_exactly(graph):
    gated = instrument(graph, Spec.from_dict({**WIDTH, "width": {**WIDTH["width"], "align": 1}}))
    kept: dict[str, int] = {}
    compact = round_trip(graph, gated, lambda: kept.update(_decide(gated, seed=5)), "dwconv mlp")
    for i, style in enumerate(DwViT.STYLES):
        k = kept[f"blocks.{i}.mlp.mlp"]
        assert 0 < k < HIDDEN, kept
        dw = compact.get_submodule(f"blocks.{i}.mlp.dw")
        assert dw.weight.shape[0] == dw.groups == dw.in_channels == dw.out_channels == k
        assert dw.bias.shape == (k,) and compact.get_submodule(f"blocks.{i}.mlp.fc2").in_features == k
    assert compact.get_submodule("blocks.1.mlp.bn").num_features == kept["blocks.1.mlp.mlp"]
    assert f", {HIDDEN}" not in compact.code  # no reshape still writes the dense hidden count


def _landed(result, x: torch.Tensor, tmp_path) -> dict:
    report = result.report
    assert abs(report["budget"]["achieved"] - 0.5) <= 0.03
    assert report["parity"]["max_abs_err"] < 1e-4
    assert report["compressed"]["flops"] == pytest.approx(flop_counter_flops(result.compact, (x,), 1), rel=0.01)
    result.save(tmp_path / "out")
    reloaded = torch.export.load(str(tmp_path / "out" / "model.pt2")).module()
    with torch.no_grad():
        want = result.compact(x)
        assert (reloaded(x) - want).abs().max() <= 1e-5 * want.abs().max()
    return report


def test_a_half_flops_budget_lands_and_cuts_the_depthwise_mlps(graph, tmp_path):
    result = vg.compress(graph, WIDTH, data="none", progress=False, latency_targets=())
    report = _landed(result, torch.randn(1, 3, 32, 32), tmp_path)
    assert all(report["kept"][f"blocks.{i}.mlp.mlp"] < HIDDEN for i in range(3)), report["kept"]


def test_pvt_v2_b0_prunes_its_depthwise_mlps(tmp_path):
    """timm's pvt_v2_b0 at 64 px, one block per stage: its budget was out of reach while the MLPs stayed dense."""
    model = timm.create_model("pvt_v2_b0", depths=(1, 1, 1, 1)).eval()
    g = vg.trace(model, torch.randn(2, 3, 64, 64))
    assert all(b.mlp.prunable["mlp"] is None for b in g.blocks)
    result = vg.compress(g, WIDTH, data="none", progress=False, latency_targets=())
    report = _landed(result, torch.randn(1, 3, 64, 64), tmp_path)
    for b in g.blocks:
        k = report["kept"][f"{b.mlp.name}.mlp"]
        assert 0 < k < b.mlp.hidden, report["kept"]
        dw = result.compact.get_submodule(f"{b.mlp.name}.dwconv")
        assert dw.weight.shape[0] == dw.groups == k
