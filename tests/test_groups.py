"""Coupled groups are right: removing a unit's producer rows equals removing its consumer columns.

For every unit of a heads / value-dim / MLP group, zeroing the slices that *produce* it (q/k/v rows
and biases, fc1 rows, per-unit BatchNorm) must give exactly the model where only the *consuming*
columns (proj / fc2 inputs) are zeroed: either way the unit contributes nothing. A wrong row or
column mapping breaks the equality.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import vitgraph as vg
from tests.handmade import handmade_vit
from vitgraph.passes.remove_pruned_units_pass import rewrite_constants, slice_group

TINY = {
    "deit": ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2), 32),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=2), 56),
    "beit": ("beit_base_patch16_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2), 32),
    "cait": ("cait_xxs24_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=2, depth_token_only=1,
                                    num_heads=2), 32),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=56, embed_dim=32, depths=(1, 1), num_heads=(2, 4)),
             56),
    "swin_shifted": ("swin_tiny_patch4_window7_224", dict(img_size=56, embed_dim=32, depths=(2,), num_heads=(2,)),
                     56),  # block 1 shifts its windows: the logits pass a head-count view around the mask
    "xcit": ("xcit_tiny_12_p16_224", dict(img_size=32, embed_dim=64, depth=2, num_heads=4), 32),
    "levit": ("levit_128", dict(img_size=128), 128),
    "mvitv2": ("mvitv2_tiny", dict(img_size=64), 64),
    "relpos": ("vit_relpos_small_patch16_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2),
               32),
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", dict(img_size=28, embed_dim=64, depth=2, num_heads=2), 28),
    # q/k norms, layer-scale, register tokens, no class token, an attention-pool (latent query) head
    "map_regs": ("vit_base_patch16_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                              qk_norm=True, init_values=1.0, reg_tokens=2, class_token=False,
                                              global_pool="map"), 32),
}


def _graph(key: str) -> vg.VitGraph:
    if key == "handmade":
        return vg.trace(handmade_vit(), torch.randn(2, 3, 32, 32))
    if key == "hugging_face":
        transformers = pytest.importorskip("transformers")
        cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, image_size=32, patch_size=8, num_labels=10)
        return vg.trace(transformers.ViTForImageClassification(cfg).eval(), torch.randn(2, 3, 32, 32))
    name, kwargs, size = TINY[key]
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():  # layer scales (1e-5) and LeViT's last BatchNorms (0) start closed: open them
        for pname, p in model.named_parameters():  # so that every unit shows in the output
            if "gamma" in pname:
                p.fill_(1.0)
            if pname.endswith(("proj_l.weight", "proj_w.weight")):  # CaiT's talking heads (std .02): near closed
                p.add_(torch.eye(p.shape[0]))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d) and not m.weight.any():
                m.weight.fill_(1.0)
    return vg.trace(model, torch.randn(2, 3, size, size))


def _zeroed(gm: torch.fx.GraphModule, group: vg.CoupledGroup, units: list[int], consumers: bool) -> torch.nn.Module:
    out = copy.deepcopy(gm)
    state = dict(out.named_parameters()) | dict(out.named_buffers())
    with torch.no_grad():
        for sl in group.slices:
            if (sl.what == "weight.in") != consumers or sl.what.startswith("running"):
                continue
            idx = torch.tensor([i for u in units for i in sl.indices[u]])
            state[sl.target].index_fill_(sl.axis, idx, 0.0)
    return out


@pytest.mark.parametrize("key", ["handmade", "hugging_face", *TINY])
def test_group_slices_remove_the_same_units(key):
    g = _graph(key)
    x = torch.randn(3, *g.input_size)
    assert g.structure.groups, "no coupled groups found"
    gen = torch.Generator().manual_seed(1)
    kinds = set()
    by_kind: dict[str, list[vg.CoupledGroup]] = {}
    for group in g.structure.groups:
        by_kind.setdefault(group.kind, []).append(group)
    sample = []  # the first and last group of each kind: different blocks, stages and head counts
    for kind, groups in by_kind.items():
        if kind != "embed":  # the stream's channels pass LayerNorms: zeroing is not removal (tests/test_embed.py)
            sample += groups[:1] + groups[1:][-1:]
    for group in sample:
        units = torch.randperm(group.units, generator=gen)[: max(1, group.units // 3)].tolist()
        with torch.no_grad():
            a = _zeroed(g.gm, group, units, consumers=False)(x)
            b = _zeroed(g.gm, group, units, consumers=True)(x)
            dense = g.gm(x)
        scale = dense.abs().max()  # random-init heads differ by orders of magnitude across families
        assert (a - b).abs().max() <= 1e-4 * scale, f"{group.name}: producers and consumers disagree"
        assert (a - dense).abs().max() > 1e-3 * scale, f"{group.name}: zeroing changed nothing (test cannot fail)"
        kinds.add(group.kind)
    assert "mlp" in kinds


def test_expected_groups_per_model():
    names = {k: {gr.name for gr in _graph(k).structure.groups} for k in ("handmade", "xcit", "mvitv2")}
    assert {n.rsplit(".", 1)[-1] for n in names["handmade"]} == {"heads", "v_dims", "mlp", "embed"}
    # channel (cross-covariance) attention: heads separable, value dims not; class attention: both
    assert "blocks.0.attn.heads" in names["xcit"] and "blocks.0.attn.v_dims" not in names["xcit"]
    assert "cls_attn_blocks.0.attn.v_dims" in names["xcit"]
    assert {n.rsplit(".", 1)[-1] for n in names["mvitv2"]} == {"mlp"}  # pooled q/k/v: heads not separable; stages


def _physically_pruned(gm: torch.fx.GraphModule, group: vg.CoupledGroup, removed: list[int]) -> torch.nn.Module:
    """Slice every parameter of the group and rewrite its reshape constants (the materialize pass's own steps)."""
    out = copy.deepcopy(gm)
    slice_group(out, group, [u for u in range(group.units) if u not in removed])
    rewrite_constants(out, group, len(removed))
    out.recompile()
    return out


@pytest.mark.parametrize("key", ["handmade", "hugging_face", "deit", "eva02", "beit", "swin", "swin_shifted", "xcit",
                                 "levit", "cait",
                                 "relpos", "dinov2_reg"])
def test_physical_slicing_with_rewritten_constants_equals_masking(key):
    """Removing units for real (weights sliced, reshape constants rewritten) equals zeroing them."""
    g = _graph(key)
    x = torch.randn(2, *g.input_size)
    groups = [gr for gr in g.structure.groups if gr.kind in ("heads", "mlp") and gr.units > 1]
    heads = [gr for gr in groups if gr.kind == "heads"]
    assert heads
    for group in heads[:1] + heads[-1:] + [gr for gr in groups if gr.kind == "mlp"][:1]:  # first and last block
        removed = list(range(0, group.units, 2))[: group.units - 1]  # every other unit, at least one kept
        with torch.no_grad():
            expected = _zeroed(g.gm, group, removed, consumers=True)(x)
            actual = _physically_pruned(g.gm, group, removed)(x)
        assert actual.shape == expected.shape
        assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max(), group.name
