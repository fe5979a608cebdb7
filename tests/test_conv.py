"""Attention -> convolution axis (methods.md §1.7): open == original; for each of the four decisions at a
site, ``eval`` (BatchNorm in eval, random statistics and tap assignments) == the materialized graph; priced
cost == compact cost == FlopCounterMode; the derived conv3 equals a gather-of-shifted-tokens form written
out independently; the compact graph's blocks say msa / conv3 / conv1 / skip; refusals with reasons.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import vitgraph as vg
from tests.test_groups import _graph
from tests.test_tokens import _model
from vitgraph.errors import SpecError
from vitgraph.gated import instrument, materialize
from vitgraph.analysis.graph import block_dict
from vitgraph.spec import Spec


def _spec(**extra) -> Spec:
    return Spec.from_dict({"budget": {"flops": 0.6}, "width": {"heads": False, "mlp": False},
                           "attention": {"to_conv": True}, **extra})


def _randomise(gated) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for gate in gated.axes["conv"].gates:
            for bn in (gate.bn1, gate.bn3):
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.normal_()
                bn.bias.normal_()
            gate.tap_logits.normal_(std=0.02)  # soft assignments (alpha = 0.01 sharpens them)


@pytest.mark.parametrize("key", ["deit", "deit_distilled", "hugging_face", "handmade"])
def test_every_decision_materializes_exactly(key):
    g = _model(key)
    x = g.example_inputs[0]
    gated = instrument(g, _spec())
    with torch.no_grad():
        assert torch.equal(gated.set_mode("open")(x), g.gm(x))
    _randomise(gated)
    axis = gated.axes["conv"]
    assert len(axis.sites) == 4
    axis.choice.copy_(torch.tensor([0, 1, 2, 3]))  # skip, conv1, conv3, msa
    gated.eval()
    gated.set_mode("eval")
    compact = materialize(gated)
    with torch.no_grad():
        for inputs in (x, torch.randn(3, *x.shape[1:])):
            want = gated(inputs)
            assert (compact(inputs) - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
        assert (gated(x) - g.gm(x)).abs().max() > 1e-3
    cg = vg.trace(compact, g.example_inputs)
    assert cg.structure.flops == pytest.approx(gated.cost()["flops"], rel=1e-9)
    kinds = [block_dict(b)["attention"]["kind"] for b in cg.structure.blocks]
    assert kinds == ["skip", "conv1", "conv3", "msa"]
    assert "vg_conv" not in compact.code
    assert sum(1 for n, _ in compact.named_parameters() if "qkv" in n or ".query" in n) <= 2  # q/k/v of 1 site


def test_all_decision_patterns_price_exactly():
    g = _model("deit")
    gated = instrument(g, _spec())
    axis = gated.axes["conv"]
    for pattern in itertools.islice(itertools.product(range(4), repeat=4), 0, 256, 37):
        axis.choice.copy_(torch.tensor(pattern))
        compact = materialize(gated)
        cg = vg.trace(compact, g.example_inputs)
        assert cg.structure.flops == pytest.approx(gated.cost()["flops"], rel=1e-9), pattern


def test_conv3_equals_shifted_tokens():
    """The derived 3x3 branch, written as a sum over taps of shifted patch tokens (methods.md §1.7)."""
    g = _model("deit")
    gated = instrument(g, _spec())
    _randomise(gated)
    gate, site = gated.axes["conv"].gates[0], gated.axes["conv"].sites[0]
    gate.eval()
    u = torch.randn(2, site.prefix + site.patches, site.channels)
    params = [gated.gm.get_parameter(p) if p else None for p in (site.v_weight, site.v_bias, site.o_weight,
                                                                  site.o_bias)]
    k, c, o = gate.derived(params[0], params[1], params[2])
    got = gate.conv3(u, k, c, o, params[3])
    gh, gw = site.grid
    grid = u[:, site.prefix:].reshape(2, gh, gw, -1)
    padded = F.pad(grid, (0, 0, 1, 1, 1, 1))
    acc = 0
    for r, col in itertools.product(range(3), range(3)):
        shifted = padded[:, r:r + gh, col:col + gw]  # the neighbour at row offset r-1, column offset col-1
        acc = acc + shifted @ k[r + 3 * col].T
    h = acc + c.sum(0)
    h = F.relu(gate.bn3(h.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
    want = h.reshape(2, gh * gw, -1) @ o.sum(0).T + params[3]
    assert torch.allclose(got[:, site.prefix:], want, atol=1e-5)
    assert torch.equal(got[:, :site.prefix], u[:, :site.prefix])  # prefix tokens pass through


def test_refusals_and_search_moves_toward_the_budget():
    with pytest.raises(SpecError, match="no attention .* can become a convolution .*windowed|no static patch grid"):
        instrument(_graph("swin"), _spec())
    with pytest.raises(SpecError, match="can become a convolution .*rel_pos_table"):
        instrument(_graph("beit"), _spec())
    with pytest.raises(SpecError, match="can become a convolution .*(pooled attention|no static patch grid)"):
        instrument(_graph("mvitv2"), _spec())  # pooled keys and values
    g = _model("deit")  # (width.embed combines: tests/test_combine_conv.py)
    gated = instrument(g, Spec.from_dict({"preset": "spvit_conv"}))
    gated.train()
    out = gated(g.example_inputs[0])
    terms = gated.penalties()
    assert set(terms) == {"budget"} and float(terms["budget"].detach()) == pytest.approx(20 * 0.4 ** 2)
    (out.sum() + terms["budget"]).backward()
    grads = [gate.op_logits.grad for gate in gated.axes["conv"].gates]
    assert all(gr is not None and float(gr.abs().sum()) > 0 for gr in grads)


def _conv_run(data, out, crash_at: int | None = None, resume: bool = False):
    """The spvit_conv search + fine-tuning of a tiny deit, 8 steps, a checkpoint every step."""
    from tests.test_tokens import run_tiny_deit

    spec = {"preset": "spvit_conv", "train": {"steps": 8, "batch_size": 16, "checkpoint_every": 1}}
    return run_tiny_deit(spec, data, out, crash_at, resume)


@pytest.mark.parametrize("crash_at", [2, 6])
def test_resume_of_a_searched_model_is_bit_exact(tmp_path, crash_at):
    """A crash in the search (concrete samples, BatchNorm statistics, arch optimizer) and one after the freeze."""
    from vitgraph.train.data import load_data

    data = load_data("digits", (1, 16, 16), batch_size=16)
    straight = _conv_run(data, tmp_path / "a")
    _conv_run(data, tmp_path / "b", crash_at=crash_at)
    resumed = _conv_run(data, tmp_path / "b", resume=True)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and "axes.conv.choice" in a and int(a["axes.conv.choice"].min()) >= 0
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def _ddp_conv_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import timm

    from tests.test_train import ddp_rank
    from vitgraph.train.loop import fit

    with ddp_rank(rank, world, port) as data:
        m = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=2, in_chans=1, num_classes=10,
                              embed_dim=24, depth=3, num_heads=2).eval()
        spec = Spec.from_dict({"preset": "spvit_conv", "train": {"steps": 6, "batch_size": 16}})
        gated = instrument(vg.trace(m, torch.randn(2, 1, 16, 16)), spec)
        fit(gated, data.train, spec.train, progress=False)
        torch.save({"state": gated.state_dict(), "decisions": gated.decisions()}, os.path.join(out, f"rank{rank}.pt"))


def test_ddp_ranks_take_identical_conv_decisions(tmp_path):
    import torch.multiprocessing as mp

    from tests.test_train import free_port

    mp.spawn(_ddp_conv_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["decisions"] == r1["decisions"]
    # parameters are synchronised; BatchNorm statistics are each rank's own after its last batch (DDP
    # broadcasts rank 0's at the start of every forward: the saved model is rank 0's)
    own = ("running_mean", "running_var", "num_batches_tracked")
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"] if not k.endswith(own))


def test_conv_tokens_and_mlp_widths_share_one_budget():
    """Convs before the first token stage, one-shot tokens with listed ratios, learned MLP units: one
    quadratic budget term, one pricer; the compact graph prices as FlopCounterMode counts."""
    g = _model("deit")
    spec = Spec.from_dict({"preset": "spvit_conv", "budget": {"flops": 0.5},
                           "tokens": {"method": "attention", "stages": [2], "keep": [0.5]},
                           "train": {"steps": 0}})
    gated = instrument(g, spec)
    refused = gated.axes["conv"].refused
    assert [s.block for s in gated.axes["conv"].sites] == [0]  # block 1's attention scores the stage
    assert "scores that stage" in refused["blocks.1.attn"] and "blocks.2.attn" in refused
    gated.axes["conv"].choice.copy_(torch.tensor([2]))  # block 0 conv3
    gated.freeze()
    assert abs(gated.cost()["fraction"] - 0.5) <= 0.03
    gated.eval()
    compact = materialize(gated)
    x = g.example_inputs[0]
    with torch.no_grad():
        assert (compact(x) - gated(x)).abs().max() <= 1e-5
    cg = vg.trace(compact, g.example_inputs)
    assert cg.structure.flops == pytest.approx(gated.cost()["flops"], rel=1e-9)
    assert [block_dict(b)["attention"]["kind"] for b in cg.structure.blocks][:2] == ["conv3", "msa"]


@pytest.mark.parametrize("per_branch", [False, True])
def test_conv_choices_in_blocks_depth_removes_price_and_materialize_exactly(per_branch):
    """Depth deletes blocks (or attention branches) whose attention chose a convolution: the conv's cost goes
    with them, the conv pass leaves them alone; eval == compact, priced == compact == FlopCounterMode."""
    from vitgraph.analysis.cost import flop_counter_flops

    g = _model("deit")
    gated = instrument(g, _spec(depth={"skip_blocks": True, "per_branch": per_branch}, train={"steps": 10}))
    _randomise(gated)
    gated.axes["conv"].choice.copy_(torch.tensor([2, 1, 3, 0]))  # conv3, conv1, msa, skip
    depth = gated.axes["depth"]
    keep = [u.block not in (0, 2) or (per_branch and u.kind == "mlp") for u in depth.units]
    depth.frozen_keep.copy_(torch.tensor(keep))
    depth.is_frozen.fill_(True)
    gated.eval()
    gated.set_mode("eval")
    compact = materialize(gated)
    x = torch.randn(3, *g.example_inputs[0].shape[1:])
    with torch.no_grad():
        want = gated(x)
        assert (compact(x) - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
    cg = vg.trace(compact, g.example_inputs)
    assert cg.structure.flops == pytest.approx(gated.cost()["flops"], rel=1e-6)
    assert flop_counter_flops(compact, (x,), 3) == cg.structure.flops
