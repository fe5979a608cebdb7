"""Exit classifiers combined with the stream's channels (``width.embed``) and with attention->conv (issue 27).

An exit copies the head path; with ``width.embed`` it calls the stream's gate where the head does (the
final norm over the kept channels, the classifier's masked input) and, once the model is cut there,
takes the head's names, which the stream's channel group slices. Attention->conv inside the blocks
an exit cuts away is priced as gone (the exit's ``block.<i>`` factors).

Each combination, on small timm ViTs (class token; mean pooling with a register and layer scale) and
the hand-written ViT: gates open == original exactly; random hard decisions change the output; gated
``eval`` == compact at two batch sizes; priced FLOPs == the compact graph's == ``FlopCounterMode``;
for every exit choice (none, each listed exit). ONNX Runtime == the compact graph on one case each.
Then both pairs on each of ``test_combine_families``' thirteen families (random decisions and exit), where
a model that cannot take one must refuse it with its own reason.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import vitgraph as vg
from tests.checks import one_thread  # noqa: F401 - an autouse fixture: one torch thread
from tests.test_combine_families import FAMILIES, axes_of, check, graph
from tests.test_properties import SETTINGS, Model, assert_invariants, close
from vitgraph.gated import instrument, materialize
from vitgraph.spec import Spec

MODELS = {
    "token": Model("timm", image=16, patch=4, chans=1, dim=32, heads=2, depth=3, mlp_ratio=2.0),
    "avg_reg_ls": Model("timm", image=16, patch=4, chans=1, dim=32, heads=2, depth=3, mlp_ratio=2.0,
                        class_token=False, reg_tokens=1, pool="avg", layer_scale=True),
    "handmade": Model("handmade", image=16, patch=4, chans=3, dim=32, heads=2, depth=3, mlp_ratio=2.0),
}
EXITS = (1, 2)
_BUILT: dict[str, vg.VitGraph] = {}


def _graph(key: str) -> vg.VitGraph:
    if key not in _BUILT:
        _BUILT[key] = MODELS[key].build()
    return _BUILT[key]


def _spec(heads: bool = False, mlp: bool = False, embed: bool = False, conv: bool = False) -> Spec:
    return Spec.from_dict({"budget": {"flops": 0.7},
                           "width": {"method": "magnitude", "heads": heads, "mlp": mlp, "embed": embed, "align": 1},
                           "depth": {"exits": list(EXITS)}, "attention": {"to_conv": conv},
                           "train": {"steps": 10}})  # learned-looking: the axes wait for the decisions below


def _decide(gated, seed: int, exit: int, choices: tuple[int, ...] = ()) -> None:
    """Random width masks (about half of every group kept), conv choices and BatchNorms, and the exit."""
    gen = torch.Generator().manual_seed(seed)
    if "width" in gated.axes:
        method = gated.axes["width"].method
        for i, site in enumerate(method.sites):
            k = max(site.min_units, 1, int(site.units * (0.3 + 0.4 * float(torch.rand(1, generator=gen)))))
            mask = torch.zeros(site.units, dtype=torch.bool)
            mask[torch.randperm(site.units, generator=gen)[:k]] = True
            getattr(method, f"frozen_{i}").copy_(mask)
        method.is_frozen.fill_(True)
    if "conv" in gated.axes:
        conv = gated.axes["conv"]
        conv.choice.copy_(torch.tensor(choices[:len(conv.sites)]))
        with torch.no_grad():  # BatchNorm statistics away from their identity start
            for gate in conv.gates:
                for bn in (gate.bn1, gate.bn3):
                    bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen))
                    bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) * 1.5 + 0.5)
                    bn.weight.copy_(torch.randn(bn.weight.shape, generator=gen))
                    bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen))
    gated.axes["exits"].exit_chosen.fill_(exit)
    gated.freeze()
    gated.eval()
    gated.set_mode("eval")


def _round_trip(g: vg.VitGraph, spec: Spec, seed: int, exit: int, choices: tuple[int, ...] = ()):
    gated = instrument(g, spec)
    x = g.example_inputs[0]
    with torch.no_grad():
        assert torch.equal(gated.set_mode("open")(x), g.gm(x)), "gates open must be exactly the original graph"
    _decide(gated, seed, exit, choices)
    compact = materialize(gated)
    with torch.no_grad():
        assert close(gated(x), g.gm(x)) > 1e-3, "the decisions changed nothing (the test could not fail)"
    assert_invariants(g, gated, compact)
    assert not hasattr(compact, "vg_exits") and "self.vg_exits" not in compact.code  # an exit holds the head's names
    return gated, compact


def _stream_width(gated) -> int:
    return len(gated.decisions()["width"]["embed"])


@pytest.mark.parametrize("exit", [0, *EXITS])
@pytest.mark.parametrize("key", list(MODELS))
def test_exits_narrow_with_the_stream(key, exit):
    g = _graph(key)
    gated, compact = _round_trip(g, _spec(embed=True), seed=exit + 7, exit=exit)
    kept = _stream_width(gated)
    assert 0 < kept < g.structure.tokens.embed_dim
    head = compact.get_submodule("head")
    assert head.in_features == kept  # the exit's (or the final) classifier reads only the kept channels
    norms = [p for name, p in compact.named_parameters() if "norm" in name and "blocks" not in name]
    assert norms and all(p.shape == (kept,) for p in norms)  # the final norm (or fc_norm) too
    if exit:
        assert len(vg.trace(compact, g.example_inputs).structure.blocks) == exit


@pytest.mark.parametrize("exit", [0, *EXITS])
@pytest.mark.parametrize("key", list(MODELS))
def test_exits_with_embed_heads_and_mlp(key, exit):
    g = _graph(key)
    gated, _ = _round_trip(g, _spec(heads=True, mlp=True, embed=True), seed=exit + 11, exit=exit)
    assert {"embed", "blocks.0.attn.heads"} <= set(gated.decisions()["width"]) or key == "handmade"


# choices per block, 0 msa / 1 conv3 / 2 conv1 / 3 skip: every kind inside the blocks an exit cuts away
CONV_CHOICES = [(1, 2, 1), (2, 1, 3), (3, 1, 2), (1, 0, 2)]


@pytest.mark.parametrize("exit", [0, *EXITS])
@pytest.mark.parametrize("choices", CONV_CHOICES)
@pytest.mark.parametrize("key", ["token", "avg_reg_ls"])
def test_conv_with_exits(key, choices, exit):
    g = _graph(key)
    gated, _ = _round_trip(g, _spec(mlp=True, conv=True), seed=sum(choices) + exit, exit=exit, choices=choices)
    assert len(gated.axes["conv"].sites) == len(g.structure.blocks)


@pytest.mark.parametrize("spec", [{"heads": True, "mlp": True, "embed": True}, {"mlp": True, "conv": True}],
                         ids=["embed_heads_mlp", "conv"])
def test_onnx_matches_the_compact_graph(spec, tmp_path):
    onnx_target = pytest.importorskip("vitgraph.targets.onnx")
    g = _graph("token")
    gated, compact = _round_trip(g, _spec(**spec), seed=3, exit=2, choices=(1, 2, 1))
    report = onnx_target.lower(compact, gated.example_inputs(), tmp_path / "m.onnx", atol=1e-4)
    assert report.max_abs_err <= 1e-4


@pytest.mark.parametrize("pair", [("embed", "exits"), ("conv", "exits")], ids="+".join)
@pytest.mark.parametrize("family", list(FAMILIES))
@settings(max_examples=1, **SETTINGS)
@given(data=st.data())
def test_every_family(family, pair, data):
    g = graph(family)
    event(f"{family}: {'+'.join(pair)}")
    check(g, axes_of(set(pair), len(g.structure.blocks)), data)
