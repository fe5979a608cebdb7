"""Recognition, cost and ONNX parity on real-size (randomly initialised) models of many families.

Each model is traced once per session (cached). Expected structure comes from the architectures'
published configurations, written out here independently of the analysis code.
"""
from __future__ import annotations

import functools

import pytest
import timm
import torch

import vitgraph as vg
from vitgraph.analysis.cost import flop_counter_flops

# name: (blocks, heads per block, qk head dim, MLP hidden per block, prefix tokens, pooling, token layout)
SWIN_HEADS = [3, 3, 6, 6] + [12] * 6 + [24, 24]
ZOO = {
    "deit_tiny_patch16_224": (12, [3] * 12, 64, [768] * 12, 1, "token", "sequence"),
    "deit_small_distilled_patch16_224": (12, [6] * 12, 64, [1536] * 12, 2, "token", "sequence"),
    "vit_base_patch16_224": (12, [12] * 12, 64, [3072] * 12, 1, "token", "sequence"),
    "vit_medium_patch16_gap_256": (12, [8] * 12, 64, [2048] * 12, 0, "avg", "sequence"),
    "deit3_small_patch16_224": (12, [6] * 12, 64, [1536] * 12, 1, "token", "sequence"),
    "eva02_tiny_patch14_224": (12, [3] * 12, 64, [512] * 12, 1, "avg", "sequence"),
    "beit_base_patch16_224": (12, [12] * 12, 64, [3072] * 12, 1, "avg", "sequence"),
    "cait_xxs24_224": (26, [4] * 26, 48, [768] * 26, 0, "token", "sequence"),
    "swin_tiny_patch4_window7_224": (12, SWIN_HEADS, 32, [4 * 32 * h for h in SWIN_HEADS], 0, "avg", "grid"),
    "vit_small_patch14_dinov2": (12, [6] * 12, 64, [1536] * 12, 1, "token", "sequence"),
    "vit_small_patch14_reg4_dinov2": (12, [6] * 12, 64, [1536] * 12, 5, "token", "sequence"),
    "mvitv2_tiny": (10, [1, 2, 2, 4, 4, 4, 4, 4, 8, 8], 96, [384, 768, 768] + [1536] * 5 + [3072] * 2, 0, "avg",
                    "sequence"),
    "levit_128": (14, [4] * 4 + [8] + [8] * 4 + [16] + [12] * 4, 16, [256] * 4 + [512] * 5 + [768] * 5, 0, "avg",
                  "sequence"),
    "xcit_tiny_12_p16_224": (14, [4] * 14, 48, [768] * 14, 0, "token", "sequence"),
}
SLOW = {"vit_large_patch16_224": (24, [16] * 24, 64, [4096] * 24, 1, "token", "sequence")}
CASES = [pytest.param(n, e, id=n) for n, e in ZOO.items()] + [
    pytest.param(n, e, id=n, marks=pytest.mark.slow) for n, e in SLOW.items()]
FAST_NAMES = list(ZOO)


@functools.lru_cache(maxsize=None)
def traced(name: str) -> vg.VitGraph:
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    size = model.pretrained_cfg["input_size"]
    return vg.trace(model, torch.randn(2, *size), name=name)


def _heads_from_modules(model: torch.nn.Module) -> list[int]:
    """Independent oracle: the `num_heads` attribute of every attention module, in module order."""
    return [m.num_heads for m in model.modules()
            if isinstance(getattr(m, "num_heads", None), int) and not list(m.children()) == []
            and not any(isinstance(getattr(c, "num_heads", None), int) for c in m.children())
            and any(isinstance(c, torch.nn.Linear) or hasattr(c, "linear") for c in m.modules())]


@pytest.mark.parametrize("name, expected", CASES)
def test_every_attention_and_mlp_is_recognised(name, expected):
    n_blocks, heads, head_dim, hidden, prefix, pooling, layout = expected
    g = traced(name)
    s = g.structure
    assert len(s.blocks) == n_blocks
    assert all(b.attention is not None and b.mlp is not None for b in s.blocks), \
        [b.name for b in s.blocks if b.attention is None or b.mlp is None]
    assert [b.attention.heads for b in s.blocks] == heads
    assert {b.attention.head_dim for b in s.blocks} == {head_dim}
    assert [b.mlp.hidden for b in s.blocks] == hidden
    assert s.tokens.prefix_tokens == prefix
    assert s.tokens.pooling == pooling
    assert s.tokens.layout == layout
    # every attention module of the eager model is a recognised site, with its heads
    assert sorted(a.heads for a in s.attention) == sorted(_heads_from_modules(traced_model(name)))
    # roles are written into node.meta for passes to read
    roles = {n.meta["vg.role"].kind for n in g.gm.graph.nodes if "vg.role" in n.meta}
    assert {"attn.core", "attn.proj", "mlp.fc1", "mlp.fc2", "residual.add"} <= roles


