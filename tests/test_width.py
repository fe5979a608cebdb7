"""Width pruning invariants: gates open == original; gated ``eval`` == materialized, on every family.

Decisions are random (and degenerate: a layer with every head pruned, a layer with nothing pruned),
written straight into the method's frozen masks, so the test covers what any method may decide.
"""
from __future__ import annotations

import pytest
import torch

import vitgraph as vg
from tests.checks import round_trip
from tests.test_groups import TINY, _graph
from vitgraph.gated import instrument, materialize
from vitgraph.spec import Spec

MAGNITUDE = Spec.from_dict({"budget": {"flops": 0.5}, "width": {"method": "magnitude", "heads": True, "mlp": True}})


def _random_decisions(gated, seed: int) -> dict[str, int]:
    gen = torch.Generator().manual_seed(seed)
    method = gated.axes["width"].method
    kept = {}
    heads_seen = 0
    heads_total = sum(s.kind == "heads" for s in method.sites)
    for i, site in enumerate(method.sites):
        mask = torch.rand(site.units, generator=gen) < 0.5
        if site.kind == "heads":
            heads_seen += 1
            if heads_seen == 1 and site.min_units == 0:
                mask[:] = False         # degenerate: every head of this layer pruned
            elif heads_seen == 2 and heads_total > 2:
                mask[:] = True          # degenerate: nothing pruned (the last layer stays random)
        if mask.sum() < site.min_units:
            mask[0] = True
        getattr(method, f"frozen_{i}").copy_(mask)
        kept[site.name] = int(mask.sum())
    method.is_frozen.fill_(True)
    return kept


@pytest.mark.parametrize("key", ["handmade", "hugging_face", *TINY])
def test_open_equals_original_and_eval_equals_materialized(key):
    g = _graph(key)
    try:
        gated = instrument(g, MAGNITUDE)
    except vg.SpecError as e:  # pooled-q/k/v MViT: no head groups, MLPs only
        pytest.fail(f"{key}: {e}")
    kept: dict[str, int] = {}
    compact = round_trip(g, gated, lambda: kept.update(_random_decisions(gated, seed=len(key))), key)
    params = sum(p.numel() for p in compact.parameters())
    assert params < sum(p.numel() for p in g.gm.parameters())
    assert sum(kept.values()) < sum(s.units for s in gated.axes["width"].method.sites)


def test_every_head_pruned_removes_the_attention_branch():
    g = _graph("deit")
    gated = instrument(g, MAGNITUDE)
    method = gated.axes["width"].method
    heads = [i for i, s in enumerate(method.sites) if s.kind == "heads"]
    for i in range(len(method.sites)):
        getattr(method, f"frozen_{i}").fill_(i != heads[0])
    compact = materialize(gated)
    x = torch.randn(2, *g.input_size)
    with torch.no_grad():
        assert torch.allclose(compact(x), gated.set_mode("eval")(x), atol=1e-5)
    assert "blocks_0_attn_qkv" not in compact.code and "blocks_1_attn_qkv" in compact.code
    assert not hasattr(compact.get_submodule("blocks.0"), "attn")  # the whole attention is gone


def test_nothing_pruned_is_a_no_op_rewrite():
    g = _graph("deit")
    gated = instrument(g, MAGNITUDE)
    method = gated.axes["width"].method
    for i in range(len(method.sites)):
        getattr(method, f"frozen_{i}").fill_(True)
    from vitgraph.passes.remove_pruned_units_pass import RemovePrunedUnitsPass
    import copy
    result = RemovePrunedUnitsPass(g.structure.groups, g.structure.blocks, gated.decisions()["width"])(copy.deepcopy(gated.gm))
    assert result.counters["units_removed"] == 0 and result.counters["gates_removed"] > 0
    x = torch.randn(2, *g.input_size)
    with torch.no_grad():
        assert torch.equal(result.gm(x), g.gm(x))


def test_gate_structure_and_counters():
    g = _graph("deit")
    gated = instrument(g, MAGNITUDE)
    code = gated.gm.code
    # two gated groups per block, each called at its consumer and on its residual branch
    assert code.count("self.vg_gates.blocks_0_attn_heads(") == 2 and code.count("branch = True") == 4


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_one_shot_budget_lands_within_tolerance(fraction):
    g = _graph("dinov2_reg")
    spec = Spec.from_dict({"budget": {"flops": fraction}, "width": {"method": "magnitude", "align": 1}})
    gated = instrument(g, spec)
    assert abs(gated.cost()["fraction"] - fraction) <= 0.03


def test_alignment_is_respected():
    g = _graph("deit")  # MLP hidden 256
    gated = instrument(g, Spec.from_dict({"budget": {"flops": 0.6}, "width": {"align": 16}}))
    for site, units in gated.decisions()["width"].items():
        if "mlp" in site:
            assert len(units) % 16 == 0


def test_impossible_budget_and_unsupported_axes_are_spec_errors():
    g = _graph("deit")
    with pytest.raises(vg.SpecError, match="impossible"):
        instrument(g, Spec.from_dict({"budget": {"flops": 0.01}, "width": {"heads": False}}))
    with pytest.raises(vg.SpecError, match="value dims: the bias of .* is computed in the graph"):
        instrument(_graph("beit"), Spec.from_dict({"width": {"heads": False, "mlp": False, "head_dim": True}}))
    with pytest.raises(vg.SpecError, match="needs data"):
        instrument(g, Spec.from_dict({"width": {"method": "taylor"}}))


def test_taylor_importance_uses_gradients():
    g = _graph("deit")
    batches = [(torch.randn(4, *g.input_size), torch.randint(0, 10, (4,))) for _ in range(2)]
    gated = instrument(g, Spec.from_dict({"width": {"method": "taylor"}}), calibration=batches)
    method = gated.axes["width"].method
    scores = method.importance_0
    assert scores.shape[0] == method.sites[0].units and scores.abs().sum() > 0
    assert abs(gated.cost()["fraction"] - 0.5) <= 0.03


def test_starrelu_mlp_rows_are_sliced_once():
    """MetaFormer's StarReLU reads fc1 twice (scale * relu(x)^2 + bias): each unit still owns one fc1 row."""
    from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv

    torch.manual_seed(0)  # a small caformer
    model = MetaFormer(depths=(1, 1, 1, 1), dims=(16, 32, 64, 64), token_mixers=[SepConv, SepConv, Attention, Attention],
                       norm_layers=[LayerNorm2dNoBias] * 2 + [LayerNormNoBias] * 2, num_classes=10).eval()
    g = vg.trace(model, torch.randn(2, 3, 64, 64))
    gated = instrument(g, Spec.from_dict({"budget": {"flops": 0.95}, "width": {"heads": False, "align": 4}}))
    _random_decisions(gated, seed=3)
    x = g.example_inputs[0]
    with torch.no_grad():
        compact = materialize(gated)
        assert (compact(x) - gated.set_mode("eval")(x)).abs().max() <= 1e-5 * g.gm(x).abs().max()
