"""Front ends and errors: timm, Hugging Face, a hand-written module; exact traces; clear failures."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import vitgraph as vg
from tests.handmade import handmade_vit


def test_handmade_vit_explicit_softmax_separate_qkv():
    model = handmade_vit()
    g = vg.trace(model, torch.randn(2, 3, 32, 32))
    assert g.trace_error == 0.0
    s = g.structure
    assert len(s.blocks) == 3
    for b in s.blocks:
        a = b.attention
        assert (a.impl, a.fused, a.heads, a.head_dim, a.mode) == ("explicit", "separate", 4, 12, "token")
        assert b.mlp.hidden == 96 and b.skippable and b.token_prunable
    assert (s.tokens.prefix_tokens, s.tokens.grid, s.tokens.pooling) == (1, (4, 4), "token")
    heads = s.group("blocks.0.attn.heads")
    assert heads.units == 4
    # q, k, v weights and biases give rows, proj gives columns; head 1 owns rows/cols 12..23
    rows = {sl.target: sl.indices[1] for sl in heads.slices}
    assert rows["blocks.0.attn.to_q.weight"] == tuple(range(12, 24))
    assert rows["blocks.0.attn.out.weight"] == tuple(range(12, 24))
    # reshape arguments carrying the head count: the three view(b, n, 4, c // 4) and the merge reshape(b, n, c),
    # c = 4 x 12: torch.export writes each as the number it was on the example, so all four are literals
    consts = sorted((c.value, c.per_unit, c.literal) for c in heads.constants)
    assert consts == [(4, 1, True)] * 3 + [(48, 12, True)]


def test_hugging_face_vit():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, image_size=32, patch_size=8, num_labels=10)
    model = transformers.ViTForImageClassification(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    g = vg.trace(model, x)
    assert g.trace_error <= 1e-6
    assert [(b.attention.heads, b.attention.head_dim, b.mlp.hidden) for b in g.blocks] == [(4, 16, 128)] * 2
    assert g.blocks[0].attention.fused == "separate"
    assert (g.structure.tokens.prefix_tokens, g.structure.tokens.pooling) == (1, "token")
    with torch.no_grad():
        assert torch.allclose(g.gm(x), model(pixel_values=x).logits, atol=1e-6)


def test_gated_mlp_is_recognised():
    timm = pytest.importorskip("timm")
    from timm.layers import SwiGLUPacked
    model = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64,
                              num_heads=2, mlp_layer=SwiGLUPacked, mlp_ratio=2, num_classes=5).eval()
    g = vg.trace(model, torch.randn(2, 3, 32, 32))
    assert all(b.mlp.gated and b.mlp.hidden == 64 for b in g.blocks)
    group = g.structure.group(f"{g.blocks[0].mlp.name}.mlp")
    (fc1,) = [s for s in group.slices if s.what == "weight.out"]
    # a packed SwiGLU couples unit u to fc1 rows u (value) and u + hidden (gate)
    assert sorted(fc1.indices[3]) == [3, 67]


@pytest.mark.parametrize("style", ["einsum", "bmm"])
def test_attention_spelled_with_einsum_or_bmm(style):
    g = vg.trace(handmade_vit(style=style), torch.randn(2, 3, 32, 32))
    attn = [b.attention for b in g.blocks]
    assert [(a.heads, a.head_dim, a.tokens_q, a.tokens_kv) for a in attn] == [(4, 12, 17, 17)] * 3
    # heads map to rows of (B, H, N, d) tensors; bmm on (B*H, N, d) hides them, and inspect says so
    expected = None if style == "einsum" else "could not map every head to projection rows and columns"
    assert {a.prunable["heads"] for a in attn} == {expected}
    from vitgraph.analysis.cost import flop_counter_flops
    assert g.structure.flops == flop_counter_flops(g.gm, g.example_inputs, batch=2)


class ValueBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # depends on tensor *values*: symbolic tracing cannot follow it
            return x * 2
        return x


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.odd = ValueBranch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.odd(self.lin(x))


def test_untraceable_model_names_module_and_fix():
    with pytest.raises(vg.TraceError) as info:
        vg.trace(Untraceable(), torch.randn(2, 3, 4))
    msg = str(info.value)
    assert "odd" in msg and "ValueBranch" in msg and "leaf_modules" in msg
    # and the suggested fix works
    g = vg.trace(Untraceable(), torch.randn(2, 3, 4), leaf_modules=[ValueBranch])
    assert any(n.op == "call_module" and n.target == "odd" for n in g.gm.graph.nodes)


def test_wrong_input_size_says_what_is_expected():
    timm = pytest.importorskip("timm")
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, patch_size=16, depth=1)
    with pytest.raises(vg.InputSizeError) as info:
        vg.trace(model, torch.randn(1, 3, 32, 32))
    assert "3x64x64" in str(info.value) and "--input-size" in str(info.value)


def test_cost_can_be_priced_in_kept_fractions():
    from vitgraph.analysis.cost import evaluate
    g = vg.trace(handmade_vit(), torch.randn(2, 3, 32, 32))
    full = evaluate(g.gm, {})
    assert full == g.structure.flops
    keep = torch.tensor(0.5, requires_grad=True)
    mlp_groups = {gr.name: keep for gr in g.structure.groups if gr.kind == "mlp"}
    priced = evaluate(g.gm, mlp_groups)
    mlp_flops = sum(2 * 17 * 48 * 96 * 2 for _ in g.blocks)  # fc1 + fc2, 17 tokens, per image
    assert abs(float(priced.detach()) - (full - 0.5 * mlp_flops)) < 1e-3 * full
    priced.backward()
    assert abs(float(keep.grad) - mlp_flops) < 1e-3 * full  # d cost / d keep = the MLP FLOPs


def test_cost_prices_skipped_blocks_and_dropped_tokens():
    from vitgraph.analysis.cost import evaluate
    g32 = vg.trace(handmade_vit(), torch.randn(2, 3, 32, 32))   # 16 patches + class token
    g16 = vg.trace(handmade_vit(image=16), torch.randn(2, 3, 16, 16))  # 4 patches + class token
    blocks = sum(b.flops for b in g32.blocks)
    assert evaluate(g32.gm, {f"block.{b.index}": 0.0 for b in g32.blocks}) == g32.structure.flops - blocks
    assert evaluate(g32.gm, {"block.1": 0.0}) == g32.structure.flops - g32.blocks[1].flops
    # token-wise ops scale with the tokens kept, attention products with their square
    in_blocks = {n for b in g32.blocks for n in b.nodes}
    priced = evaluate(g32.gm, {f"tokens.{b.index}": 5 / 17 for b in g32.blocks}, nodes=in_blocks)
    assert abs(priced - sum(b.flops for b in g16.blocks)) <= 1e-6 * blocks


@pytest.mark.parametrize("which", ["handmade", "hugging_face"])
def test_onnx_parity_beyond_timm(which, tmp_path):
    if which == "handmade":
        model, x = handmade_vit(), torch.randn(2, 3, 32, 32)
    else:
        transformers = pytest.importorskip("transformers")
        cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, image_size=32, patch_size=8, num_labels=10)
        model, x = transformers.ViTForImageClassification(cfg).eval(), torch.randn(2, 3, 32, 32)
    g = vg.trace(model, x)
    report = vg.targets.onnx.lower(g.gm, g.example_inputs, tmp_path / "m.onnx")
    assert report.max_abs_err <= 1e-4 and len(report.per_batch) >= 2


class PreLogitsViT(nn.Module):
    """A hand-written ViT whose classifier has a Linear -> Tanh -> Linear representation layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = handmade_vit(depth=2)
        self.body.head = nn.Identity()
        self.pre_logits = nn.Sequential(nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_logits(self.body(x))


def test_head_mlp_is_a_site_but_not_a_block():
    g = vg.trace(PreLogitsViT(), torch.randn(2, 3, 32, 32))
    assert len(g.blocks) == 2
    head_mlp = [m for m in g.structure.mlps if m.block is None]
    assert [m.name for m in head_mlp] == ["pre_logits"] and head_mlp[0].hidden == 32


def test_fx_front_end_reads_a_parameter_size_by_dimension():
    """A compact graph may ask a parameter for one dimension (a per-channel scale cut with its channels,
    MetaFormer's ``res_scale``); fx's parameter proxy only answered ``size()`` (caformer's re-trace failed)."""
    from vitgraph.capture.frontend import trace_module

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return x * self.scale.view(1, self.scale.size(0)) + self.scale.size()[0]

    m = Scale()
    x = torch.randn(2, 6)
    gm = trace_module(m, (x,))
    assert torch.equal(gm(x), m(x))
