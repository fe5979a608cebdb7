"""``width.allocation``: one keep ratio everywhere (uniform) or one ranking across layers (global).

The models are random-init tiny DeiTs; ``_skewed`` makes block 1 lopsided (one strong head of four, a
quarter of strong MLP units) so that a ranking across layers has something to find.
"""
from __future__ import annotations

import functools

import pytest
import timm
import torch

import vitgraph as vg
from vitgraph.analysis.cost import flop_counter_flops
from vitgraph.axes.allocation import Site, allocate, allocate_global, normalised
from vitgraph.axes.width_methods import build_method

HEAD_DIM, DIM, HIDDEN = 16, 64, 256


def _weaken(block: torch.nn.Module, heads: slice, units: slice, by: float = 0.1) -> None:
    """Scale the weights the given heads (q/k/v rows, proj columns) and MLP units own by ``by``."""
    rows = [which * DIM + h * HEAD_DIM + d for which in range(3) for h in range(4)[heads] for d in range(HEAD_DIM)]
    cols = [h * HEAD_DIM + d for h in range(4)[heads] for d in range(HEAD_DIM)]
    with torch.no_grad():
        block.attn.qkv.weight[rows] *= by
        block.attn.proj.weight[:, cols] *= by
        block.mlp.fc1.weight[units] *= by
        block.mlp.fc2.weight[:, units] *= by


def _model(skewed: bool, scaled_block: int | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1, num_classes=10,
                              embed_dim=DIM, depth=4, num_heads=4).eval()
    if skewed:  # block 1: head 0 and units 0..63 strong, the rest ten times weaker
        _weaken(model.blocks[1], slice(1, 4), slice(64, HIDDEN))
    if scaled_block is not None:  # every weight slice of one block's groups times 5: importance times 5
        _weaken(model.blocks[scaled_block], slice(0, 4), slice(0, HIDDEN), by=5.0)
    return model


X = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))


@functools.lru_cache(maxsize=None)
def _compress(allocation: str | None, skewed: bool = True, flops: float = 0.5,
              scaled_block: int | None = None) -> vg.pipeline.Result:
    width = {"method": "magnitude"} | ({"allocation": allocation} if allocation else {})
    spec = vg.Spec.from_dict({"budget": {"flops": flops}, "width": width})
    return vg.compress(_model(skewed, scaled_block), spec, example_inputs=(X,), data="none", progress=False,
                       latency_targets=())


def _by_kind(kept: dict[str, int], kind: str) -> dict[int, int]:
    return {int(name.split(".")[1]): n for name, n in kept.items() if name.endswith(kind)}


# -- end to end -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flops", [0.5, 0.3])
def test_global_lands_on_budget_and_the_flop_counter_agrees(flops):
    result = _compress("global", flops=flops)
    report = result.report
    assert abs(report["budget"]["achieved"] - flops) <= report["budget"]["tolerance"]
    assert report["compressed"]["flops"] == flop_counter_flops(result.compact, (X,), 2)
    assert report["budget"]["achieved"] == pytest.approx(report["compressed"]["flops"] / report["dense"]["flops"])
    assert report["parity"]["max_abs_err"] <= 1e-4
    assert sum(_by_kind(report["kept"], "heads").values()) >= 1 and sum(_by_kind(report["kept"], "mlp").values()) >= 8


def test_global_gives_unequal_widths_that_follow_importance_uniform_does_not():
    glob, uni = _compress("global").report["kept"], _compress("uniform").report["kept"]
    heads, mlp = _by_kind(glob, "heads"), _by_kind(glob, "mlp")
    assert mlp[1] < min(mlp[b] for b in (0, 2, 3)), mlp      # block 1 has only a quarter of strong units
    assert heads[1] < max(heads[b] for b in (0, 2, 3)), heads  # and one strong head
    decisions = _compress("global").gated.axes["width"].decisions()
    assert set(decisions["blocks.1.mlp.mlp"]) <= set(range(64)) and decisions["blocks.1.attn.heads"] == [0]
    assert len(set(_by_kind(uni, "heads").values())) == 1 and len(set(_by_kind(uni, "mlp").values())) == 1


def test_uniform_is_the_default_and_keeps_one_ratio():
    assert vg.Spec.from_dict({}).width.allocation == "uniform"
    default, explicit = _compress(None), _compress("uniform")
    assert default.gated.axes["width"].method.allocation == "uniform"
    assert default.report["kept"] == explicit.report["kept"]
    assert default.gated.axes["width"].decisions() == explicit.gated.axes["width"].decisions()
    assert set(_by_kind(default.report["kept"], "heads").values()) == {2}  # 2 of 4 heads, 128 of 256 units
    assert set(_by_kind(default.report["kept"], "mlp").values()) == {128}
    assert abs(default.report["budget"]["achieved"] - 0.5) <= 0.03


