"""SPViT's learned selectors and a learned width sharing one budget (issue 27, item 3): with ``tokens.keep`` empty,
the width method's Lagrangian prices the selectors' expected keep fractions with the widths' expected units; at
freeze the tokens keep what they learned and the widths close the rest.

Each: the ``train`` price differentiates to the selectors; a short run compiles; the eval decisions' price ==
the compact graph's FLOPs (FlopCounterMode) and lands on the budget; gated ``eval`` == compact; the report says
how the budget was split.
"""
from __future__ import annotations

import pytest
import torch

from tests.checks import one_thread  # noqa: F401 - an autouse fixture: one torch thread
from tests.test_tokens import _model
from vitgraph.analysis.cost import flop_counter_flops
from vitgraph.axes.token_methods import on_budget
from vitgraph.gated import instrument, materialize
from vitgraph.spec import Spec


def _spec(method: str, budget: float = 0.5, **tokens) -> Spec:
    return Spec.from_dict({"budget": {"flops": budget},
                           "width": {"method": method, "heads": True, "mlp": True, "align": 4},
                           "tokens": {"method": "spvit", "stages": [1, 2], **tokens},
                           "train": {"steps": 6, "batch_size": 8, "lr": 1e-3, "search": 0.67, "log_every": 1}})


def test_the_budget_term_reaches_the_selectors():
    g = _model("deit")
    gated = instrument(g, _spec("wdpruning"))
    tokens = gated.axes["tokens"]
    assert tokens.targets is None  # no fixed keep ratios: no keep-ratio loss
    gated.train()
    gated(g.example_inputs[0])
    penalties = gated.penalties()
    assert "tokens.ratio" not in penalties and "tokens.distill" in penalties
    cost = gated.pricer("train")
    tokens_only = gated.pricer("train", {"width": {}})
    assert isinstance(tokens_only, torch.Tensor) and float(tokens_only.detach()) < 1.0  # the expected keep is priced
    cost.backward()
    grads = [p.grad for p in gated.gm.get_submodule("vg_tokens.blocks_1").parameters()]
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)


@pytest.mark.parametrize("method, budget", [("wdpruning", 0.3), ("uvc", 0.5)])
def test_a_shared_budget_run_compiles_and_lands(method, budget, tmp_path):
    """0.3: the widths close what the learned tokens leave; 0.5: the freshly initialised selectors (about half
    the tokens per stage) already cut below it, so the tokens keep more and the widths keep everything."""
    from torch.utils.data import TensorDataset

    from vitgraph.train.loop import fit

    g = _model("deit")
    spec = _spec(method, budget)
    gated = instrument(g, spec)
    x = g.example_inputs[0]
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, *x.shape[1:], generator=gen), torch.randint(0, 10, (48,), generator=gen))
    fit(gated, data, spec.train, teacher=g.gm, progress=False, out_dir=tmp_path)
    assert gated.frozen
    tokens = gated.axes["tokens"]
    split = tokens.report()["budget"]
    assert split["how"].startswith("learned") and split["learned_keep"] is not None
    assert set(split["split"]) == {"tokens", "width"} and sum(split["split"].values()) == pytest.approx(1.0, abs=1e-3)
    assert split["keep"] == [round(k / tokens.patches, 4) for k in tokens.kept.tolist()]
    gated.eval()
    gated.set_mode("eval")
    compact = materialize(gated)
    with torch.no_grad():
        for inputs in (x, torch.randn(3, *x.shape[1:], generator=gen)):
            want = gated(inputs)
            assert (compact(inputs) - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
    priced = gated.cost()["flops"]
    assert flop_counter_flops(compact, g.example_inputs, 2) == pytest.approx(priced, rel=1e-6)
    assert abs(priced / g.structure.flops - budget) <= spec.budget.tolerance
    assert (split["split"]["width"] > 0.2) == (budget < 0.5)


def test_on_budget_moves_the_learned_ratios_only_when_the_later_axes_cannot_close_the_gap():
    def cost(rho, mode):  # a toy: tokens scale everything, the later axes keep [floor 0.4, 1]
        return sum(rho) / len(rho) * (1.0 if mode == "full" else 0.4)

    assert on_budget([0.8, 0.6], cost, 0.5) == [0.8, 0.6]            # the later axes close 0.7 -> 0.5
    up = on_budget([0.3, 0.1], cost, 0.5)                            # the tokens alone cut below: keep more
    assert cost(up, "full") == pytest.approx(0.5, abs=1e-6) and up[0] > 0.3 and up[1] > 0.1
    down = on_budget([1.0, 1.0], cost, 0.2)                          # the later floor is too high: cut more
    assert cost(down, "floor") == pytest.approx(0.2, abs=1e-6)


def test_given_keep_ratios_still_fix_the_selectors():
    gated = instrument(_model("deit"), _spec("wdpruning", keep=[0.7, 0.5]))
    assert gated.axes["tokens"].targets == pytest.approx([0.7, 0.5])


def test_a_latency_budget_prices_the_selectors_too(tmp_path):
    """On a latency table (a made-up one: the pricing, not the measurement) the same Lagrangian reaches the
    selectors, and the freeze lands the table's predicted ratio on the budget."""
    from torch.utils.data import TensorDataset

    from tests.test_latency import _table
    from vitgraph.train.loop import fit

    g = _model("deit")
    spec = Spec.from_dict({"budget": {"latency": 0.5, "target": "eager", "batch": 1},
                           "width": {"method": "wdpruning", "heads": True, "mlp": True, "align": 4},
                           "tokens": {"method": "spvit", "stages": [1, 2]},
                           "train": {"steps": 6, "batch_size": 8, "lr": 1e-3, "search": 0.67, "log_every": 1}})
    gated = instrument(g, spec, latency=_table(g))
    assert gated.pricer is not gated.flops_pricer  # the budget is the table's
    gated.train()
    gated(g.example_inputs[0])
    cost = gated.pricer("train", {"width": {}})
    cost.backward()
    grads = [p.grad for p in gated.gm.get_submodule("vg_tokens.blocks_1").parameters()]
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)
    gated.zero_grad()
    x = g.example_inputs[0]
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, *x.shape[1:], generator=gen), torch.randint(0, 10, (48,), generator=gen))
    fit(gated, data, spec.train, teacher=g.gm, progress=False, out_dir=tmp_path)
    assert gated.frozen and gated.axes["tokens"].report()["budget"]["how"].startswith("learned")
    assert abs(float(gated.pricer("eval")) - 0.5) <= spec.budget.slack


def test_one_shot_widths_still_need_keep_ratios():
    """Learned selectors with one-shot widths and no tokens.keep: no Lagrangian to share, refused by name."""
    from vitgraph.errors import SpecError

    with pytest.raises(SpecError, match="one-shot widths deciding after it; list tokens.keep .*wdpruning, uvc"):
        instrument(_model("deit"), _spec("magnitude"))
