"""Latency budgets: the table's features and fit, the pricer on latency, measured feedback, bad input."""
from __future__ import annotations

import json

import pytest
import timm
import torch

from vitgraph.cost import profile as prof
from vitgraph.gated import builder
from vitgraph.cli.commands import main
from vitgraph.errors import SpecError
from vitgraph.gated import instrument, materialize
from vitgraph.analysis.graph import trace
from vitgraph.cost.latency import FEATURES, LatencyTable, elem_table, features, ops_table
from vitgraph.pipeline import compress
from vitgraph.spec import Spec

TINY = ["deit_tiny_patch16_224", "--model-kwargs", "img_size=32,patch_size=8,depth=4,embed_dim=64,num_heads=4"]


@pytest.fixture(scope="module")
def g():
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=4)
    return trace(m.eval(), (torch.randn(2, 3, 32, 32),), name="tiny")


def _table(g, coef=None, samples=None) -> LatencyTable:
    return LatencyTable(model=g.name, input_size=list(g.input_size), target="eager", batch=1, threads=1,
                        machine="test", dense_flops=g.structure.flops, dense_ms=1.0,
                        coef=coef or {"const": 0.1, "ops": 0.01, "gemm": 1e-8, "elem": 1e-6}, samples=samples or [])


def _total(table) -> float:
    return sum(v for _, v in table)


@pytest.mark.parametrize("spec", [
    {"budget": {"flops": 0.6, "tolerance": 0.1}, "width": {"heads": True, "mlp": True, "embed": True}},
    {"budget": {"flops": 0.6, "tolerance": 0.1}, "width": {"heads": True, "mlp": True},
     "depth": {"skip_blocks": True}},
])
def test_features_of_decisions_equal_the_compact_graph(g, spec):
    """Under hard decisions the priced features are the compact graph's own: its FLOPs, its ops, the
    elements its ops write (the table's factor assignment is right, not just self-consistent)."""
    gated = instrument(g, Spec.from_dict(spec))
    compact = trace(materialize(gated), g.example_inputs, name="compact")
    got = features(g, list(gated.axes.values()))
    assert got["gemm"] == pytest.approx(compact.structure.flops, rel=1e-6)
    assert got["ops"] == pytest.approx(_total(ops_table(compact, {})), abs=1e-3)
    assert got["elem"] == pytest.approx(_total(elem_table(compact, {})), rel=0.02)
    assert got["gemm"] < features(g, [])["gemm"]


def test_pricer_on_latency_is_the_table_at_the_hard_decisions(g):
    """The latency pricer (one table over the factors) == the coefficients applied to the features."""
    gated = instrument(g, Spec.from_dict({"budget": {"flops": 0.55, "tolerance": 0.1},
                                          "width": {"heads": True, "mlp": True}, "depth": {"skip_blocks": True}}))
    table = _table(g)
    axes = list(gated.axes.values())
    ms = table.predict_ms(features(g, axes))
    assert float(table.pricer(g, axes)("eval")) == pytest.approx(ms / table.predict_ms(features(g, [])), rel=1e-6)
    assert float(table.pricer(g, [])("eval")) == pytest.approx(1.0)


def test_fit_recovers_known_coefficients():
    truth = {"const": 0.5, "ops": 0.02, "gemm": 3e-9, "elem": 0.0}
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(10):
        f = {"const": 1.0, "ops": float(100 + 20 * torch.rand(1, generator=gen)),
             "gemm": float(1e9 * (0.3 + torch.rand(1, generator=gen))), "elem": float(1e6 * torch.rand(1, generator=gen))}
        rows.append({"label": str(i), "features": f, "ms": sum(truth[k] * f[k] for k in FEATURES)})
    dense = rows[0]["ms"]
    samples = [{"label": r["label"], "features": r["features"], "ratio": r["ms"] / dense} for r in rows]
    coef = LatencyTable.fit_coef(samples, dense)
    for k in FEATURES:
        assert coef[k] >= 0 and coef[k] == pytest.approx(truth[k], rel=1e-3, abs=1e-12)


