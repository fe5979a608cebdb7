"""Depth invariants: gates open == original; gated ``eval`` == materialized for random block, branch,
width and exit decisions; the cost model prices the compact graph exactly; exits truncate exactly.
"""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import timm
import torch

import vitgraph as vg
from tests.handmade import handmade_vit
from tests.test_groups import _graph
from vitgraph.analysis.cost import flop_counter_flops
from vitgraph.axes.depth import project
from vitgraph.errors import SpecError
from vitgraph.gated import instrument, materialize
from vitgraph.passes.insert_block_gates_pass import InsertBlockGatesPass
from vitgraph.spec import Spec

TOL = 1e-5  # fp32, relative to the output's scale


def _deit(depth: int = 6, **kw) -> vg.VitGraph:
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=1, num_classes=10,
                          embed_dim=64, depth=depth, num_heads=2, **kw).eval()
    return vg.trace(m, torch.randn(2, 1, 32, 32))


def _spec(**depth) -> Spec:
    return Spec.from_dict({"budget": {"flops": 0.5}, "width": {"method": "magnitude"}, "depth": depth,
                           "train": {"steps": 10}})


def _random(gated, seed: int, exit: int | None = None) -> None:
    """Random width masks and depth decisions, including two adjacent skipped units and a kept one."""
    gen = torch.Generator().manual_seed(seed)
    method = gated.axes["width"].method
    for i, s in enumerate(method.sites):
        mask = torch.rand(s.units, generator=gen) < 0.6
        mask[0] = mask[0] or s.min_units > 0
        getattr(method, f"frozen_{i}").copy_(mask)
    method.is_frozen.fill_(True)
    if "depth" in gated.axes:
        depth = gated.axes["depth"]
        keep = torch.rand(len(depth.units), generator=gen) < 0.5
        keep[1:3] = False      # adjacent skips: the second must fall back to the first one's input
        keep[0] = len(keep) > 1  # one kept unit, unless it is the only one
        depth.frozen_keep.copy_(keep)
        depth.is_frozen.fill_(True)
    if "exits" in gated.axes:
        gated.axes["exits"].exit_chosen.fill_(exit or 0)


@pytest.mark.parametrize("key", ["deit", "deit_branch", "swin_shifted", "levit", "mvitv2", "hugging_face", "dinov2_reg"])
def test_open_equals_original_and_eval_equals_compact(key):
    g = _deit() if key.startswith("deit") else _graph(key)
    spec = _spec(skip_blocks=True, per_branch=key == "deit_branch")
    gated = instrument(g, spec)
    x = g.example_inputs[0]
    with torch.no_grad():
        assert torch.equal(gated.set_mode("open")(x), g.gm(x))
    _random(gated, seed=3)
    compact = materialize(gated)
    with torch.no_grad():
        expected = gated.set_mode("eval")(x)
        err = (compact(x) - expected).abs().max()
    assert err <= TOL * max(1.0, float(expected.abs().max())), err
    cg = vg.trace(compact, g.example_inputs)
    assert cg.structure.flops == pytest.approx(gated.cost()["flops"], rel=1e-6)  # the cost model is exact
    assert flop_counter_flops(compact, g.example_inputs, 2) == cg.structure.flops
    skipped = [u for u, keep in gated.decisions()["depth"].items() if not keep]
    assert skipped and "vg_blocks" not in compact.code
    if key != "deit_branch":
        assert len(cg.structure.blocks) == len(g.structure.blocks) - len(skipped)


