"""Attention fused into ONNX Runtime's MultiHeadAttention (``vitgraph.targets.ort_attention``): every site of a
fused-qkv (timm) and a separate-q/k/v (hand-written) ViT, pruned heads included, equal to the unfused file; a
site it cannot read is left alone; a fusion that disagrees is never written; the INT8 plan that uses it."""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from vitgraph.targets import int8, ort_attention
from vitgraph.targets import onnx as onnx_target
from vitgraph.targets._common import LoweringError
from vitgraph.targets.ort_attention import fuse_attention

import vitgraph as vg
from tests.handmade import Attention, handmade_vit

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _deit(**kw: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=3,
                             num_heads=4, num_classes=10, **kw).eval()


def _export(model: torch.nn.Module, path: Path) -> Path:
    onnx_target.lower(model.eval(), (X,), path, check_batches=(1,))
    return path


def _ops(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _heads(path: Path) -> list[int]:
    return [next(a.i for a in n.attribute if a.name == "num_heads")
            for n in onnx.load(str(path)).graph.node if n.op_type == "MultiHeadAttention"]


def _same(a: Path, b: Path) -> None:
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    (ya,), (yb,) = (onnx_target.run(onnx_target.session(p, threads=1), x) for p in (a, b))
    np.testing.assert_allclose(yb, ya, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("build", [_deit, lambda: handmade_vit(depth=3, heads=4)], ids=["timm_qkv", "separate_qkv"])
def test_every_site_fuses_and_matches(build, tmp_path):
    src = _export(build(), tmp_path / "a.onnx")
    assert fuse_attention(src, tmp_path / "f.onnx") == 3
    ops = _ops(tmp_path / "f.onnx")
    assert ops["MultiHeadAttention"] == 3 and ops["Softmax"] == 0 and _heads(tmp_path / "f.onnx") == [4, 4, 4]
    assert ops["Transpose"] < _ops(src)["Transpose"]  # the head split and merge are gone
    _same(src, tmp_path / "f.onnx")


def test_pruned_heads_fuse_with_the_kept_count(tmp_path):
    model = _deit()
    spec = {"budget": {"flops": 0.75}, "width": {"method": "magnitude", "heads": True}}
    compact = vg.compress(model, spec, example_inputs=(X,), data="none", progress=False, latency_targets=()).compact
    kept = sorted(p.shape[0] // 3 // 16 for n, p in compact.named_parameters() if n.endswith("qkv.weight"))
    src = _export(compact, tmp_path / "c.onnx")
    assert fuse_attention(src, tmp_path / "f.onnx") == len(kept)
    assert sorted(_heads(tmp_path / "f.onnx")) == kept and kept != [4, 4, 4]
    _same(src, tmp_path / "f.onnx")


class _Biased(Attention):
    """Scores plus a learned bias before the softmax (relative position bias): not plain attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__(dim, heads)
        self.bias = torch.nn.Parameter(torch.randn(heads, 17, 17))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (f(x).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        attn = torch.softmax(q @ k.transpose(-2, -1) * self.scale + self.bias, dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, c))


def test_a_site_it_cannot_read_is_left_alone(tmp_path):
    model = handmade_vit(depth=2, heads=4)
    model.blocks[0].attn = _Biased(48, 4)
    src = _export(model, tmp_path / "a.onnx")
    assert fuse_attention(src, tmp_path / "f.onnx") == 1  # block 1 only
    assert _ops(tmp_path / "f.onnx")["Softmax"] == 1
    _same(src, tmp_path / "f.onnx")


def test_a_fusion_that_disagrees_is_not_written(tmp_path, monkeypatch):
    src = _export(_deit(), tmp_path / "a.onnx")
    read = ort_attention._site

    def wrong_scale(g, softmax):
        site = read(g, softmax)
        return site and ort_attention._Site(site.q, site.k, site.v, site.scale * 2, site.out)

    monkeypatch.setattr(ort_attention, "_site", wrong_scale)
    assert fuse_attention(src, tmp_path / "f.onnx") == 0
    assert list(tmp_path.iterdir()) == [src]


def test_int8_plan_fuses_or_says_why(tmp_path):
    src = _export(_deit(), tmp_path / "a.onnx")
    rep = int8.quantize(src, tmp_path / "q.onnx", plan="products+mha")
    assert rep.plan == "products+mha" and rep.fp32_nodes["MultiHeadAttention"] == 3 and rep.quantized_nodes > 0
    assert "Softmax" not in rep.fp32_ops and _ops(tmp_path / "q.onnx")["MultiHeadAttention"] == 3
    int8.check(rep, src, None, repeats=2)
    assert rep.agreement >= 0.9
    plain = _export(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 8, 8), torch.nn.Flatten(), torch.nn.Linear(128, 10)),
                    tmp_path / "plain.onnx")
    with pytest.raises(LoweringError, match="no attention site"):
        int8.quantize(plain, tmp_path / "p.onnx", plan="products+mha")
    assert not (tmp_path / "p.onnx").exists()


def test_relative_position_bias_becomes_attention_bias(tmp_path):
    """timm BEiT adds a (1, heads, n, n) relative position bias to the scaled scores: MultiHeadAttention's
    ``attention_bias``; HF BEiT adds a runtime mask through ``Where`` and guards the softmax against NaN."""
    torch.manual_seed(0)
    beit = timm.create_model("beit_base_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                             num_classes=10).eval()
    src = _export(beit, tmp_path / "beit.onnx")
    assert fuse_attention(src, tmp_path / "f.onnx") == 2
    mha = [n for n in onnx.load(str(tmp_path / "f.onnx")).graph.node if n.op_type == "MultiHeadAttention"]
    assert all(len(n.input) == 6 and n.input[5] for n in mha)  # the bias as input 5
    _same(src, tmp_path / "f.onnx")
    pytest.importorskip("transformers")
    from tests.foreign import build_beit

    hf = _export(build_beit().eval(), tmp_path / "hf.onnx")
    assert fuse_attention(hf, tmp_path / "hf_f.onnx") == 3
    assert _ops(tmp_path / "hf_f.onnx")["IsNaN"] == 0
    _same(hf, tmp_path / "hf_f.onnx")


def test_a_disagreeing_bias_leaves_only_its_sites(tmp_path, monkeypatch):
    """When the fused file disagrees and some sites carry a bias, the plain sites are fused without them."""
    src = _export(handmade_vit(depth=2, heads=4), tmp_path / "a.onnx")
    graph = onnx.load(str(src)).graph
    first = next(n.name for n in graph.node if n.op_type == "Softmax")
    bogus = next(i.name for i in graph.initializer if i.name.endswith("to_q.bias"))  # 1-D: not a score bias
    read = ort_attention._site

    def bias_on_the_first(g, softmax):
        site = read(g, softmax)
        return dataclasses.replace(site, bias=bogus) if site is not None and softmax.name == first else site

    monkeypatch.setattr(ort_attention, "_site", bias_on_the_first)
    assert fuse_attention(src, tmp_path / "f.onnx") == 1
    assert _ops(tmp_path / "f.onnx")["Softmax"] == 1
    _same(src, tmp_path / "f.onnx")
