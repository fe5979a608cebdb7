"""The compression-axis protocol: an axis defined here alone, in tests/, runs through instrument -> fit ->
materialize with nothing under vitgraph/ or passes/ knowing it; the pricer, the budget and the pass
manager serve any axis; the core names none.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.fx as fx
from torch import nn

import vitgraph as vg
from vitgraph.analysis.cost import flop_counter_flops
from vitgraph.analysis.depth import branch_factor, removable_branches
from vitgraph.analysis.ops import linear_info
from vitgraph.axes import Axis, AxisContext
from vitgraph.errors import PostconditionError, PreconditionError
from vitgraph.gated import instrument, materialize
from vitgraph.meta import ROLE, SHAPE
from vitgraph.passes.base import PassResult, VitPass, require_roles
from vitgraph.passes.manager import PassManager
from vitgraph.spec import Spec

ROOT = "toy_scales"


# -- a toy axis: a learned scalar per MLP branch; the smallest one drops its branch, the others fold into fc2 --
class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.on = False     # open: the identity
        self.drop = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.on:
            return x
        return x * 0.0 if self.drop else x * self.scale


class InsertScalesPass(VitPass):
    """After: every listed MLP branch passes through its Scale just before its residual add."""

    def __init__(self, branches: list[tuple[int, str, str]]) -> None:
        self.branches = branches  # (block, add, skip)

    def requires(self, gm: fx.GraphModule) -> None:
        require_roles(gm, {("mlp.fc2", None), ("residual.add", None)}, self.name)

    def call(self, gm: fx.GraphModule) -> PassResult:
        gm.add_module(ROOT, nn.Module())
        nodes = {n.name: n for n in gm.graph.nodes}
        for block, add, skip in self.branches:
            operand = next(a for a in nodes[add].args if isinstance(a, fx.Node) and a is not nodes[skip])
            gm.add_submodule(f"{ROOT}.b{block}", Scale())
            with gm.graph.inserting_before(nodes[add]):
                s = gm.graph.call_module(f"{ROOT}.b{block}", (operand,))
            s.meta[SHAPE] = operand.meta.get(SHAPE)
            nodes[add].replace_input_with(operand, s)
        gm.recompile()
        return PassResult(gm, modified=bool(self.branches))


class FoldScalesPass(VitPass):
    """After: no Scale nodes; a dropped branch's add is its shortcut, a kept scale is folded into fc2."""

    def __init__(self, dropped: set[int]) -> None:
        self.dropped = dropped

    def call(self, gm: fx.GraphModule) -> PassResult:
        fc2 = {n.meta[ROLE].block: n for n in gm.graph.nodes if n.meta.get(ROLE) and n.meta[ROLE].kind == "mlp.fc2"}
        for node in [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(ROOT + ".")]:
            block = int(str(node.target).rsplit(".b", 1)[1])
            (add,) = node.users
            if block in self.dropped:
                add.replace_all_uses_with(next(a for a in add.args if a is not node))
                gm.graph.erase_node(add)
            else:
                info = linear_info(fc2[block], gm)
                scale = gm.get_submodule(str(node.target)).scale.detach()
                with torch.no_grad():
                    gm.get_parameter(info.weight).mul_(scale)
                    if info.bias is not None:
                        gm.get_parameter(info.bias).mul_(scale)
                node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()  # the scales go with their nodes
        gm.recompile()
        return PassResult(gm, modified=True)


class ScaleAxis(Axis):
    name = "toy"
    freeze_order = 30
    materialize_order = 30

    def __init__(self, ctx: AxisContext, branches: list[tuple[int, str, str]]) -> None:
        super().__init__(ctx)
        self.branches = branches
        self.scales: dict[int, Scale] = {}
        self.register_buffer("dropped", torch.tensor(-1))  # -1: not frozen yet

    @classmethod
    def from_spec(cls, ctx: AxisContext) -> ScaleAxis:
        return cls(ctx, [(b.index, r.add, r.skip) for b, kind, r in removable_branches(ctx.graph.structure.blocks)
                         if kind == "mlp"])

    def instrument_passes(self) -> list[VitPass]:
        return [InsertScalesPass(self.branches)]

    def setup(self, gm: fx.GraphModule) -> None:
        self.scales = {b: gm.get_submodule(f"{ROOT}.b{b}") for b, _, _ in self.branches}

    def hard_drop(self) -> int:
        if int(self.dropped) >= 0:
            return int(self.dropped)
        return min(self.scales, key=lambda b: abs(float(self.scales[b].scale.detach())))

    def apply(self, mode: str) -> None:
        hard = mode == "eval" or self.frozen
        for b, s in self.scales.items():
            s.on, s.drop = mode != "open", hard and b == self.hard_drop()

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"arch:toy": [s.scale for s in self.scales.values()]}

    def optim_defaults(self, search_steps: int) -> dict[str, dict[str, Any]]:
        return {"arch:toy": {"lr": 0.05, "weight_decay": 0.0, "schedule": "constant", "optimizer": "adamw"}}

    @property
    def frozen(self) -> bool:
        return int(self.dropped) >= 0

    def freeze(self, pricer: Any, run: Any) -> None:
        self.dropped.fill_(self.hard_drop())

    def factors(self, mode: str) -> dict[str, Any]:
        return {branch_factor(self.hard_drop(), "mlp"): 0.0} if mode in ("eval", "floor") or self.frozen else {}

    def decisions(self) -> dict[str, Any]:
        return {"dropped": self.hard_drop()}

    def materialize_passes(self) -> list[VitPass]:
        return [FoldScalesPass({self.hard_drop()})]

    def report(self) -> dict[str, Any]:
        return {"toy": {"dropped": self.hard_drop()}}