def test_table_file_round_trip_and_refusals(g, tmp_path):
    path = _table(g).save(tmp_path / "t.json")
    assert LatencyTable.load(path) == _table(g)
    with pytest.raises(SpecError, match="batch 16"):
        LatencyTable.load(path).check(g, "eager", 16)
    other = _table(g)
    other.model = "vit_base_patch16_224"
    with pytest.raises(SpecError, match="vit_base_patch16_224.*vitgraph profile"):
        other.check(g, "eager", 1)
    (tmp_path / "bad.json").write_text(json.dumps({"coef": {}}))
    with pytest.raises(SpecError, match="not a version-1"):
        LatencyTable.load(tmp_path / "bad.json")


def test_latency_spec_keys():
    s = Spec.from_dict({"budget": {"latency": 0.6}})
    assert s.budget.flops is None and s.budget.metric == "latency" and s.budget.fraction == 0.6
    assert Spec.from_dict({"preset": "uvc", "budget": {"latency": 0.6}}).budget.flops is None
    both = Spec.from_dict({"budget": {"latency": 0.6, "flops": 0.5}})
    assert both.budget.flops == 0.5 and both.budget.slack == 0.05
    for bad, key in [({"latency": 1.5}, "budget.latency"), ({"latency": 0.0}, "budget.latency"),
                     ({"latency": 0.5, "target": "tensorrt"}, "budget.target"), ({"latency": 0.5, "batch": 0},
                                                                                 "budget.batch")]:
        with pytest.raises(SpecError, match=key):
            Spec.from_dict({"budget": bad})


def _land(g, monkeypatch, goal: float, measured: list[float]) -> tuple[list[float], dict]:
    """``prof.land`` on a fake build whose compact models measure ``measured`` in turn: the aims it compiled
    at after the first, and its report."""
    spec = Spec.from_dict({"budget": {"latency": goal, "rounds": 2}, "width": {"heads": True, "mlp": True}})
    ratios = iter(measured)
    monkeypatch.setattr(prof, "_runner", lambda *a, **k: (lambda: None))
    monkeypatch.setattr(prof, "measure_ratio", lambda d, c, r=0: (next(ratios), 10.0, 1.0))
    aims = []

    class Fake:
        pricer = staticmethod(lambda mode="eval": goal)

    def build(aimed):
        aims.append(aimed.budget.latency)
        return Fake(), None
    _, _, report = prof.land(g, spec, build, Fake(), None, progress=False)
    return aims, report


def test_land_interpolates_once_the_goal_is_bracketed(g, monkeypatch):
    """Measured on deit_small onnx-int8 (aim 0.3 -> 0.378, rescaled aim 0.238 -> 0.184): a third round that
    rescales again overshoots back to 0.369; between the two bracketing aims it lands."""
    aims, report = _land(g, monkeypatch, 0.3, [0.378, 0.184, 0.29])
    first = 0.3 * 0.3 / 0.378
    assert aims == pytest.approx([first, first + (0.3 - 0.184) / (0.378 - 0.184) * (0.3 - first)], abs=1e-4)
    assert report["within"] and [r["aim"] for r in report["rounds"]] == [0.3, round(first, 4), round(aims[1], 4)]


def test_land_corrects_by_the_measured_error(g, monkeypatch):
    """A measurement that misses the target moves the next compile's aim by the measured error."""
    aims, report = _land(g, monkeypatch, 0.6, [0.70, 0.62])
    assert aims == [pytest.approx(0.6 * 0.6 / 0.70)]
    assert report["adjusted"] and report["within"] and report["measured"] == 0.62 and len(report["rounds"]) == 2


def _noiseless(table: LatencyTable, dense: float) -> None:
    """Re-measure ``table``'s samples by a rule without noise and refit: the dense model at ``dense`` of the
    reference, each sample 0.2 of that plus 0.8 in proportion to its matrix-product work."""
    dense_gemm = table.samples[0]["features"]["gemm"]
    for s in table.samples:
        s["ratio"] = dense * (0.2 + 0.8 * s["features"]["gemm"] / dense_gemm)
    table.coef = LatencyTable.fit_coef(table.samples, table.dense_ms)


