"""Attention in forms other than q @ k^T -> softmax -> @ v on linear projections is recognised, and every width
axis it cannot take is refused with the reason read from the graph: per-head chunks on a conv map
(EfficientViT-MSRA's cascaded group attention) and separable attention (MobileViT-v2). Hand-written modules
reproduce each pattern; timm's own models check the real spelling at a small input."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import vitgraph as vg

HEADS_ONLY = {"budget": {"flops": 0.8}, "width": {"method": "magnitude", "heads": True, "mlp": False}}
VALUE_DIMS = {"budget": {"flops": 0.8}, "width": {"method": "magnitude", "heads": False, "head_dim": True,
                                                  "mlp": False}}


def _conv_bn(cin: int, cout: int, k: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class Cascaded(nn.Module):
    """Heads one per chunk, each with its own 1x1 conv q/k/v; head i's output is added to head i+1's input."""

    def __init__(self, dim: int = 32, heads: int = 2, key_dim: int = 8, tokens: int = 16) -> None:
        super().__init__()
        self.key_dim, self.val_dim, self.scale = key_dim, dim // heads, key_dim ** -0.5
        self.qkvs = nn.ModuleList(_conv_bn(dim // heads, 2 * key_dim + self.val_dim) for _ in range(heads))
        self.dws = nn.ModuleList(_conv_bn(key_dim, key_dim, 3, groups=key_dim) for _ in range(heads))
        self.proj = nn.Sequential(nn.ReLU(), _conv_bn(self.val_dim * heads, dim))
        self.biases = nn.Parameter(torch.randn(heads, tokens, tokens) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        chunks = x.chunk(len(self.qkvs), dim=1)
        feat, outs = chunks[0], []
        for i, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            feat = qkv(feat if i == 0 else feat + chunks[i])
            q, k, v = feat.view(b, -1, h, w).split([self.key_dim, self.key_dim, self.val_dim], dim=1)
            q, k, v = dw(q).flatten(2), k.flatten(2), v.flatten(2)
            attn = ((q * self.scale).transpose(-2, -1) @ k + self.biases[i]).softmax(dim=-1)
            feat = (v @ attn.transpose(-2, -1)).view(b, self.val_dim, h, w)
            outs.append(feat)
        return self.proj(torch.cat(outs, 1))


class Separable(nn.Module):
    """MobileViT-v2: a one-channel query's softmax over the tokens pools the keys into one context vector."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.qkv = nn.Conv2d(dim, 1 + 2 * dim, 1)
        self.out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, pixels per patch, patches)
        q, k, v = self.qkv(x).split([1, self.dim, self.dim], dim=1)
        context = (k * F.softmax(q, dim=-1)).sum(dim=-1, keepdim=True)
        return self.out(F.relu(v) * context.expand_as(v))


class ConvMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Net(nn.Module):
    """A stem, ``depth`` blocks of ``x + mixer(norm(x))``, ``x + mlp(norm(x))`` on a (B, C, H, W) map, a head.
    ``patches``: the blocks run on (B, C, 4, N) — 2x2 pixels per patch — as MobileViT-v2 unfolds its map."""

    def __init__(self, mixer: type, depth: int = 2, dim: int = 32, patches: bool = False) -> None:
        super().__init__()
        self.patches = patches
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.mixers = nn.ModuleList(mixer(dim) for _ in range(depth))
        self.mlps = nn.ModuleList(ConvMlp(dim, 2 * dim) for _ in range(depth))
        self.norms = nn.ModuleList(nn.GroupNorm(1, dim) for _ in range(2 * depth))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        b, c, h, w = x.shape
        if self.patches:
            x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c, 4, -1)
        for i, (mixer, mlp) in enumerate(zip(self.mixers, self.mlps)):
            x = x + mixer(self.norms[2 * i](x))
            x = x + mlp(self.norms[2 * i + 1](x))
        return self.head(x.mean(dim=(2, 3)))


def _trace(model: nn.Module, size: int = 16) -> vg.VitGraph:
    torch.manual_seed(0)
    return vg.trace(model.eval(), torch.randn(2, 3, size, size))


def _compress(g: vg.VitGraph, spec: dict) -> dict:
    return vg.compress(g, spec, data="none", progress=False, latency_targets=()).report


