"""Embedding channels (``width.embed``): the residual stream narrows through every block, exactly.

Random decisions (the stream cut by half, with heads, value dims and MLP units pruned too) are
written into the frozen masks: open == original, gated ``eval`` (LayerNorm statistics over the kept
channels) == the narrowed graph, cost == the pricer's prediction == FlopCounterMode.
"""
from __future__ import annotations

import pytest
import timm
import torch

import vitgraph as vg
from tests.checks import round_trip, value_dim_mask
from tests.test_groups import _graph
from vitgraph.gated import instrument
from vitgraph.spec import Spec

EMBED = Spec.from_dict({"budget": {"flops": 0.5}, "width": {"method": "magnitude", "heads": True, "mlp": True,
                                                            "head_dim": True, "embed": True, "align": 1}})


def _decide(gated, seed: int) -> int:
    """Random masks: half the stream's channels, other groups random (equal value dims per head)."""
    gen = torch.Generator().manual_seed(seed)
    method = gated.axes["width"].method
    kept_embed = 0
    for i, site in enumerate(method.sites):
        if site.kind == "embed":
            mask = torch.zeros(site.units, dtype=torch.bool)
            mask[torch.randperm(site.units, generator=gen)[:site.units // 2]] = True
            kept_embed = int(mask.sum())
        elif site.kind == "head_dim":
            k = int(torch.randint(1, site.units // site.segments + 1, (1,), generator=gen))
            mask = value_dim_mask(site, k, gen)
        else:
            mask = torch.rand(site.units, generator=gen) < 0.6
            mask[0] = True
        getattr(method, f"frozen_{i}").copy_(mask)
    method.is_frozen.fill_(True)
    return kept_embed


@pytest.mark.parametrize("key", ["handmade", "hugging_face", "deit", "beit", "relpos", "map_regs"])
def test_open_equals_original_and_eval_equals_narrowed_graph(key):
    g = _graph(key)
    gated = instrument(g, EMBED)
    assert any(s.kind == "embed" for s in gated.axes["width"].method.sites), g.structure.embed_reason
    kept: list[int] = []
    compact = round_trip(g, gated, lambda: kept.append(_decide(gated, seed=len(key))), key)
    widths = {p.shape[-1] for n, p in compact.named_parameters() if n.endswith(("pos_embed", "cls_token"))}
    assert not widths or widths == set(kept) or key == "hugging_face"


def test_masked_layernorm_uses_the_kept_channels_only():
    g = _graph("deit")
    gated = instrument(g, EMBED)
    gate = gated.axes["width"].gates["embed"]
    x = torch.randn(2, 5, gate.units)
    w, b = torch.randn(gate.units), torch.randn(gate.units)
    keep = torch.arange(gate.units) % 3 == 0
    gate.mask = keep.float()
    got = gate(x, eps=1e-6, weight=w, bias=b)[..., keep]
    want = torch.nn.functional.layer_norm(x[..., keep], (int(keep.sum()),), w[keep], b[keep], 1e-6)
    assert torch.allclose(got, want, atol=1e-5)
    gate.mask = None
    assert torch.equal(gate(x, eps=1e-6, weight=w, bias=b), torch.nn.functional.layer_norm(x, (gate.units,), w, b,
                                                                                           1e-6))


@pytest.mark.parametrize("key, reason", [("swin", "residual stream"), ("levit", "changes width"),
                                         ("cait", "more than one branch"), ("dinov2_reg", "output")])
def test_streams_that_cannot_narrow_are_refused_with_the_reason(key, reason):
    assert reason in (_graph(key).structure.embed_reason or "")


def test_one_shot_embed_lands_on_budget_with_parity_and_onnx(tmp_path):
    onnx_target = pytest.importorskip("vitgraph.targets.onnx")
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2,
                              num_heads=4, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    spec = Spec.from_dict({"budget": {"flops": 0.5}, "width": {"method": "magnitude", "embed": True}})
    result = vg.compress(model, spec, example_inputs=(x,), data="none", progress=False, latency_targets=())
    assert abs(result.report["budget"]["achieved"] - 0.5) <= 0.03
    assert result.report["parity"]["max_abs_err"] <= 1e-4
    assert result.compact.get_parameter("pos_embed").shape[-1] < 64
    report = onnx_target.lower(result.compact, (x,), tmp_path / "embed.onnx", check_batches=(1, 3))
    assert report.max_abs_err <= 1e-4


def test_embed_with_depth_removal_slices_only_the_blocks_that_remain():
    """The stream group spans every block; depth deletes some first. The narrowing must leave the deleted
    blocks' slices and constants alone and still equal the gated model."""
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=6, num_classes=10).eval()
    spec = {"budget": {"flops": 0.5}, "depth": {"skip_blocks": True},
            "width": {"method": "magnitude", "heads": True, "mlp": True, "embed": True, "align": 1}}
    result = vg.compress(model, spec, data="none", progress=False)
    assert result.report["depth"]["removed_blocks"], "the test needs depth to remove a block"
    width = result.compact.get_parameter("cls_token").shape[-1]
    assert width < 192, "the test needs the stream narrowed"
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(result.gated(x), result.compact(x), atol=1e-4)