def test_exit_truncation_equals_the_exit_output_in_the_gated_graph():
    g = _deit(depth=6)
    gated = instrument(g, _spec(exits=[2, 4]))
    x = g.example_inputs[0]
    with torch.no_grad():
        assert torch.equal(gated.set_mode("open")(x), g.gm(x))  # exits do not touch the main path
        final, exits = gated._run(x)
        exits = list(exits.values())
    assert torch.equal(final, g.gm(x)) and len(exits) == 2 and exits[0].shape == final.shape
    gated.axes["width"].freeze(gated.pricer, gated.outputs)
    _random(gated, seed=1, exit=4)
    compact = materialize(gated)
    with torch.no_grad():
        final, exits = gated.set_mode("eval")._run(x)
        exits = list(exits.values())
        assert (compact(x) - exits[1]).abs().max() <= TOL * max(1.0, float(exits[1].abs().max()))
    cg = vg.trace(compact, g.example_inputs)
    assert len(cg.structure.blocks) == 4 and not hasattr(compact, "vg_exits")  # the exit took the head's names
    assert "self.head(" in compact.code and "exit2" not in compact.code
    assert cg.structure.flops == pytest.approx(gated.cost()["flops"], rel=1e-6)


def test_exit_and_skipped_blocks_together():
    g = _deit(depth=6)
    gated = instrument(g, _spec(skip_blocks=True, exits=[4]))
    _random(gated, seed=5, exit=4)
    compact = materialize(gated)
    x = g.example_inputs[0]
    with torch.no_grad():
        expected = gated.set_mode("eval")(x)
        assert (compact(x) - expected).abs().max() <= TOL * max(1.0, float(expected.abs().max()))
    assert vg.trace(compact, g.example_inputs).structure.flops == pytest.approx(gated.cost()["flops"], rel=1e-6)


def test_block_gates_pass_without_units_changes_nothing():
    g = _deit(depth=2)
    gm = copy.deepcopy(g.gm)
    result = InsertBlockGatesPass([])(gm)
    assert not result.modified and not hasattr(result.gm, "vg_blocks")


def test_projection_moves_learned_decisions_least():
    costs = torch.tensor([0.2, 0.2, 0.2, 0.2])

    def cost_at(keep, widths):
        scale = {"full": 1.0, "floor": 0.5, "learned": 0.8}[widths]
        return 0.2 + float((costs * keep.float()).sum()) * scale

    margins = torch.tensor([-1.0, -0.5, 0.3, 2.0])  # learned: skip units 0 and 1
    assert project(margins, cost_at, 0.6, 0.03, width=False, fill=False).tolist() == [False, False, True, True]
    # width after depth: the widths must be able to land (full width >= 0.67), and of those candidates the
    # one nearest the target with the learned widths (0.2 + 0.6 * 0.8 = 0.68) wins
    assert project(margins, cost_at, 0.7, 0.03, width=True, fill=False).tolist() == [False, True, True, True]
    # learned widths already cut a lot: fewer skipped blocks meet the target with them (0.2 + 0.8 * 0.8 = 0.84)
    assert project(margins, cost_at, 0.85, 0.03, width=True, fill=False).tolist() == [True, True, True, True]
    # one-shot depth fills: as many skips as keep the full-width cost at the target
    assert project(margins, cost_at, 0.6, 0.03, width=True, fill=True).tolist() == [False, False, True, True]
    # depth alone cannot land on 0.7 (0.6 or 0.8): the nearest wins
    assert project(margins, cost_at, 0.75, 0.01, width=False, fill=False).sum() in (2, 3)


def test_spec_errors_name_the_problem():
    g = _deit(depth=4)
    with pytest.raises(SpecError, match="no exit after block 4"):
        instrument(g, _spec(exits=[4]))
    with pytest.raises(SpecError, match="1..4"):
        instrument(g, _spec(exits=[7]))
    with pytest.raises(SpecError, match="depth.exit 3 is not one of"):
        instrument(g, Spec.from_dict({"depth": {"exits": [2], "exit": 3}}))
    depth_only = {"budget": {"flops": 0.62}, "width": {"heads": False, "mlp": False}, "depth": {"skip_blocks": True}}
    with pytest.raises(SpecError, match="out of reach of depth alone.*per_branch"):
        instrument(g, Spec.from_dict(depth_only))
    with pytest.raises(SpecError, match="1-based"):
        Spec.from_dict({"depth": {"exits": [0]}})
    with pytest.raises(SpecError, match="no exit after block 1 .*besides the last block"):  # sizes from inside
        instrument(_graph("swin"), _spec(exits=[1]))
    with pytest.raises(SpecError, match="need training"):
        vg.compress(g, {"depth": {"exits": [2]}}, data="none", progress=False, latency_targets=())