def _tiny() -> vg.VitGraph:
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, num_classes=10,
                          embed_dim=32, depth=3, num_heads=2).eval()
    return vg.trace(m, torch.randn(2, 1, 16, 16))


def test_an_axis_defined_in_tests_alone_runs_instrument_fit_materialize():
    from vitgraph.train.data import load_data
    from vitgraph.train.loop import fit

    g = _tiny()
    x = g.example_inputs[0]
    spec = Spec.from_dict({"budget": {"flops": 0.9}, "width": {"heads": False, "mlp": False},
                           "train": {"steps": 6, "search": 0.5, "batch_size": 32}})
    gated = instrument(g, spec, axes=[ScaleAxis])
    assert list(gated.axes) == ["toy"] and gated.gm.code.count(f"self.{ROOT}.b") == 3
    with torch.no_grad():
        assert torch.equal(gated.set_mode("open")(x), g.gm(x))
    assert gated.pricer("full") == pytest.approx(1.0) and not gated.frozen

    fit(gated.set_mode("train"), load_data("digits", (1, 16, 16), 32).train, spec.train, teacher=g.gm, progress=False)
    toy = gated.axes["toy"]
    assert gated.frozen and int(toy.dropped) >= 0
    assert any(float(s.scale) != 1.0 for s in toy.scales.values())  # the scales were trained (arch:toy)

    compact = materialize(gated)
    with torch.no_grad():
        expected = gated.set_mode("eval")(x)
        assert (compact(x) - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max()))
    fc2 = [n for n in compact.graph.nodes if n.op == "call_module" and str(n.target).endswith("mlp.fc2")]
    assert ROOT not in compact.code and len(fc2) == 2
    # its decision shows in the budget: the pricer prices the dropped branch, as the compact graph costs
    flops = vg.trace(compact, g.example_inputs).structure.flops
    assert gated.cost()["fraction"] < 0.95
    assert flops == pytest.approx(gated.cost()["flops"], rel=1e-9) == flop_counter_flops(compact, (x,), 2)


def test_a_cost_term_adds_what_the_dense_graph_lacks():
    g = _tiny()
    tokens, dim = g.structure.tokens.tokens, g.structure.tokens.embed_dim
    adapter = nn.Linear(dim, dim, bias=False)
    measured = flop_counter_flops(adapter, (torch.randn(1, tokens, dim),), 1)
    assert measured == 2 * tokens * dim * dim  # the formula a cost term would use, checked against the counter

    class Adapter(Axis):
        name = "adapter"

        def factors(self, mode: str) -> dict[str, Any]:
            return {} if mode == "full" else {"adapter.on": 1.0}  # a factor no dense node carries

        def cost_terms(self, factors: dict[str, Any]) -> dict[str, Any]:
            return {"adapter": measured} if factors else {}

    ctx = AxisContext(g, Spec.from_dict({}))
    from vitgraph.cost.budget import Pricer

    pricer = Pricer(g, [Adapter(ctx)])
    assert pricer("eval") == pytest.approx(1.0 + measured / g.structure.flops) and pricer("full") == 1.0


def test_one_budget_term_serves_every_learned_axis():
    g = _tiny()
    both = instrument(g, Spec.from_dict({"width": {"method": "wdpruning"}, "depth": {"skip_blocks": True},
                                         "train": {"steps": 10}}))
    groups = both.param_groups()
    assert both.budget is not None and both.budget.form == "augmented" and groups["dual"] == [both.budget.duals]
    assert "arch:blocks" in groups and "arch" in groups
    uvc = instrument(g, Spec.from_dict({"width": {"method": "uvc"}, "depth": {"skip_blocks": True},
                                        "train": {"steps": 10}}))
    assert uvc.budget.form == "linear" and any(p is uvc.budget.duals for p in uvc.param_groups()["dual"])
    one_shot = instrument(g, Spec.from_dict({"width": {"method": "magnitude"}}))
    assert one_shot.budget is None and one_shot.frozen


def test_pass_manager_checks_roles_and_cost(monkeypatch):
    import copy

    import vitgraph.passes.manager as manager

    g = _tiny()
    bare = copy.deepcopy(g.gm)  # the same graph without the analysis's roles
    for n in bare.graph.nodes:
        n.meta.pop(ROLE, None)
    with pytest.raises(PreconditionError, match="no node has role 'mlp.fc2'.*vg.trace"):
        InsertScalesPass([]).requires(bare)

    passes = [InsertScalesPass([(0, g.structure.blocks[0].residuals[-1].add,
                                 g.structure.blocks[0].residuals[-1].skip)])]
    gm = PassManager(g.example_inputs, check_cost=True).run(copy.deepcopy(g.gm), passes)
    assert "toy_scales_b0" in gm.code
    monkeypatch.setattr(manager, "node_flops", lambda node, gm: 0)  # a cost model that forgets every node
    with pytest.raises(PostconditionError, match="InsertScalesPass: the cost model prices"):
        PassManager(g.example_inputs, check_cost=True).run(copy.deepcopy(g.gm), passes)


def test_the_core_names_no_axis():
    """GatedModel, the pricer, the budget and the loop loop over axes: no axis name in their code."""
    root = Path(__file__).resolve().parents[1] / "vitgraph"
    for module in ("gated/model.py", "cost/budget.py", "train/loop.py", "train/state.py"):
        tree = ast.parse((root / module).read_text())
        names = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not names & {"width", "depth", "exits", "method", "exit_chosen", "gates"}, module