@functools.lru_cache(maxsize=None)
def traced_model(name: str) -> torch.nn.Module:
    return timm.create_model(name).eval()


@pytest.mark.parametrize("name", FAST_NAMES)
def test_cost_model_agrees_with_flop_counter(name):
    g = traced(name)
    reference = flop_counter_flops(g.gm, g.example_inputs, batch=2)
    assert abs(g.structure.flops - reference) <= 0.01 * reference
    assert sum(b.flops for b in g.structure.blocks) <= g.structure.flops
    assert g.structure.params == sum(p.numel() for p in traced_model(name).parameters())


def test_deit_small_numbers():
    """The figures `vitgraph inspect deit_small_patch16_224` must show."""
    g = traced("deit_small_patch16_224")
    assert [(b.attention.heads, b.attention.head_dim, b.mlp.hidden) for b in g.blocks] == [(6, 64, 1536)] * 12
    reference = flop_counter_flops(g.gm, g.example_inputs, batch=2)
    assert abs(g.structure.flops - reference) / reference < 0.01
    assert 9.1e9 < g.structure.flops < 9.3e9  # DeiT-S: 4.6 GMACs
    assert all(b.skippable and b.token_prunable for b in g.blocks)


def test_reasons_where_passes_cannot_apply():
    swin = traced("swin_tiny_patch4_window7_224")
    assert not any(b.token_prunable for b in swin.blocks)
    assert "grid" in swin.blocks[0].token_reason
    beit = traced("beit_base_patch16_224")
    assert all("relative position" in b.token_reason for b in beit.blocks)
    cait = traced("cait_xxs24_224")
    # talking heads (proj_l before the softmax, proj_w after it) are cut with the heads; class attention is plain
    assert cait.blocks[0].attention.prunable["heads"] is None and len(cait.blocks[0].attention.mixes) == 2
    assert cait.blocks[-1].attention.prunable["heads"] is None and not cait.blocks[-1].attention.mixes
    mvit = traced("mvitv2_tiny")
    reasons = [b.skip_reason for b in mvit.blocks]
    assert sum("stage transition" in (r or "") for r in reasons) == 3  # the three stage transitions
    # the other blocks pool their queries with stride 1: the feature size they hand on is the one they got
    # (torch.export records it as a number; fx traced it from the pooled tensor and kept the blocks)
    assert [i for i, r in enumerate(reasons) if r is None] == [0, 2, 4, 5, 6, 7, 9]
    assert "pooling" in mvit.blocks[0].attention.prunable["heads"]
    xcit = traced("xcit_tiny_12_p16_224")
    assert xcit.blocks[0].attention.mode == "channel"
    assert xcit.blocks[0].attention.prunable["heads"] is None
    assert xcit.blocks[0].attention.prunable["head_dim"] is not None


@pytest.mark.parametrize("name", FAST_NAMES)
def test_onnx_matches_eager_with_dynamic_batch(name, tmp_path):
    g = traced(name)
    report = vg.targets.onnx.lower(g.gm, g.example_inputs, tmp_path / "m.onnx", atol=1e-4)
    assert report.max_abs_err <= 1e-4
    assert len(report.per_batch) >= 2  # checked at two batch sizes through the dynamic axis


def test_beyond_the_list_relpos_mlp_is_not_a_block():
    """vit_relpos computes its position bias with a small MLP on constant coordinates: not a site."""
    g = traced("vit_relpos_small_patch16_224")
    assert len(g.blocks) == 12 and all(b.attention and b.mlp for b in g.blocks)
    assert {b.attention.bias for b in g.blocks} == {"rel_pos_table"}   # its MLP output is indexed by position
    assert not any(b.token_prunable for b in g.blocks)


