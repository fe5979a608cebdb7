"""Gate primitives and the learned width methods (WDPruning, UVC) on tiny models."""
from __future__ import annotations

import pytest
import timm
import torch

import vitgraph as vg
from vitgraph.gated import instrument, materialize
from vitgraph.gates.units import ceil_ste, concrete, gumbel2, least_sum, topk_hard, topk_mask
from vitgraph.spec import Spec


# -- primitives -------------------------------------------------------------------------------------
def test_topk_breaks_ties_by_index_and_passes_gradients():
    scores = torch.tensor([0.0, 1.0, 0.0, 0.0], requires_grad=True)
    k = torch.tensor(2.0, requires_grad=True)
    mask = topk_mask(scores, k)
    assert mask.tolist() == [1.0, 1.0, 0.0, 0.0]  # score 1, then the lowest index among the ties
    (mask * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert scores.grad.tolist() == [1.0, 2.0, 3.0, 4.0]  # straight through
    assert k.grad.item() == pytest.approx(3.0)  # sum of mask x dmask
    assert topk_hard(torch.zeros(5), 0).sum() == 0 and topk_hard(torch.zeros(5), 9).sum() == 5


def test_least_sum_backward_is_the_next_smallest_value():
    v = torch.tensor([5.0, 1.0, 3.0, 2.0])
    k = torch.tensor(2.0, requires_grad=True)
    s = least_sum(v, k)
    assert s.item() == 3.0
    s.backward()
    assert k.grad.item() == 3.0


def test_ceil_ste_and_samplers():
    x = torch.tensor([0.2, 1.7], requires_grad=True)
    y = ceil_ste(x * 10, clip=0.5)
    assert y.tolist() == [2.0, 17.0]
    y.sum().backward()
    assert x.grad.tolist() == [5.0, 5.0]  # identity, clipped to 0.5, times the 10 of x * 10
    p = torch.full((1000,), 0.8)
    assert 0.7 < concrete(p).mean() < 0.9
    g = gumbel2(torch.zeros(7, 2))
    assert torch.equal(g.sum(-1), torch.ones(7)) and set(g.flatten().tolist()) <= {0.0, 1.0}


# -- learned methods --------------------------------------------------------------------------------
def _tiny() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, num_classes=10,
                              embed_dim=64, depth=2, num_heads=4).eval()
    return model, (torch.randn(2, 1, 16, 16),)


@pytest.mark.parametrize("method", ["wdpruning", "uvc"])
def test_learned_method_at_init_is_the_original(method):
    model, x = _tiny()
    g = vg.trace(model, x)
    gated = instrument(g, Spec.from_dict({"width": {"method": method}}))
    with torch.no_grad():
        dense = model(*x)
        for mode in ("open", "train", "eval"):  # thresholds at 10 / counts at 0: every unit kept
            assert torch.equal(gated.set_mode(mode)(*x), dense), mode


@pytest.mark.parametrize("method, head_dim", [("wdpruning", False), ("uvc", True), ("wdpruning", True)])
def test_learned_method_compresses_to_budget_with_exact_rewrite(method, head_dim, tmp_path):
    model, x = _tiny()
    spec = Spec.from_dict({"budget": {"flops": 0.5}, "width": {"method": method, "align": 8, "head_dim": head_dim},
                           "train": {"steps": 24, "batch_size": 32, "log_every": 4}})
    result = vg.compress(model, spec, example_inputs=x, data="digits", progress=False, out_dir=tmp_path,
                         latency_targets=())
    report = result.report
    assert abs(report["budget"]["achieved"] - 0.5) <= 0.03
    assert report["budget"]["projected"] == (abs(report["budget"]["learned"] - report["budget"]["achieved"]) > 1e-6)
    assert report["parity"]["max_abs_err"] <= 1e-4  # compress raises ParityError above this
    assert report["compressed"]["top1"] is not None and report["train"]["steps"] == 24
    # random eval-mode decisions of this method also materialize exactly
    gated = result.gated
    with torch.no_grad(), gated.using("eval"):
        assert torch.allclose(materialize(gated)(*x), gated(*x), atol=1e-5)
    lines = (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()
    assert any('"search"' in line for line in lines) and any('"finetune"' in line for line in lines)


def test_wdpruning_thresholds_fall_and_duals_rise_under_the_budget():
    model, x = _tiny()
    g = vg.trace(model, x)
    spec = Spec.from_dict({"budget": {"flops": 0.4}, "width": {"method": "wdpruning", "align": 8},
                           "train": {"steps": 30, "search": 1.0, "batch_size": 32}})
    gated = instrument(g, spec)
    from vitgraph.train.data import load_data
    from vitgraph.train.loop import fit

    before = gated.status()["expected"]
    fit(gated, load_data("digits", (1, 16, 16), 32).train, spec.train, progress=False)
    assert gated.budget.duals.min() > 0  # the constraint was violated, so the multipliers rose
    assert all(float(t) < 9.0 for t in gated.axes["width"].method.thresholds)  # every threshold left its start (10)
    assert gated.status()["expected"] < before - 0.1  # R moves towards R_t


def test_uvc_duals_stay_nonnegative_and_counts_grow():
    model, x = _tiny()
    g = vg.trace(model, x)
    spec = Spec.from_dict({"budget": {"flops": 0.5}, "width": {"method": "uvc"},
                           "train": {"steps": 30, "search": 1.0, "batch_size": 32}})
    gated = instrument(g, spec)
    from vitgraph.train.data import load_data
    from vitgraph.train.loop import fit

    fit(gated, load_data("digits", (1, 16, 16), 32).train, spec.train, progress=False)
    assert gated.axes["width"].method.y.min() >= 0 and gated.budget.duals.min() >= 0
    assert max(float(c) for c in gated.axes["width"].method.counts) > 0