class _Tapped(torch.nn.Module):
    """The handmade ViT whose block 0's MLP hidden layer is read again after the block."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = handmade_vit(depth=2)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        v, b = self.vit, self.vit.blocks[0]
        x = v.embed(img).flatten(2).transpose(1, 2)
        x = torch.cat([v.cls.expand(x.shape[0], -1, -1), x], dim=1) + v.pos
        x = x + b.attn(b.ln1(x))
        h = b.ff[0](b.ln2(x))
        x = v.blocks[1](x + b.ff[2](b.ff[1](h)))
        return v.head(v.norm(x)[:, 0]) + h.mean((1, 2))[:, None]


def test_stage_transitions_are_not_skippable():
    g = _graph("levit")  # the attention that downsamples into each new stage has no residual
    gated = instrument(g, _spec(skip_blocks=True))
    reasons = gated.axes["depth"].not_skippable
    assert len(gated.axes["depth"].units) + len(reasons) == len(g.structure.blocks) and len(reasons) == 2
    assert all("stage transition" in r for r in reasons.values())
    # MViTv2: only the three stage transitions stay. Its other blocks pool their queries with stride 1 and
    # hand the same feature size on; fx traced that size from the pooled tensor and kept them, torch.export
    # records it as the number it is, and deleting them equals the model with those blocks removed
    mvit = instrument(_graph("mvitv2"), _spec(skip_blocks=True))
    assert sorted(mvit.axes["depth"].not_skippable) == [f"stages.{i}.blocks.0" for i in (1, 2, 3)]
    assert "stages.0.blocks.0" in [u.name for u in mvit.axes["depth"].units]
    # a value computed inside a block and read after it (here an MLP hidden layer): the block cannot go
    tapped = [b.skip_reason for b in vg.trace(_Tapped().eval(), torch.randn(2, 3, 32, 32)).blocks]
    assert "%vit_blocks_0_ff_0 computed inside it" in tapped[0] and "cannot be deleted" in tapped[0], tapped
    assert tapped[1] is None
    # parallel branches summed through torch.stack: the reason says so, not "a stage transition"
    par = timm.create_model("vit_small_patch16_18x2_224", img_size=32, patch_size=8, depth=2, embed_dim=64,
                            num_heads=2).eval()
    reasons = [b.skip_reason for b in vg.trace(par, torch.randn(2, 3, 32, 32)).blocks]
    assert all(r and "by stack" in r and "stage transition" not in r for r in reasons), reasons


def test_one_shot_depth_skips_by_influence_and_meets_the_budget():
    g = _deit(depth=6)
    spec = Spec.from_dict({"budget": {"flops": 0.55}, "width": {"method": "magnitude"},
                           "depth": {"skip_blocks": True}})
    result = vg.compress(g, spec, data="none", progress=False, latency_targets=())
    assert abs(result.report["budget"]["achieved"] - 0.55) <= 0.03
    assert result.report["depth"]["blocks"]["compressed"] < 6
    assert result.report["parity"]["max_abs_err"] <= 1e-4


def test_learned_gates_and_exits_train_and_land_on_budget(tmp_path):
    from vitgraph.cli.demo import INPUT, demo_model

    torch.manual_seed(0)
    spec = {"budget": {"flops": 0.5}, "width": {"method": "wdpruning", "align": 16},
            "depth": {"skip_blocks": True, "exits": [2, 3]},
            "train": {"steps": 16, "search": 0.5, "batch_size": 32, "log_every": 4}}
    result = vg.compress(demo_model().eval(), spec, example_inputs=(torch.randn(2, *INPUT),), data="digits",
                         out_dir=tmp_path, progress=False, latency_targets=())
    report = result.report
    assert abs(report["budget"]["achieved"] - 0.5) <= 0.03 and report["parity"]["max_abs_err"] <= 1e-4
    assert set(report["depth"]["exit_top1"]) == {"final", "exit2", "exit3"}
    lines = (tmp_path / "train" / "metrics.jsonl").read_text()
    assert '"exit2"' in lines and '"lagrangian"' in lines  # the exits' losses and the budget were trained
    assert report["compressed"]["top1"] is not None


@pytest.mark.slow
def test_deit_small_without_three_blocks_exports_a_pt2_that_loads_in_a_fresh_process(tmp_path):
    model = timm.create_model("deit_small_patch16_224").eval()
    x = torch.randn(2, 3, 224, 224)
    g = vg.trace(model, (x,))
    spec = Spec.from_dict({"budget": {"flops": 0.75}, "width": {"heads": False, "mlp": False},
                           "depth": {"skip_blocks": True}})
    gated = instrument(g, spec)
    keep = torch.ones(12, dtype=torch.bool)
    keep[[3, 7, 8]] = False
    gated.axes["depth"].frozen_keep.copy_(keep)
    gated.axes["depth"].is_frozen.fill_(True)
    gated.freeze()
    compact = materialize(gated)
    assert len(vg.trace(compact, (x,)).structure.blocks) == 9
    from vitgraph.targets import export
    export.lower(compact, (x,), tmp_path / "model.pt2")
    with torch.no_grad():
        expected = compact(x)
    torch.save(x, tmp_path / "x.pt")
    torch.save(expected, tmp_path / "y.pt")
    code = ("import torch, sys; assert 'timm' not in sys.modules and 'vitgraph' not in sys.modules;"
            f"p = torch.export.load('{tmp_path / 'model.pt2'}').module(); x = torch.load('{tmp_path / 'x.pt'}');"
            f"y = torch.load('{tmp_path / 'y.pt'}'); e = (p(x) - y).abs().max().item(); print(e);"
            "assert e < 1e-4, e; assert 'timm' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("crash_at", [3, 7], ids=["before-freeze", "after-freeze"])
def test_resume_with_gates_and_exits_is_bit_exact(tmp_path, crash_at):
    from tests.test_train import Crash, _crash_after
    from vitgraph.train.data import load_data
    from vitgraph.train.loop import fit

    data = load_data("digits", (1, 16, 16), batch_size=16)
    spec = Spec.from_dict({"budget": {"flops": 0.6}, "width": {"method": "wdpruning", "align": 1},
                           "depth": {"skip_blocks": True, "exits": [1, 2]},
                           "train": {"steps": 10, "search": 0.5, "batch_size": 16, "checkpoint_every": 1}})

    def build(seed: int):
        torch.manual_seed(0)
        m = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, num_classes=10,
                              embed_dim=32, depth=3, num_heads=2).eval()
        gated = instrument(vg.trace(m, torch.randn(2, 1, 16, 16)), spec, val_data=data.val)
        torch.manual_seed(seed)
        return gated, m

    straight, teacher = build(0)
    fit(straight, data.train, spec.train, teacher=teacher, out_dir=tmp_path / "a", progress=False)
    crashed, _ = build(0)
    _crash_after(crashed, crash_at)
    with pytest.raises(Crash):
        fit(crashed, data.train, spec.train, teacher=teacher, out_dir=tmp_path / "b", progress=False)
    resumed, _ = build(99)
    fit(resumed, data.train, spec.train, teacher=teacher, out_dir=tmp_path / "b", resume=True, progress=False)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and "axes.exits.exit_chosen" in a and "axes.depth.frozen_keep" in a
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert straight.frozen and resumed.frozen
    assert straight.axes["exits"].exit_after() == resumed.axes["exits"].exit_after()
