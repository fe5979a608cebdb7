"""Every pair of axes, and the whole set, over thirteen families: timm (deit, eva02, BEiT, CaiT, Swin,
DINOv2 with registers, relative-position ViT, attention-pool head with registers), Hugging Face (ViT,
BEiT), vit-pytorch (ViT, CaiT) and the hand-written ViT of ``tests/handmade.py``.

For each family hypothesis draws two axes of heads, value dims, MLP units, embedding channels, block skips,
an exit, one-shot token scores and attention->conv (``pair``), or turns on every axis but conv (``all``:
conv refuses embedding channels by name). Random decisions (``test_properties.decide``), then:
gates open == original, gated ``eval`` == compact, priced == compact == FlopCounterMode. A combination the
model cannot take raises a ``SpecError`` that gives the model's reason ("not implemented" is a failure).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import vitgraph as vg
from tests.test_groups import _graph
from tests.checks import one_thread  # noqa: F401 - an autouse fixture: one torch thread
from tests.test_properties import SETTINGS, Axes, assert_invariants, compress_graph
from vitgraph.errors import SpecError
from vitgraph.gated import instrument

AXES = ("heads", "head_dim", "mlp", "embed", "skip_blocks", "exits", "tokens", "conv")


def _foreign(name: str) -> vg.VitGraph:
    pytest.importorskip("vit_pytorch")
    pytest.importorskip("transformers")
    from tests import foreign

    return vg.trace(getattr(foreign, name)().eval(), torch.randn(2, 3, 32, 32))


FAMILIES = {key: (lambda key=key: _graph(key)) for key in
            ("deit", "eva02", "beit", "cait", "swin", "dinov2_reg", "relpos", "map_regs", "hugging_face", "handmade")}
FAMILIES.update({"vit_pytorch": lambda: _foreign("build_vit"), "vit_pytorch_cait": lambda: _foreign("build_cait"),
                 "hf_beit": lambda: _foreign("build_beit")})
_BUILT: dict[str, vg.VitGraph] = {}


def graph(family: str) -> vg.VitGraph:
    if family not in _BUILT:
        _BUILT[family] = FAMILIES[family]()
    return _BUILT[family]


def axes_of(on: set[str], blocks: int) -> Axes:
    last = max(1, blocks - 1)
    return Axes(heads="heads" in on, head_dim="head_dim" in on, mlp="mlp" in on, embed="embed" in on,
                skip_blocks="skip_blocks" in on, exits=(last,) if "exits" in on and blocks >= 2 else (),
                stages=(last,) if "tokens" in on and blocks >= 2 else (), keep=(0.5,) if "tokens" in on else (),
                conv="conv" in on)


def check(g: vg.VitGraph, axes: Axes, data) -> None:
    try:
        gated = instrument(g, axes.spec())
    except SpecError as exc:
        assert "not implemented" not in str(exc), str(exc)
        event(f"refused: {str(exc)[:60]}")
        return
    gated, compact = compress_graph(g, gated, data)
    event("landed")
    assert_invariants(g, gated, compact)


# Known, diagnosed: vit-pytorch CaiT's talking heads mix the heads with einsum("bhij,hg->bgij"); when the class
# attention keeps one head, the contraction is 1 wide and torch runs it as a broadcast multiply, which
# FlopCounterMode does not count, while the pricer prices the product (2*B*g*i*j, 136 FLOPs per image here).
# The drawn heads + head_dim pair keeps exactly one, so the pass manager's cost check sees the gap.
PAIR_FAMILIES = [pytest.param(f, marks=pytest.mark.xfail(
    reason="a 1-wide einsum contraction (talking heads kept to one head) is a mul FlopCounterMode does not count",
    strict=False)) if f == "vit_pytorch_cait" else f for f in FAMILIES]


@pytest.mark.parametrize("family", PAIR_FAMILIES)
@settings(max_examples=2, **SETTINGS)
@given(data=st.data())
def test_every_pair_of_axes(family, data):
    g = graph(family)
    pair = data.draw(st.lists(st.sampled_from(AXES), min_size=2, max_size=2, unique=True))
    event(" + ".join(sorted(pair)))
    check(g, axes_of(set(pair), len(g.structure.blocks)), data)


@pytest.mark.parametrize("family", list(FAMILIES))
@settings(max_examples=1, **SETTINGS)
@given(data=st.data())
def test_the_whole_set_of_axes(family, data):
    g = graph(family)
    check(g, axes_of(set(AXES) - {"conv"}, len(g.structure.blocks)), data)


def test_all_yaml_turns_on_every_axis_and_lands():
    """examples/specs/all.yaml: conv, heads, value dims, MLP units, embedding channels, block gates, exits and
    tokens in one learned spec, a few steps on digits (an 8-block 16-px ViT, so exits 6 and 7 exist)."""
    import timm
    import yaml
    from pathlib import Path

    raw = yaml.safe_load((Path(__file__).parent.parent / "examples" / "specs" / "all.yaml").read_text())
    w, d = raw["width"], raw["depth"]
    assert all(w[k] for k in ("heads", "head_dim", "mlp", "embed")) and d["skip_blocks"] and d["exits"]
    assert raw["tokens"]["keep"] and raw["preset"] == "spvit_conv"  # (the preset turns attention.to_conv on)
    raw["train"] = {**raw["train"], "steps": 6, "batch_size": 16}
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, num_classes=10,
                              embed_dim=64, depth=8, num_heads=4).eval()
    result = vg.compress(model, raw, example_inputs=(torch.randn(2, 1, 16, 16),), data="digits", progress=False,
                         latency_targets=())
    report = result.report
    assert set(result.gated.axes) >= {"width", "depth", "exits", "tokens", "conv"}
    assert abs(report["budget"]["achieved"] - 0.5) <= 0.03 and report["parity"]["max_abs_err"] < 1e-4
