"""ViTs written by other people (vit-pytorch's einops code, Hugging Face BEiT and Swin) go through
``torch.export`` capture and compress one-shot: parity, the budget, FLOPs against FlopCounterMode and a
``.pt2`` that equals the compact module. Small configs (tests/foreign.py), 32 px, random weights."""
from __future__ import annotations

import pytest
import torch

import vitgraph as vg
from tests import foreign
from vitgraph.analysis.cost import flop_counter_flops
from vitgraph.spec import Spec

pytest.importorskip("vit_pytorch")
pytest.importorskip("transformers")

WIDTH = {"budget": {"flops": 0.5}, "width": {"method": "magnitude", "heads": True, "mlp": True}}
DEPTH = {"budget": {"flops": 0.7}, "width": {"method": "magnitude", "heads": True, "mlp": True},
         "depth": {"skip_blocks": True}}
TOKENS = {"budget": {"flops": 0.6}, "tokens": {"method": "attention"}}

_graphs: dict[str, vg.VitGraph] = {}


def _graph(key: str) -> vg.VitGraph:
    if key not in _graphs:
        _graphs[key] = vg.trace(foreign.FOREIGN[key]().eval(), torch.randn(2, 3, 32, 32), name=key)
    return _graphs[key]


def _lands(key: str, spec: dict, tmp_path) -> None:
    g = _graph(key)
    result = vg.compress(g, Spec.from_dict(spec), data="none", progress=False, latency_targets=())
    achieved = float(result.report["budget"]["achieved"])
    assert achieved == pytest.approx(spec["budget"]["flops"], abs=0.03)
    x = torch.randn(1, 3, 32, 32)
    counted = flop_counter_flops(result.compact, (x,), 1)
    assert int(result.report["compressed"]["flops"]) == pytest.approx(counted, rel=0.03)
    files = result.save(tmp_path / "out")
    loaded = torch.export.load(str(files["model.pt2"])).module()
    fresh = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(fresh), result.compact(fresh), atol=1e-4)


@pytest.mark.parametrize("key", list(foreign.FOREIGN))
def test_capture_finds_every_attention_block(key):
    g = _graph(key)
    blocks = {"vit": 3, "simple_vit": 3, "cait": 4, "beit": 3, "swin": 4}[key]
    assert len(g.blocks) == blocks and all(b.attention is not None and b.mlp is not None for b in g.blocks)
    assert g.trace_error < 1e-4


@pytest.mark.parametrize("key", ["vit", "simple_vit", "beit", "swin", "cait"])
def test_width_lands(key, tmp_path):
    _lands(key, WIDTH, tmp_path)


@pytest.mark.parametrize("key", ["vit", "simple_vit", "beit", "cait"])
def test_depth_and_width_land(key, tmp_path):
    _lands(key, DEPTH, tmp_path)


@pytest.mark.parametrize("key", ["vit", "simple_vit", "cait", "beit"])  # cait: class attention reads the stream
def test_tokens_land(key, tmp_path):
    _lands(key, TOKENS, tmp_path)


def test_talking_heads_are_recognised_and_head_prunable():
    """Both mixes are found; pruning head h cuts input h of the mix before the softmax and output h of the one
    after it, and the logits of each head are gated where the first mix reads them."""
    g = _graph("cait")
    params = dict(g.gm.named_parameters())
    heads = {gr.site: gr for gr in g.structure.groups if gr.kind == "heads"}
    for b in g.blocks:
        site = b.attention
        assert site.prunable["heads"] is None and len(site.mixes) == 2
        group = heads[site.name]
        mixes = {s.target.rsplit(".", 1)[-1]: s for s in group.slices if "mix_heads" in s.target}
        pre, post = mixes["mix_heads_pre_attn"], mixes["mix_heads_post_attn"]
        assert params[pre.target].shape == (site.heads, site.heads)
        assert (pre.axis, pre.what) == (0, "weight.in") and (post.axis, post.what) == (1, "weight.out")
        assert [u.node for u in group.unit_inputs] == [site.mixes[0]] and group.unit_inputs[0].axis == 1
    assert g.blocks[-1].attention.tokens_q == 1 and g.blocks[-1].attention.tokens_kv == 17  # class attention


def test_talking_heads_through_a_mix_not_heads_by_heads_are_refused_with_the_reason():
    """Mixes through 6 intermediate maps, (4, 6) then (6, 4): vitgraph slices (H, H) mixes only, and says so."""
    model = foreign.FOREIGN["cait"]().eval()
    for attn in (m for m in model.modules() if hasattr(m, "mix_heads_pre_attn")):
        attn.mix_heads_pre_attn = torch.nn.Parameter(torch.randn(4, 6))
        attn.mix_heads_post_attn = torch.nn.Parameter(torch.randn(6, 4))
    g = vg.trace(model, torch.randn(2, 3, 32, 32), name="cait_wide_mix")
    for b in g.blocks:
        why = b.attention.prunable["heads"]
        assert why and "talking-heads" in why and "(4, 6)" in why, why
    assert not any(gr.kind == "heads" for gr in g.structure.groups)


def test_dropout_follows_train_and_eval_after_capture():
    g = _graph("cait")  # dropout 0.1 in attention and MLPs: export froze it at eval, capture gives it back
    x = torch.randn(2, 3, 32, 32)
    gm = g.gm
    try:
        gm.train()
        torch.manual_seed(0)
        a = gm(x)
        b = gm(x)
        assert not torch.equal(a, b)
    finally:
        gm.eval()
    with torch.no_grad():
        assert torch.equal(gm(x), gm(x))


def test_data_dependent_control_flow_names_the_line_and_the_fix():
    from vit_pytorch.cait import CaiT
    model = CaiT(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, cls_depth=1, heads=2, mlp_dim=64,
                 dim_head=16, layer_dropout=0.1).eval()  # draws which layers to drop in every forward, even eval
    with pytest.raises(vg.TraceError) as info:
        vg.trace(model, torch.randn(2, 3, 32, 32))
    msg = str(info.value)
    assert "cait.py" in msg and "if all(to_drop)" in msg and "torch._check" in msg
