"""What recognition cannot take apart becomes a named refusal or a site left dense, never a broken rewrite
(each case was a failed row of bench/survey.py): per-head RoPE tables, fixed token tables, two attention maps
on one projection, a relative-position table shared by every block, a CNN backbone before the tokens."""
from __future__ import annotations

import re

import pytest
import timm
import torch

import vitgraph as vg

WIDTH = {"budget": {"flops": 0.5}, "width": {"method": "magnitude", "heads": True, "mlp": True}}
TOKENS = {"budget": {"flops": 0.6}, "tokens": {"method": "attention"}}


def _traced(name: str, **kwargs) -> vg.VitGraph:
    model = timm.create_model(name, img_size=64, depth=2, **kwargs).eval()
    return vg.trace(model, torch.randn(2, 3, 64, 64))


def _compress(g: vg.VitGraph, spec: dict) -> dict:
    return vg.compress(g, spec, data="none", progress=False, latency_targets=()).report


def test_per_head_rope_refuses_heads_and_tokens_with_the_reason():
    g = _traced("vit_small_patch16_rope_mixed_224")
    assert all("per-head tensor" in b.attention.prunable["heads"] for b in g.blocks)
    assert all("fixed table over 16 tokens" in b.token_reason for b in g.blocks)
    report = _compress(g, WIDTH)  # MLP units alone carry the cut; heads stay whole
    assert abs(report["budget"]["achieved"] - 0.5) <= 0.03 and report["parity"]["max_abs_err"] < 1e-4
    assert all(b["attention"]["heads"] == 6 for b in report["blocks"])
    with pytest.raises(vg.SpecError, match="fixed table"):
        _compress(g, TOKENS)


def test_a_rope_table_built_from_the_image_size_is_a_fixed_table_too():
    g = _traced("vit_small_patch16_dinov3")  # the table's size comes from x.shape, its values from no input
    assert all("fixed table" in b.token_reason for b in g.blocks)


def test_two_attention_maps_on_one_projection_are_one_site():
    g = _traced("vit_dwee_patch16_reg1_gap_256")
    assert len(g.blocks) == 2 and len(g.structure.attention) == 2  # not one block per map
    assert all("two attention maps" in b.attention.prunable["heads"] for b in g.blocks)
    assert all("two attention maps" in b.token_reason for b in g.blocks)
    assert abs(_compress(g, WIDTH)["budget"]["achieved"] - 0.5) <= 0.03
    depth = _compress(g, {**WIDTH, "budget": {"flops": 0.7}, "depth": {"skip_blocks": True}})
    assert abs(depth["budget"]["achieved"] - 0.7) <= 0.03


def test_a_table_shared_by_every_block_is_left_dense_by_the_probe():
    g = _traced("vit_srelpos_small_patch16_224")
    result = vg.compress(g, WIDTH, data="none", progress=False, latency_targets=())
    skipped = result.report["skipped_sites"]
    assert any("breaks the rewritten graph" in why for why in skipped.values()), skipped
    assert abs(result.report["budget"]["achieved"] - 0.5) <= 0.03 and result.report["parity"]["max_abs_err"] < 1e-4


def test_a_hybrid_s_tokens_begin_after_its_cnn_backbone():
    model = timm.create_model("vit_small_r26_s32_224", img_size=64, depth=2).eval()
    g = vg.trace(model, torch.randn(2, 3, 64, 64))
    tokens = g.structure.tokens
    assert tokens.layout == "sequence" and tokens.prefix_tokens == 1 and tokens.embed == "patch_embed_proj"
    vit_blocks = [b for b in g.blocks if b.attention is not None]
    assert vit_blocks and all(b.token_prunable for b in vit_blocks)
    assert all("no attention" in b.token_reason for b in g.blocks if b.attention is None)


def test_two_blocks_in_one_module_are_decided_apart():
    """TNT's inner and outer transformers share the module path blocks.i: decided by one name, depth removed
    both and landed at 0.739 for a 0.70 budget (issue 14); named by their attention sites they land."""
    model = timm.create_model("tnt_s_patch16_224", img_size=64, depth=4).eval()
    g = vg.trace(model, torch.randn(2, 3, 64, 64))
    assert [b.name for b in g.blocks[:2]] == ["blocks.0.attn_in", "blocks.0.attn_out"]
    report = _compress(g, {**WIDTH, "budget": {"flops": 0.7}, "depth": {"skip_blocks": True}})
    assert abs(report["budget"]["achieved"] - 0.7) <= 0.03 and report["parity"]["max_abs_err"] < 1e-4


def test_a_single_head_site_is_left_dense_with_that_reason():
    """pvt_v2's first stage has one head: pruning it would delete the attention, so the report names that site
    and the axis that can remove it. Its MLP units (through their depthwise convs) carry the cut; with heads
    alone the budget is out of reach and the refusal names the site."""
    model = timm.create_model("pvt_v2_b0", depths=(1, 1, 1, 1)).eval()
    g = vg.trace(model, torch.randn(2, 3, 224, 224))
    one = [a.name for a in g.structure.attention if a.heads == 1]
    assert one == ["stages.0.blocks.0.attn"]
    why = r"it has a single head: removing it would remove the layer \(remove the branch with depth\.per_branch instead\)"
    report = _compress(g, WIDTH)
    assert abs(report["budget"]["achieved"] - 0.5) <= 0.03 and report["parity"]["max_abs_err"] < 1e-4
    assert re.fullmatch(why, report["skipped_sites"]["stages.0.blocks.0.attn"])
    with pytest.raises(vg.SpecError, match=r"stages\.0\.blocks\.0\.attn: " + why):
        _compress(g, {**WIDTH, "width": {**WIDTH["width"], "mlp": False}})


def test_tokens_drop_before_an_attention_pool_that_reads_the_whole_stream():
    """SigLIP's attention pool (no class token) attends over every token of the stream: tokens dropped
    before an earlier block reach it as fewer keys, priced exactly; with a class token timm's pool reads
    the patch tokens alone, a different count, and that block is named in the refusal."""
    from vitgraph.analysis.cost import flop_counter_flops

    g = _traced("vit_base_patch16_siglip_224", global_pool="map")  # blocks 0, 1, then the pool (block 2)
    pool = g.blocks[-1]
    assert pool.reads_stream(g.structure.tokens.tokens) and not pool.token_prunable
    result = vg.compress(g, {**TOKENS, "tokens": {"method": "attention", "stages": [1]}}, data="none",
                         progress=False, latency_targets=())
    report = result.report
    assert abs(report["budget"]["achieved"] - 0.6) <= 0.03 and report["parity"]["max_abs_err"] < 1e-4
    assert report["compressed"]["flops"] == flop_counter_flops(result.compact, (torch.randn(1, 3, 64, 64),), 1)
    assert report["blocks"][-1]["tokens_in"] == 1
    with pytest.raises(vg.SpecError, match="tokens.method spvit masks the keys .* block 2's attention"):
        _compress(g, {**TOKENS, "tokens": {"method": "spvit", "stages": [1]}})

    g = _traced("vit_small_patch16_224", global_pool="map")  # a class token: the pool reads 16 of 17 tokens
    refusal = r"block 2 \(attn_pool\) of .* takes 1 token, not the 17 of the token stream"
    with pytest.raises(vg.SpecError, match=refusal):
        _compress(g, {**TOKENS, "tokens": {"method": "attention", "stages": [1]}})