def test_compress_on_a_latency_budget_measures_it(g, tmp_path):
    """End to end on eager: the table from a short profile, the pricer lands on the aim, the report says
    predicted and measured (tiny models on eager time Python overhead: no assertion on the measured ratio)."""
    table = prof.profile(g, "eager", 1, builder(g), samples=4, repeats=3, progress=False)
    assert table.samples[0]["label"] == "dense" and table.samples[0]["ratio"] == 1.0 and len(table.samples) == 5
    # a tiny model's eager ratios are Python-overhead noise (a 4-sample fit on a busy machine was once all
    # constant term, floor 0.962): the compile prices on the same samples re-measured by a noiseless rule
    _noiseless(table, dense=1.0)
    path = table.save(tmp_path / "table.json")
    spec = {"budget": {"latency": 0.8, "target": "eager", "table": str(path), "rounds": 1},
            "width": {"heads": True, "mlp": True}}
    result = compress(g, spec, latency_targets=())
    lat = result.report["budget"]["latency"]
    assert {"target", "predicted", "measured", "rounds", "within", "dense_ms", "compressed_ms"} <= set(lat)
    assert abs(lat["rounds"][-1]["predicted"] - lat["rounds"][-1]["aim"]) <= 0.1  # 4 heads: coarse steps
    assert result.report["budget"]["metric"] == "latency" and 1 <= len(lat["rounds"]) <= 2