def test_heads_one_per_chunk_are_one_site_per_attention_with_named_refusals():
    g = _trace(Net(Cascaded))
    s = g.structure
    assert len(s.attention) == 2 and [b.attention is not None for b in s.blocks] == [True, True]
    for i, b in enumerate(s.blocks):
        a = b.attention
        assert a.name == f"mixers.{i}" and a.heads == 2 and a.head_dim == 8 and a.v_head_dim == 16
        assert a.tokens_q == a.tokens_kv == 16 and a.mode == "token" and len(a.head_cores) == 1
        assert a.q == a.k == a.v and a.q.startswith(f"mixers_{i}_qkvs_0") and a.proj.startswith(f"mixers_{i}_proj")
        assert "one per chunk" in a.prunable["heads"] and "cascade" in a.prunable["heads"]
        assert "q passes through the spatial convolution mixers.{}.dws.0.0".format(i) in a.prunable["heads"]
        assert "added to the next head's input channels" in a.prunable["head_dim"]
        assert b.mlp is not None and b.mlp.prunable.get("mlp") is None and b.skippable
    assert not any("softmax" in note for note in s.notes)  # every head's core belongs to its site
    roles = [n.meta["vg.role"].kind for n in g.gm.graph.nodes if "vg.role" in n.meta]
    assert roles.count("attn.core") == 4 and roles.count("attn.proj") == 2


def test_separable_attention_is_a_site_of_its_own_mode():
    g = _trace(Net(Separable, patches=True))
    s = g.structure
    assert len(s.attention) == 2
    for b in s.blocks:
        a = b.attention
        assert a.mode == "separable" and a.heads == 1 and a.head_dim == a.v_head_dim == 32
        assert a.tokens_q == a.tokens_kv == 4  # 16 / 4 = 4x4 map, 2x2 pixels per patch: 4 patches
        assert a.fused == "qkv" and a.proj.startswith(f"mixers_{b.index}_out")
        assert "no heads to cut" in a.prunable["heads"]
        assert "also a key row" in a.prunable["head_dim"]
    assert not any("softmax" in note for note in s.notes)
    assert "sep" in g.summary()


@pytest.mark.parametrize("mixer, patches, why", [(Cascaded, False, "one per chunk"),
                                                 (Separable, True, "no heads to cut")])
def test_width_on_heads_or_value_dims_refuses_with_the_reason(mixer, patches, why):
    g = _trace(Net(mixer, depth=1, patches=patches))
    with pytest.raises(vg.SpecError, match=why):
        _compress(g, HEADS_ONLY)
    with pytest.raises(vg.SpecError, match="value dims"):
        _compress(g, VALUE_DIMS)


def test_mlp_width_still_compresses_around_them():
    g = _trace(Net(Cascaded, depth=1))
    report = _compress(g, {"budget": {"flops": 0.8}, "width": {"method": "magnitude", "heads": True, "mlp": True}})
    assert report["parity"]["max_abs_err"] < 1e-4
    assert report["blocks"][0]["attention"]["heads"] == 2


@pytest.mark.parametrize("name, size, sites, heads, mode, why", [
    ("efficientvit_m0", 64, 6, 4, "token", "heads run one per chunk"),  # depths (1, 2, 3), 4 heads each
    ("mobilevitv2_050", 64, 9, 1, "separable", "no heads to cut"),     # transformer depths (2, 4, 3)
])
def test_timm_models(name, size, sites, heads, mode, why):
    model = timm.create_model(name, pretrained=False)
    g = _trace(model, size)
    attention = g.structure.attention
    assert len(attention) == sites and all(a.block is not None for a in attention)
    assert {a.heads for a in attention} == {heads} and {a.mode for a in attention} == {mode}
    assert all(why in a.prunable["heads"] and a.prunable["head_dim"] for a in attention)
    assert not any("softmax" in note for note in g.structure.notes)
    with pytest.raises(vg.SpecError, match=why):
        _compress(g, HEADS_ONLY)


def test_tiny_vit_keeps_its_sites():
    g = _trace(timm.create_model("tiny_vit_5m_224", pretrained=False), 224)
    attention = g.structure.attention
    assert len(attention) == 10 and all(a.impl == "sdpa" and not a.head_cores for a in attention)
    assert all(a.prunable["heads"] is None for a in attention)