def test_beyond_the_list_pvt_v2_spatial_reduction_and_depthwise_mlp():
    g = traced("pvt_v2_b0")
    assert [b.attention.fused for b in g.blocks] == ["q+kv"] * 8
    assert [b.attention.tokens_kv for b in g.blocks][:2] == [49, 49]   # keys pooled 8x8 in stage 1
    # the hidden units pass through a depthwise 3x3 conv: each owns its filter, and the view to a map its size
    assert all(b.mlp.prunable["mlp"] is None for b in g.blocks)
    mlp = next(gr for gr in g.structure.groups if gr.name == "stages.0.blocks.0.mlp.mlp")
    assert {"stages.0.blocks.0.mlp.dwconv.weight", "stages.0.blocks.0.mlp.dwconv.bias"} <= {s.target for s in mlp.slices}
    assert [(c.value, c.per_unit) for c in mlp.constants] == [(256, 1)]
    assert not any(b.token_prunable for b in g.blocks)


def test_beyond_the_list_attention_pool_and_registers():
    siglip = traced("vit_base_patch16_siglip_224")
    assert siglip.structure.tokens.pooling == "attn" and len(siglip.blocks) == 13
    assert siglip.blocks[-1].attention.tokens_q == 1 and not siglip.blocks[-1].skippable
    little = traced("vit_little_patch16_reg4_gap_256")
    assert (little.structure.tokens.prefix_tokens, little.structure.tokens.pooling) == (4, "avg")


def test_beyond_the_list_opaque_leaf_attention_is_reported():
    # torch.export enters timm's notrace LocallyGroupedAttn (fx kept it whole and saw only the 9 global
    # sub-sampled attentions): all 18 sites are recognised, and nothing is opaque
    g = traced("twins_svt_small")
    assert len(g.blocks) == 18 and sum(b.attention is not None for b in g.blocks) == 18
    assert not any("leaf module" in n for n in g.structure.notes)
    # a module the user keeps whole is opaque again, and the report says so
    from timm.models.twins import LocallyGroupedAttn
    model = timm.create_model("twins_svt_small").eval()
    leaf = vg.trace(model, g.example_inputs, name="twins_svt_small", leaf_modules=[LocallyGroupedAttn])
    assert sum(b.attention is not None for b in leaf.blocks) == 9   # the global sub-sampled attentions
    assert any("LocallyGroupedAttn" in n and "leaf module" in n for n in leaf.structure.notes)


def test_beyond_the_list_hiera_mask_unit_attention():
    """Hiera attends inside mask units: q/k/v are (B, heads, windows, tokens, dim); some q are max-pooled."""
    g = traced("hiera_tiny_224")
    assert [b.attention.heads for b in g.blocks] == [1, 2, 2, 4, 4, 4, 4, 4, 4, 4, 8, 8]
    pooled = [b.index for b in g.blocks if "pooling" in (b.attention.prunable["heads"] or "")]
    assert pooled == [1, 3, 10]                      # the first block of stages 2, 3 and 4
    assert all("windowed" in b.token_reason for b in g.blocks[:4])      # attention inside mask units
    # stage 3 attends globally, but the tokens are regrouped for the q-pooling of block 10 right after it
    assert "after the block reshapes tokens" in g.blocks[9].token_reason
    assert all(b.token_reason.startswith("later block 9:") for b in g.blocks[4:9])
    assert [b.token_prunable for b in g.blocks[10:]] == [False, True]


def test_beyond_the_list_metaformer_star_relu_and_res_scale():
    """CAFormer: StarReLU spelled as element-wise ops, a learned scale on the shortcut, conv downsampling.
    Its two conv stages: a separable conv (pointwise -> StarReLU -> depthwise 7x7 -> pointwise) mixes the
    tokens, a pointwise-conv MLP follows."""
    g = traced("caformer_s18")
    assert len(g.blocks) == 18
    assert all(b.mixer == "conv3" and b.attention is None and b.mlp for b in g.blocks[:6])
    assert [r.kind for r in g.blocks[0].residuals] == ["mixer", "mlp"] and g.blocks[0].skippable
    assert {gr.name for gr in g.structure.groups} >= {"stages.0.blocks.0.mlp.mlp", "stages.1.blocks.2.mlp.mlp"}
    assert all(b.attention and b.mlp for b in g.blocks[6:])
    assert all("res-scale" in b.skip_reason for b in g.blocks[6:])
    # the tokens begin at the attention stages (after a downsampling conv), which reshape them back to grids
    assert g.structure.tokens.layout == "sequence" and g.structure.tokens.tokens == 196
    assert all("no attention" in b.token_reason for b in g.blocks[:6])
    assert all("into a 14x14 grid" in b.token_reason for b in g.blocks[6:15])
    assert not any(b.token_prunable for b in g.blocks)