@pytest.mark.parametrize("budget, needle", [
    ({"latency": 1.5}, "budget.latency must be a fraction"),
    ({"latency": 0.5, "target": "tpu"}, "budget.target 'tpu'"),
    ({"latency": 0.5, "target": "eager", "table": "TABLE"}, "measured for another setting"),
    ({"latency": 0.5, "target": "eager", "table": "/no/such/table.json"}, "does not exist"),
])
def test_latency_bad_input_exits_2(budget, needle, tmp_path, capsys, g):
    other = _table(g)
    other.model = "another_model"
    budget = {k: (str(other.save(tmp_path / "other.json")) if v == "TABLE" else v) for k, v in budget.items()}
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({"budget": budget, "width": {"heads": True}}))
    assert main(["compile", *TINY, "--spec", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_profile_cli(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["profile", *TINY, "--target", "eager", "--batch", "1", "--samples", "3", "--repeats", "2",
                 "--quiet", "--out", str(out)]) == 0
    table = LatencyTable.load(out)
    assert table.target == "eager" and table.batch == 1 and len(table.samples) == 4
    assert "median error" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["profile", *TINY, "--target", "tpu"])
    assert e.value.code == 2


def test_a_quantized_table_prices_against_the_dense_fp32_model(g):
    """On onnx-int8 the dense row is the INT8 gain (its measured ratio to dense fp32): open decisions price at
    that ratio, not 1, and every price scales with it (budget.latency 0.3 is 0.3 of dense fp32)."""
    dense = features(g, [])
    fp32 = _table(g, samples=[{"label": "dense", "features": dense, "ratio": 1.0}])
    int8 = _table(g, samples=[{"label": "dense", "features": dense, "ratio": 0.5}])
    int8.target = "onnx-int8"
    spec = Spec.from_dict({"budget": {"flops": 0.6, "tolerance": 0.1}, "width": {"heads": True, "mlp": True}})
    gated = instrument(g, spec)
    axes = list(gated.axes.values())
    for mode in ("full", "eval"):
        assert float(int8.pricer(g, axes)(mode)) == pytest.approx(0.5 * float(fp32.pricer(g, axes)(mode)))
    assert float(int8.pricer(g, [])("eval")) == pytest.approx(0.5)
    assert int8.predict_ratio(dense) == pytest.approx(0.5) and int8.errors() == [pytest.approx(0.0)]


def test_land_on_int8_times_the_dense_model_in_fp32(g, monkeypatch):
    """The measured-feedback check holds the INT8 compact model to the dense model on fp32 ONNX Runtime."""
    timed = []
    monkeypatch.setattr(prof, "_runner", lambda module, g, target, batch, *a: timed.append(target) or (lambda: 0))
    monkeypatch.setattr(prof, "measure_ratio", lambda d, c, r=0: (0.31, 10.0, 3.1))
    spec = Spec.from_dict({"budget": {"latency": 0.3, "target": "onnx-int8"}, "width": {"heads": True}})

    class Fake:
        pricer = staticmethod(lambda mode="eval": 0.3)
    _, _, report = prof.land(g, spec, lambda s: (Fake(), None), Fake(), None, progress=False)
    assert timed == ["onnx", "onnx-int8"]
    assert report["runtime"] == "onnx-int8" and report["reference"] == "onnx" and report["within"]


def g_of(cli_model):
    """The graph the CLI builds for ``TINY`` (name, kwargs): what its tables are checked against."""
    kwargs = dict(kv.split("=") for kv in cli_model[2].split(","))
    torch.manual_seed(0)
    return trace(timm.create_model(cli_model[0], **{k: int(v) for k, v in kwargs.items()}).eval(),
                 (torch.randn(1, 3, 32, 32),), name=cli_model[0])


def test_profile_and_compile_on_int8(tmp_path, capsys):
    """`profile --target onnx-int8` measures the dense INT8 gain first; a latency budget on it lands, is
    reported against dense fp32, and writes the dynamic INT8 file it was measured on."""
    table = tmp_path / "t.json"
    assert main(["profile", *TINY, "--target", "onnx-int8", "--batch", "1", "--samples", "3", "--repeats", "2",
                 "--quiet", "--out", str(table)]) == 0
    loaded = LatencyTable.load(table)
    assert loaded.target == "onnx-int8" and loaded.samples[0]["label"] == "dense" and len(loaded.samples) == 4
    assert loaded.dense_ratio() == loaded.samples[0]["ratio"] != 1.0
    out = capsys.readouterr().out
    assert "of dense fp32 onnx" in out
    assert ("INT8 to pay" in out) == (loaded.dense_ratio() >= 0.9)
    # This 0.5-ms model's INT8 ratios are timing noise around 1 (quantizing costs what its tiny products save),
    # so the compile below runs on the same samples re-measured by a noiseless rule: INT8 dense at 0.5 of fp32,
    # the rest in proportion to the matrix-product work. What is checked is the plumbing, not this model's gain.
    _noiseless(loaded, dense=0.5)
    loaded.save(table)
    width = {"heads": True, "mlp": True}
    tiny = g_of(TINY)
    axes = list(instrument(tiny, Spec.from_dict({"width": width})).axes.values())
    cut = float(loaded.pricer(tiny, axes)())  # a one-shot cut (the default FLOPs budget's) on this table
    assert 0 < cut < loaded.dense_ratio() == 0.5
    aim = round((cut + 0.5) / 2, 3)  # between a reachable cut and dense INT8: reachable
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({"budget": {"latency": aim, "target": "onnx-int8", "table": str(table),
                                           "rounds": 0}, "width": width}))
    assert main(["compile", *TINY, "--spec", str(spec), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    lat = report["budget"]["latency"]
    assert lat["runtime"] == "onnx-int8" and lat["reference"] == "onnx" and report["int8"]["mode"] == "dynamic"
    assert abs(lat["predicted"] - aim) <= 0.05 and lat["target"] == aim  # priced on the table it was given
    assert (tmp_path / "out" / "model.int8.onnx").is_file()


def test_int8_table_cache_follows_the_plans(g, monkeypatch):
    """A cached onnx-int8 table was measured on what the INT8 plans made of the model: other plans, other key."""
    from vitgraph.targets import int8

    before, fp32 = prof.cache_path(g, "onnx-int8", 1), prof.cache_path(g, "onnx", 1)
    monkeypatch.setattr(int8, "PLANS", int8.PLANS[:1])
    assert prof.cache_path(g, "onnx-int8", 1) != before
    assert prof.cache_path(g, "onnx", 1) == fp32  # fp32 tables do not depend on them
