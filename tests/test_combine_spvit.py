"""SPViT's learned token selectors combined with block skipping (``depth.skip_blocks``) and a narrowed residual
stream (``width.embed``), issue 27.

* Skipped blocks: the keep flags and key masks go from selector to selector and to every later attention
  directly, not through the stream, so a skipped block (its stream passed through) leaves them intact; a
  stage's own block may be skipped: its selector stays in front of the next block.
* Embed: the scorer reads only the kept channels of each head's slice (masked in the gated graph, narrowed per
  chunk in the compact one: ``LearnedTokenSelector.narrow``); a head whose slice keeps no channel scores from
  its bias alone.

Each: gates open == the original; gated ``eval`` == the compact graph (two batch sizes); priced cost == the
compact graph's == FlopCounterMode; and a short learned run (block gates and selectors together) compiles.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vitgraph as vg
from tests.checks import one_thread  # noqa: F401 - an autouse fixture: one torch thread
from tests.test_tokens import _model
from vitgraph.analysis.cost import flop_counter_flops
from vitgraph.gated import instrument, materialize
from vitgraph.gates.tokens import LearnedTokenSelector
from vitgraph.spec import Spec

EMBED = torch.ones(48, dtype=torch.bool)
EMBED[:24] = False    # head 0's slice (2 heads of 24): nothing kept
EMBED[30:37] = False  # head 1's: 17 of 24 kept


def _spec(skip: bool = False, embed: bool = False, mode: str = "static", per_branch: bool = False, **extra) -> Spec:
    return Spec.from_dict({
        "budget": {"flops": 1.0},  # decisions are written below; 1.0 leaves every budget check open
        "width": {"method": "magnitude", "heads": False, "mlp": embed, "embed": embed, "align": 1},
        "depth": {"skip_blocks": skip, "per_branch": per_branch},
        "tokens": {"method": "spvit", "stages": [1, 2], "keep": [0.5, 0.25], "mode": mode},
        "train": {"steps": 10}, **extra})


def _decide(gated, skipped: tuple[int, ...] = (), embed: torch.Tensor | None = None) -> None:
    if "depth" in gated.axes:
        depth = gated.axes["depth"]
        keep = torch.tensor([u.block not in skipped for u in depth.units])
        depth.frozen_keep.copy_(keep)
        depth.is_frozen.fill_(True)
    if "width" in gated.axes:
        method = gated.axes["width"].method
        for i, site in enumerate(method.sites):
            mask = embed if site.kind == "embed" else torch.arange(site.units) % 3 != 0
            getattr(method, f"frozen_{i}").copy_(mask)
        method.is_frozen.fill_(True)
    gated.freeze()
    gated.eval()
    gated.set_mode("eval")


def _round_trip(g: vg.VitGraph, gated, dynamic: bool = False) -> torch.fx.GraphModule:
    x = g.example_inputs[0]
    compact = materialize(gated)
    assert "vg_" not in compact.code and ("nonzero" if dynamic else "topk") in compact.code
    gen = torch.Generator().manual_seed(1)
    batches = [x[:1], torch.randn(1, *x.shape[1:], generator=gen)] if dynamic else \
        [x, torch.randn(3, *x.shape[1:], generator=gen)]
    with torch.no_grad():
        dense = g.gm(x)
        assert (gated(x) - dense).abs().max() > 1e-3 * dense.abs().max()  # the decisions changed the output
        for inputs in batches:
            want = gated(inputs)
            assert (compact(inputs) - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
    if not dynamic:
        cg = vg.trace(compact, g.example_inputs)
        assert cg.structure.flops == pytest.approx(gated.cost()["flops"], rel=1e-6)
        assert flop_counter_flops(compact, g.example_inputs, 2) == pytest.approx(cg.structure.flops, rel=1e-9)
    return compact


@pytest.mark.parametrize("key,per_branch,mode", [("deit", False, "static"), ("deit", True, "static"),
                                                 ("handmade", False, "static"), ("mean_pool", False, "dynamic")])
def test_skipped_blocks_pass_the_keep_flags_through(key, per_branch, mode):
    """Blocks 1 and 2 (both stage blocks) skipped: their selectors stay, in front of block 3."""
    g = _model(key)
    gated = instrument(g, _spec(skip=True, per_branch=per_branch, mode=mode))
    with torch.no_grad():
        assert torch.equal(gated.set_mode("open")(g.example_inputs[0]), g.gm(g.example_inputs[0]))
    _decide(gated, skipped=(1, 2))
    compact = _round_trip(g, gated, dynamic=mode == "dynamic")
    names = [n for n, _ in compact.named_modules()]
    assert not any(n.startswith(("blocks.1.", "blocks.2.")) for n in names), "a skipped block is left"
    assert any(n.startswith("blocks.3.") for n in names)
    assert any(n.startswith("token_scores.blocks_1") for n in names)  # both stages still select
    assert any(n.startswith("token_scores.blocks_2") for n in names)


def _scorer(sel: LearnedTokenSelector, content: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """pi_keep recomputed from the dense scorer's weights on each head's kept channels alone (methods.md §3.2):
    the per-head mean, LayerNorm and first linear over those channels; the global half averaged over all tokens."""
    b, n, c = content.shape
    d = c // sel.heads
    lin = [m for m in sel.head_net if isinstance(m, torch.nn.Linear)]
    norm, e1 = sel.embed[0], sel.embed[1]
    d1, d2, d3 = (m for m in sel.decide if isinstance(m, torch.nn.Linear))
    means, pis = [], []
    for h in range(sel.heads):
        idx = torch.nonzero(keep[h * d:(h + 1) * d]).flatten()
        part = content[..., h * d + idx]
        means.append(part.mean(-1) if len(idx) else content.new_zeros(b, n))
        normed = F.layer_norm(part, (len(idx),), norm.weight[idx], norm.bias[idx], norm.eps) if len(idx) else part
        e = F.gelu(F.linear(normed, e1.weight[:, idx], e1.bias))
        half = d // 2
        z = torch.cat([e[..., :half], e[..., half:].mean(1, keepdim=True).expand(-1, n, -1)], -1)
        a = F.linear(F.gelu(F.linear(F.gelu(F.linear(z, d1.weight, d1.bias)), d2.weight, d2.bias)), d3.weight, d3.bias)
        pis.append(a.softmax(-1)[..., 0])
    m = torch.stack(means, -1)
    w = torch.sigmoid(F.linear(F.gelu(F.linear(m, lin[0].weight, lin[0].bias)), lin[1].weight, lin[1].bias))
    return (torch.stack(pis, -1) * w).sum(-1) / w.sum(-1)


def test_the_scorer_reads_each_heads_kept_channels():
    """Masked (gated) scorer == the dense scorer recomputed on the kept channels == the narrowed (compact) one."""
    g = _model("deit")
    gated = instrument(g, _spec(embed=True))
    _decide(gated, embed=EMBED)
    for axis in gated.axes.values():  # the gates as an ``eval`` forward sets them
        axis.apply("eval")
    sel = gated.gm.get_submodule("vg_tokens.blocks_1")
    assert sel.stream_gate is not None and torch.equal(sel.stream_gate[0].mask.bool(), EMBED)
    content = torch.randn(2, 64, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masked, _ = sel.logits(content, None)
        want = _scorer(sel, content, EMBED)
        assert torch.allclose(masked, want, atol=1e-5)
        narrow = copy.deepcopy(sel)
        narrow.stream_gate = None
        narrow.narrow(torch.nonzero(EMBED).flatten().tolist())
        assert [z - a for a, z in narrow.bounds] == [0, 17]
        compact, _ = narrow.logits(content[..., EMBED], None)
        assert torch.allclose(compact, want, atol=1e-5)
        # priced: the first linear's FLOPs scaled by the kept fraction == the narrowed chunks' linears
        assert sel.flops_per_token(17 / 48) == pytest.approx(
            sum(2 * m.in_features * m.out_features for c in narrow.chunks for m in c if isinstance(m, torch.nn.Linear))
            + sel.flops_per_token() - 2 * 24 * 24 * 2, rel=1e-12)


@pytest.mark.parametrize("key", ["deit", "handmade", "mean_pool"])
def test_embed_narrows_the_scorers(key):
    g = _model(key)
    gated = instrument(g, _spec(embed=True))
    with torch.no_grad():
        assert torch.equal(gated.set_mode("open")(g.example_inputs[0]), g.gm(g.example_inputs[0]))
    _decide(gated, embed=EMBED)
    compact = _round_trip(g, gated)
    widths = {m.in_features for n, m in compact.named_modules() if n.startswith("token_scores.blocks_1.chunks")
              and isinstance(m, torch.nn.Linear)}
    assert widths == {0, 17}, widths


def test_skipped_blocks_and_embed_together_and_onnx(tmp_path):
    from vitgraph import targets

    g = _model("deit")
    gated = instrument(g, _spec(skip=True, embed=True))
    _decide(gated, skipped=(2,), embed=EMBED)
    compact = _round_trip(g, gated)
    report = targets.onnx.lower(compact, g.example_inputs, tmp_path / "m.onnx")
    assert report.max_abs_err <= 1e-4


def test_a_short_learned_run_compiles(tmp_path):
    """Block gates and the selectors learn together (tokens.keep fixes the selectors' share; the gates learn
    against the budget), the embedding channels are scored one-shot at freeze; then eval == compact."""
    from torch.utils.data import TensorDataset

    from vitgraph.train.loop import fit

    g = _model("deit")
    spec = Spec.from_dict({"budget": {"flops": 0.5},
                           "width": {"method": "magnitude", "heads": False, "mlp": True, "embed": True, "align": 4},
                           "depth": {"skip_blocks": True},
                           "tokens": {"method": "spvit", "stages": [1, 2], "keep": [0.7, 0.5]},
                           "train": {"steps": 6, "batch_size": 8, "lr": 1e-3, "search": 0.67, "log_every": 1}})
    gated = instrument(g, spec)
    x = g.example_inputs[0]
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, *x.shape[1:], generator=gen), torch.randint(0, 10, (48,), generator=gen))
    fit(gated, data, spec.train, teacher=g.gm, progress=False, out_dir=tmp_path)
    assert gated.frozen
    assert list(gated.axes["tokens"].decisions().values()) == [45, 32]
    gated.eval()
    gated.set_mode("eval")
    compact = materialize(gated)
    with torch.no_grad():
        for inputs in (x, torch.randn(3, *x.shape[1:], generator=gen)):
            want = gated(inputs)
            assert (compact(inputs) - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
    cg = vg.trace(compact, g.example_inputs)
    assert cg.structure.flops == pytest.approx(gated.cost()["flops"], rel=1e-6)
    assert abs(gated.cost()["flops"] / g.structure.flops - 0.5) <= 0.03


def test_value_dims_with_embed_are_refused_by_name():
    from vitgraph.errors import SpecError

    with pytest.raises(SpecError, match="spvit with width.embed and width.head_dim: the learned scorers read the "
                                        "narrowed stream"):
        instrument(_model("deit"), Spec.from_dict({"width": {"heads": False, "mlp": False, "embed": True,
                                                             "head_dim": True},
                                                   "tokens": {"method": "spvit", "stages": [1], "keep": [0.5]}}))
