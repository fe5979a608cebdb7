"""Attention -> convolution combined with the width axis (issue 27): on the sites that stay attention the
heads are pruned, a site that becomes a convolution keeps its derived convolution (its head gates go dead
with the attention); random decisions on both axes: eval == compact, priced == compact == FlopCounterMode;
a learned run lands on the budget with parity. With ``width.embed`` the convolutions narrow with the
stream: they read the value projection's gated input, and their layers are sliced with the embedding
group (input channels as the value columns, output channels and bias as the projection rows); the conv
cost terms price the kept channels; the compact graph lowers to ONNX with parity.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

import vitgraph as vg
from tests.checks import value_dim_mask
from tests.test_embed import _decide as _decide_embed
from tests.test_conv import _randomise
from tests.test_tokens import _model
from tests.test_width import _random_decisions
from vitgraph.analysis.conv import conv_sites, stream_slices
from vitgraph.analysis.cost import flop_counter_flops
from vitgraph.analysis.graph import block_dict
from vitgraph.gated import instrument, materialize
from vitgraph.spec import Spec


@pytest.mark.parametrize("head_dim", [False, True])
def test_conv_choices_with_pruned_heads_materialize_and_price_exactly(head_dim):
    g = _model("deit")
    spec = Spec.from_dict({"budget": {"flops": 0.6}, "attention": {"to_conv": True}, "train": {"steps": 10},
                           "width": {"heads": True, "head_dim": head_dim, "mlp": True, "align": 1}})
    gated = instrument(g, spec)
    x = torch.randn(3, *g.example_inputs[0].shape[1:])
    with torch.no_grad():
        assert torch.equal(gated.set_mode("open")(x), g.gm(x))
    _randomise(gated)
    # msa (every head pruned: the branch goes), conv3, conv1, msa; a site that keeps no head loses its
    # branch whatever it became (the heads' branch gate sits on the branch output): priced so, built so
    gated.axes["conv"].choice.copy_(torch.tensor([3, 2, 1, 3]))
    kept = _random_decisions(gated, seed=5)
    method, gen = gated.axes["width"].method, torch.Generator().manual_seed(6)
    for i, site in enumerate(method.sites):  # value dims: the same number in every head of a site
        if site.kind == "head_dim":
            getattr(method, f"frozen_{i}").copy_(value_dim_mask(site, 1 + i % 3, gen))
    gated.eval()
    gated.set_mode("eval")
    compact = materialize(gated)
    with torch.no_grad():
        want = gated(x)
        assert (compact(x) - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
        assert (want - g.gm(x)).abs().max() > 1e-3
    cg = vg.trace(compact, g.example_inputs)
    assert cg.structure.flops == pytest.approx(gated.cost()["flops"], rel=1e-9)
    assert flop_counter_flops(compact, (x,), 3) == cg.structure.flops
    attn = [block_dict(b)["attention"] for b in cg.structure.blocks]
    assert kept["blocks.0.attn.heads"] == 0 and kept["blocks.1.attn.heads"] == g.structure.blocks[1].attention.heads
    assert [a["kind"] for a in attn[:3]] == ["skip", "conv3", "conv1"]
    for b in (3,):  # the attention that stays has the heads its decision kept (or its branch is gone)
        k = kept[f"blocks.{b}.attn.heads"]
        assert attn[b]["kind"] == ("msa" if k else "skip") and (not k or attn[b]["heads"] == k)


def test_learned_conv_and_heads_land_on_one_budget(tmp_path):
    """spvit_conv's search with heads and MLP units under one quadratic budget term: lands, parity holds."""
    from tests.test_tokens import run_tiny_deit
    from vitgraph.train.data import load_data

    data = load_data("digits", (1, 16, 16), batch_size=16)
    spec = {"preset": "spvit_conv", "budget": {"flops": 0.6}, "width": {"heads": True},
            "train": {"steps": 12, "batch_size": 16}}
    gated = run_tiny_deit(spec, data, tmp_path / "run")
    gated.eval()
    cost = gated.cost()
    assert abs(cost["fraction"] - 0.6) <= 0.03 + 1e-9
    compact = materialize(gated)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert (compact(x) - gated(x)).abs().max() <= 1e-4
    assert vg.trace(compact, (x,)).structure.flops == pytest.approx(cost["flops"], rel=1e-9)


