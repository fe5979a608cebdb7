"""Value dims (UVC, ``width.head_dim``): v rows and output-projection columns cut inside every head.

Random decisions (the same count in every head, each head its own channels; a layer left with one
value dim; heads pruned too) are written into the frozen masks: open == original, gated ``eval`` ==
the materialized graph with q/k/v split apart, cost == the pricer's prediction == FlopCounterMode.
"""
from __future__ import annotations

import pytest
import timm
import torch

import vitgraph as vg
from tests.checks import round_trip, value_dim_mask
from tests.test_groups import _graph
from vitgraph.gated import instrument, materialize
from vitgraph.spec import Spec

VALUES = Spec.from_dict({"budget": {"flops": 0.5}, "width": {"method": "magnitude", "heads": True, "mlp": True,
                                                             "head_dim": True, "align": 1}})


def _random_decisions(gated, seed: int) -> dict[str, int]:
    """Random masks; value dims: k per head (1 in the first layer), each head its own k channels."""
    gen = torch.Generator().manual_seed(seed)
    method = gated.axes["width"].method
    first = True
    kept = {}
    for i, site in enumerate(method.sites):
        if site.kind == "head_dim":
            k = 1 if first else int(torch.randint(1, site.units // site.segments, (1,), generator=gen))
            first = False
            mask = value_dim_mask(site, k, gen)
        else:
            mask = torch.rand(site.units, generator=gen) < 0.6
            mask[0] = True
        getattr(method, f"frozen_{i}").copy_(mask)
        kept[site.name] = int(mask.sum())
    method.is_frozen.fill_(True)
    return kept


def _explicit_deit():
    """timm's attention spelled out (softmax(q k^T) v), not sdpa."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2,
                              num_heads=4).eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return vg.trace(model, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("key", ["handmade", "hugging_face", "deit", "explicit", "swin_shifted", "dinov2_reg",
                                 "relpos", "map_regs"])
def test_open_equals_original_and_eval_equals_split_graph(key):
    g = _explicit_deit() if key == "explicit" else _graph(key)
    gated = instrument(g, VALUES)
    sites = [s for s in gated.axes["width"].method.sites if s.kind == "head_dim"]
    assert sites, f"{key}: no value-dim group was gated"
    compact = round_trip(g, gated, lambda: _random_decisions(gated, seed=len(key)), key)
    cuts = [m for n, m in compact.named_modules() if n.endswith(".v_cut")]
    assert len(cuts) == len(sites), "every gated attention computes v with its own projection"
    assert any(c.out_features < c.in_features for c in cuts)


def test_fused_qkv_is_split_and_each_head_keeps_its_own_channels():
    g = _graph("deit")
    gated = instrument(g, VALUES)
    method = gated.axes["width"].method
    for i, site in enumerate(method.sites):
        mask = torch.ones(site.units, dtype=torch.bool)
        if site.kind == "head_dim":  # head 0 keeps channels 0 and 5, head 1 channels 3 and 7
            per = site.units // site.segments
            mask[:] = False
            mask[[0, 5, per + 3, per + 7]] = True
        getattr(method, f"frozen_{i}").copy_(mask)
    method.is_frozen.fill_(True)
    compact = materialize(gated)
    attn = compact.get_submodule("blocks.0.attn")
    assert not hasattr(attn, "qkv"), "the fused projection is gone"
    qkv = g.gm.get_submodule("blocks.0.attn.qkv").weight
    dim = qkv.shape[1]
    per = dim // 2
    want = qkv[2 * dim:][[0, 5, per + 3, per + 7]]
    assert torch.equal(attn.v_cut.weight, want)
    assert torch.equal(attn.q_cut.weight, qkv[:dim]) and torch.equal(attn.k_cut.weight, qkv[dim:2 * dim])
    proj = g.gm.get_submodule("blocks.0.attn.proj").weight
    assert torch.equal(attn.proj.weight, proj[:, [0, 5, per + 3, per + 7]])


@pytest.mark.parametrize("key, reason", [("beit", "computed in the graph"), ("xcit", "channel"),
                                         ("levit", "not a plain")])
def test_sites_that_cannot_be_split_are_refused_with_the_reason(key, reason):
    g = _graph(key)
    reasons = {a.prunable.get("head_dim") or "" for a in g.structure.attention}
    assert any(reason in r for r in reasons), reasons


def test_one_shot_value_dims_land_on_budget_with_parity_and_onnx():
    onnx_target = pytest.importorskip("vitgraph.targets.onnx")
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2,
                              num_heads=4, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    spec = Spec.from_dict({"budget": {"flops": 0.9}, "width": {"method": "magnitude", "heads": False,
                                                                "mlp": False, "head_dim": True}})
    result = vg.compress(model, spec, example_inputs=(x,), data="none", progress=False, latency_targets=())
    assert abs(result.report["budget"]["achieved"] - 0.9) <= 0.03
    assert result.report["parity"]["max_abs_err"] <= 1e-4
    dims = {m.out_features for n, m in result.compact.named_modules() if n.endswith(".v_cut")}
    assert dims and max(dims) < 64 and all(d % 4 == 0 for d in dims), "equal value dims in each of the 4 heads"
    report = onnx_target.lower(result.compact, (x,), "/tmp/vitgraph-test-value-dims.onnx", check_batches=(1, 3))
    assert report.max_abs_err <= 1e-4
