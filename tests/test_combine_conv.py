"""Attention -> convolution combined with head and value-dim pruning (issue 27): on the sites that stay
attention the heads are pruned, a site that becomes a convolution keeps its derived convolution (its head
gates go dead with the attention); random decisions on both axes: eval == compact, priced == compact ==
FlopCounterMode; a learned run lands on the budget with parity; embed channels are refused with the reason.
"""
from __future__ import annotations

import pytest
import torch

import vitgraph as vg
from tests.checks import value_dim_mask
from tests.test_conv import _randomise
from tests.test_tokens import _model
from tests.test_width import _random_decisions
from vitgraph.analysis.cost import flop_counter_flops
from vitgraph.analysis.graph import block_dict
from vitgraph.errors import SpecError
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


def test_conv_with_embed_channels_is_refused_with_the_reason():
    g = _model("deit")
    with pytest.raises(SpecError, match="embedding group cannot narrow"):
        instrument(g, Spec.from_dict({"attention": {"to_conv": True}, "width": {"heads": False, "embed": True}}))