def test_bad_allocation_is_a_spec_error_naming_the_key_and_the_choices():
    with pytest.raises(vg.SpecError, match=r"width\.allocation 'layerwise' is not one of uniform, global"):
        vg.Spec.from_dict({"width": {"allocation": "layerwise"}})
    with pytest.raises(vg.SpecError, match="width.allocation"):
        build_method("magnitude", [], 0.5, lambda p: None, {}, allocation="per_layer")
    assert vg.Spec.from_dict({"width": {"allocation": "global"}}).to_dict()["width"]["allocation"] == "global"


def test_global_is_blind_to_one_blocks_weight_scale():
    """Block 2's weights times 5 (its importance times 5): the same units are kept, block for block."""
    base, scaled = _compress("global"), _compress("global", scaled_block=2)
    assert scaled.report["kept"] == base.report["kept"]
    assert scaled.gated.axes["width"].decisions() == base.gated.axes["width"].decisions()


# -- allocate_global on synthetic groups ----------------------------------------------------------------
def _site(name: str, kind: str, units: int, align: int, min_units: int) -> Site:
    return Site(name, kind, units, align, min_units, "", torch.zeros(0, dtype=torch.long), ())


def _problem(seed: int) -> tuple[list[Site], dict[str, torch.Tensor], float, object]:
    """Random groups, importance with random spreads, and a linear cost with a fixed part."""
    gen = torch.Generator().manual_seed(seed)

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (), generator=gen))

    sites = [_site(f"h{i}", "heads", randint(2, 7), 1, randint(0, 2)) for i in range(randint(2, 5))]
    sites += [_site(f"m{i}", "mlp", 8 * randint(4, 13), randint(1, 3) * 4, randint(0, 2)) for i in range(randint(2, 5))]
    importance = {s.name: torch.rand(s.units, generator=gen) ** float(1 + 4 * torch.rand((), generator=gen))
                  for s in sites}
    weights = torch.rand(len(sites), generator=gen) * torch.tensor([s.units for s in sites], dtype=torch.float)
    weights = 0.9 * weights / weights.sum()
    cost = lambda f: 0.1 + sum(float(w) * float(f[s.name]) for w, s in zip(weights, sites))  # noqa: E731
    return sites, importance, float(0.3 + 0.6 * torch.rand((), generator=gen)), cost


@pytest.mark.parametrize("seed", range(12))
def test_normalised_ranking_is_invariant_to_scaling_one_group(seed):
    sites, importance, target, cost = _problem(seed)
    kept = allocate_global(sites, importance, target, cost)
    gen = torch.Generator().manual_seed(100 + seed)
    victim = sites[int(torch.randint(len(sites), (), generator=gen))].name
    for factor in (1e-3, 0.37, 8.0, 1e3):
        rescaled = {**importance, victim: importance[victim] * factor}
        assert allocate_global(sites, rescaled, target, cost) == kept, (victim, factor)
    assert all(s.min_units <= kept[s.name] <= s.units for s in sites)


def test_normalised_is_mean_one_and_zero_safe():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert torch.allclose(normalised(scores), scores / 3.0) and normalised(scores).mean() == pytest.approx(1.0)
    assert torch.equal(normalised(torch.zeros(4)), torch.zeros(4))


def test_no_kind_vanishes_where_every_group_may_go():
    sites = [_site(f"h{i}", "heads", 4, 1, 0) for i in range(3)] + [_site(f"m{i}", "mlp", 64, 8, 0) for i in range(3)]
    weights = {s.name: 0.05 if s.kind == "heads" else 0.25 for s in sites}
    cost = lambda f: 0.1 + sum(weights[k] * float(v) for k, v in f.items())  # noqa: E731
    importance = {s.name: torch.rand(s.units, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(sites)}
    for target in (0.2, 0.12):
        kept = allocate_global(sites, importance, target, cost)
        assert sum(kept[s.name] for s in sites if s.kind == "heads") >= 1
        assert sum(kept[s.name] for s in sites if s.kind == "mlp") >= 8


def test_identical_head_groups_step_one_at_a_time_onto_the_budget():
    """Learned shapes where every block kept 1 of 4 heads and the MLPs cannot grow: scaling the head
    groups together jumps from 0.55 (1 head each) to 0.70 (2 each) around a 0.60 target; one more head
    in one block lands on it (a learned run that overshot its budget in a few steps did this)."""
    sites = [_site(f"h{i}", "heads", 4, 1, 1) for i in range(3)] + [_site(f"m{i}", "mlp", 128, 8, 1) for i in range(3)]
    weights = {s.name: 0.2 if s.kind == "heads" else 0.13 for s in sites}
    cost = lambda f: 0.01 + sum(weights[k] * float(v) for k, v in f.items())  # noqa: E731
    learned = {s.name: 0.25 if s.kind == "heads" else 1.0 for s in sites}
    kept = allocate(sites, learned, 0.6, cost)
    assert cost({s.name: kept[s.name] / s.units for s in sites}) == pytest.approx(0.6, abs=0.01)
    assert sorted(kept[f"h{i}"] for i in range(3)) == [1, 1, 2]
