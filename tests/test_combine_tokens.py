"""Token pruning combined with width, one-shot (``tokens.method attention`` + ``width.method magnitude``).

Every combination lands on the budget (±3 %), the compact graph equals the gated ``eval`` graph (the token
scores average over the heads width keeps), the priced cost equals the compact graph's and FlopCounterMode's,
and report.json says how the budget was split (``report["budget"]["split"]``, ``vitgraph.axes.joint``);
``tokens.keep``, when given, is honoured exactly.
"""
from __future__ import annotations

import pytest
import timm
import torch

import vitgraph as vg
from tests.checks import one_thread  # noqa: F401 - an autouse fixture: one torch thread
from vitgraph.analysis.cost import flop_counter_flops
from vitgraph.spec import Spec

SMALL = dict(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4)
WIDTHS = {  # width settings combined with tokens
    "heads": {"heads": True, "mlp": False},
    "head_dim": {"heads": False, "mlp": False, "head_dim": True},
    "embed": {"heads": False, "mlp": False, "embed": True},
    "heads_mlp_embed": {"heads": True, "mlp": True, "embed": True},
}


def _graph(dead_heads: bool = False) -> vg.VitGraph:
    """A tiny deit (64 patches, 4 heads of 16); ``dead_heads``: heads 2 and 3 of every block feed nothing
    (zero output-projection columns), so width can remove them for free."""
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", **SMALL).eval()
    if dead_heads:
        with torch.no_grad():
            for b in m.blocks:
                b.attn.proj.weight[:, 32:] = 0.0
    return vg.trace(m, torch.randn(2, 1, 32, 32))


def _compress(g: vg.VitGraph, width: dict, keep=(), flops: float = 0.7) -> vg.Result:
    spec = Spec.from_dict({"budget": {"flops": flops}, "width": {"method": "magnitude", "align": 4, **width},
                           "tokens": {"method": "attention", "stages": [1, 2], "keep": list(keep)}})
    return vg.compress(g, spec, data="none", progress=False, latency_targets=())


def _check(result: vg.Result, flops: float) -> dict:
    report = result.report
    assert abs(report["budget"]["achieved"] - flops) <= 0.03
    assert report["parity"]["max_abs_err"] <= 1e-4
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = result.gated(x)
        assert (result.compact(x) - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    assert report["compressed"]["flops"] == pytest.approx(result.gated.cost()["flops"], rel=1e-6)
    assert flop_counter_flops(result.compact, (x,), 3) == report["compressed"]["flops"]
    split = report["budget"]["split"]
    assert set(split) == {"tokens", "width"} and all(0.0 <= v <= 1.0 for v in split.values())
    assert sum(split.values()) == pytest.approx(1.0, abs=1e-3)
    return report


@pytest.mark.parametrize("key", list(WIDTHS))
def test_tokens_with_width_land_on_a_joint_budget(key):
    report = _check(_compress(_graph(), WIDTHS[key]), 0.7)
    assert report["budget"]["candidates"] and report["budget"]["criterion"].startswith("output distortion")
    assert list(report["tokens"]["kept_tokens"]) == ["blocks.1", "blocks.2"]


def test_listed_keep_ratios_are_honoured_and_width_closes_the_rest():
    report = _check(_compress(_graph(), WIDTHS["heads_mlp_embed"], keep=(0.8, 0.7)), 0.7)
    assert report["tokens"]["kept_tokens"] == {"blocks.1": 51, "blocks.2": 45}
    assert "candidates" not in report["budget"]  # nothing searched: the spec gave the ratios
    assert sum(report["kept"].values()) < sum(report["units"].values())
    assert 0.0 < report["budget"]["split"]["width"] < 1.0


def test_pruned_heads_leave_the_token_scores():
    """Width prunes heads of the attention a stage scores its tokens with: the gated selector averages over the
    kept heads only, as the compact graph (whose q and k hold only those) does; over all heads it would differ."""
    g = _graph()
    result = _compress(g, WIDTHS["heads"], keep=(0.5, 0.3), flops=0.5)
    _check(result, 0.5)
    selector = result.gated.gm.get_submodule("vg_tokens.blocks_1")
    got = {}
    handle = selector.register_forward_pre_hook(lambda m, args: got.update(qk=args[1:]))
    with torch.no_grad():
        result.gated.set_mode("eval")(g.example_inputs[0])
        handle.remove()
        q, k = got["qk"]
        kept = selector.scores(q, k)
        gate, selector.head_gate = selector.head_gate, None
        every = selector.scores(q, k)
        selector.head_gate = gate
    heads = gate[0].mask.bool()
    assert 0 < int(heads.sum()) < 4
    probs = torch.softmax(q[:, heads, :1] @ k[:, heads].transpose(-2, -1) * selector.scale, dim=-1)
    assert torch.allclose(kept, probs.mean(dim=(1, 2)), atol=1e-6)
    assert not torch.allclose(kept, every, atol=1e-4)


def test_the_joint_split_gives_free_heads_to_width():
    """Half the heads feed nothing: width removes them at no loss, tokens take the rest of the reduction.
    The pick is neither all-tokens nor all-width, and its distortion is the lowest among the landing candidates."""
    report = _check(_compress(_graph(dead_heads=True), WIDTHS["heads"]), 0.7)
    split, budget = report["budget"]["split"], report["budget"]
    assert 0.0 < split["tokens"] < 1.0 and 0.0 < split["width"] < 1.0
    assert all(k == 2 for k in report["kept"].values())  # exactly the dead heads went
    landed = {s: c for s, c in budget["candidates"].items() if abs(c["cost"] - 0.7) <= 0.015}
    chosen = min(landed.values(), key=lambda c: c["distortion"])
    assert chosen["distortion"] < landed["1.000"]["distortion"]
    assert all(chosen["distortion"] <= c["distortion"] for c in landed.values())


@pytest.mark.parametrize("pool, exit_after, flops", [("token", 3, 0.4), ("avg", 1, 0.2)])
def test_exits_pool_the_tokens_left(pool, exit_after, flops):
    """An exit after a token stage pools the kept tokens and the packages; cut before a stage, that stage's
    selector goes with the blocks (and its scorer leaves the price)."""
    torch.manual_seed(0)
    kw = {} if pool == "token" else {"class_token": False, "global_pool": "avg"}
    m = timm.create_model("deit_tiny_patch16_224" if pool == "token" else "vit_tiny_patch16_224", **SMALL, **kw)
    g = vg.trace(m.eval(), torch.randn(2, 1, 32, 32))
    spec = Spec.from_dict({"budget": {"flops": flops}, "width": {"method": "magnitude", "heads": False, "align": 4},
                           "depth": {"exits": [exit_after], "exit": exit_after},
                           "tokens": {"method": "attention", "stages": [1, 2], "keep": [0.7, 0.5]},
                           "train": {"steps": 2, "batch_size": 16}})
    result = vg.compress(g, spec, data="digits", progress=False, latency_targets=())
    report = result.report
    assert report["depth"]["exit"] == exit_after and len(report["blocks"]) == exit_after
    assert abs(report["budget"]["achieved"] - flops) <= 0.03 and report["parity"]["max_abs_err"] <= 1e-4
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(result.gated(x), result.compact(x), atol=1e-4)
    assert report["compressed"]["flops"] == pytest.approx(result.gated.cost()["flops"], rel=1e-6)
    assert flop_counter_flops(result.compact, (x,), 3) == report["compressed"]["flops"]
    assert ("topk" in result.compact.code) and report["blocks"][-1]["tokens_in"] < 65