def _conv_embed(key: str, others: bool):
    """``key`` gated for conv + embed (+ heads, value dims, MLP units): every conv decision, random widths,
    the stream cut to half its channels; returns (graph, gated in eval, compact, kept stream channels)."""
    g = _model(key)
    with torch.no_grad():  # (a zero norm bias would hide a conv reading the stream's dropped channels)
        for name, p in g.gm.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    spec = Spec.from_dict({"budget": {"flops": 0.6}, "attention": {"to_conv": True}, "train": {"steps": 10},
                           "width": {"heads": others, "head_dim": others, "mlp": others, "embed": True, "align": 1}})
    gated = instrument(g, spec)
    x = torch.randn(3, *g.example_inputs[0].shape[1:])
    with torch.no_grad():
        assert torch.equal(gated.set_mode("open")(x), g.gm(x)), "gates open must be exactly the original graph"
    _randomise(gated)
    gated.axes["conv"].choice.copy_(torch.tensor([0, 1, 2, 3]))  # skip, conv1, conv3, msa
    kept = _decide_embed(gated, seed=len(key))
    gated.eval()
    gated.set_mode("eval")
    return g, gated, materialize(gated), kept


@pytest.mark.parametrize("key, others", [("deit", False), ("deit", True), ("hugging_face", True),
                                         ("handmade", False)])
def test_conv_narrows_with_the_embedding_channels(key, others):
    g, gated, compact, kept = _conv_embed(key, others)
    x = g.example_inputs[0]
    with torch.no_grad():
        for inputs in (x, torch.randn(3, *x.shape[1:])):
            want = gated(inputs)
            assert (compact(inputs) - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
        assert (gated(x) - g.gm(x)).abs().max() > 1e-3
    assert "vg_conv" not in compact.code and "vg_gates" not in compact.code
    cg = vg.trace(compact, g.example_inputs)
    assert [block_dict(b)["attention"]["kind"] for b in cg.structure.blocks[:3]] == ["skip", "conv1", "conv3"]
    assert cg.structure.tokens.embed_dim == kept < g.structure.tokens.embed_dim
    for i, layout in ((1, nn.Linear), (2, nn.Conv2d)):  # the stream's channels in and out, the conv's d between
        first, second = (compact.get_submodule(f"{g.structure.blocks[i].attention.name}_conv.{j}") for j in (0, 1))
        assert isinstance(first, layout) and isinstance(second, layout)
        assert first.weight.shape[1] == second.weight.shape[0] == kept
    assert cg.structure.flops == pytest.approx(gated.cost()["flops"], rel=1e-9)  # conv terms price kept channels
    assert flop_counter_flops(compact, (x,), x.shape[0]) == cg.structure.flops


def test_conv_and_embed_lower_to_onnx_with_parity(tmp_path):
    onnx_target = pytest.importorskip("vitgraph.targets.onnx")
    g, _, compact, _ = _conv_embed("deit", True)
    report = onnx_target.lower(compact, g.example_inputs, tmp_path / "conv_embed.onnx", check_batches=(1, 3))
    assert report.max_abs_err <= 1e-4


def test_a_site_whose_channels_the_stream_group_does_not_hold_says_why():
    g = _model("deit")
    site = conv_sites(g)[0][0]
    stream = next(gr for gr in g.structure.groups if gr.kind == "embed")
    assert not isinstance(stream_slices(site, stream), str)
    partial = replace(stream, slices=tuple(s for s in stream.slices if s.target != site.o_weight))
    assert "could not narrow with the stream" in stream_slices(site, partial)
