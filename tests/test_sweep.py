"""`vitgraph sweep`: every point recorded (ok on its budget, or refused with the reason), resume skips
finished points, sweep.md and sweep.png written, bad input refused naming the flag."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

import vitgraph.cli.commands
from vitgraph import pipeline
from vitgraph.errors import SpecError
from vitgraph.spec import Spec
from vitgraph.cli.sweep import axis_spec, parse_budgets, register

TINY = ["deit_tiny_patch16_224", "--model-kwargs", "img_size=32,patch_size=8,depth=2,embed_dim=64,num_heads=2"]
SPEC = "budget: {flops: 0.5}\nwidth: {method: magnitude, heads: true, mlp: true, align: 8}\n"


def sweep(*argv: str) -> int:
    """``vitgraph sweep ...`` through a parser that has only the sweep subcommand."""
    p = argparse.ArgumentParser(prog="vitgraph")
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["sweep", *argv])
    return args.func(args)


def _argv(spec: Path, out: Path, budgets: str = "0.6:0.8:0.2", axes: str = "width,depth") -> list[str]:
    return [*TINY, "--spec", str(spec), "--budgets", budgets, "--axes", axes, "--data", "none",
            "--targets", "eager", "--out", str(out), "--quiet"]


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "spec.yaml"
    path.write_text(SPEC)
    return path


@pytest.fixture(scope="module")
def swept(spec_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    assert sweep(*_argv(spec_file, out)) == 0
    return out


@pytest.fixture
def counted(monkeypatch) -> list[str]:
    """Each call of ``pipeline.compress`` appends its spec's budget."""
    calls: list[str] = []
    real = pipeline.compress

    def compress(g, spec, **kw):
        calls.append(spec.budget.flops)
        return real(g, spec, **kw)
    monkeypatch.setattr(pipeline, "compress", compress)
    return calls


def test_every_point_recorded_on_its_budget(swept):
    doc = json.loads((swept / "sweep.json").read_text())
    assert {"model", "spec", "budget_kind", "targets", "batch", "points"} <= set(doc)
    assert doc["budget_kind"] == "flops" and doc["targets"] == ["eager"] and doc["batch"] == 1
    assert [(p["axes"], p["budget"]) for p in doc["points"]] == [
        ("width", 0.6), ("width", 0.8), ("depth", 0.6), ("depth", 0.8)]
    for p in doc["points"]:
        if p["axes"] == "width":
            assert p["status"] == "ok"
        if p["status"] == "ok":
            assert abs(p["flops"] - p["budget"]) <= 0.03
            assert p["params"]["compressed"] < p["params"]["dense"]
            assert p["top1"] == {"dense": None, "compressed": None}  # --data none
            lat = p["latency"]["eager"]
            assert lat["dense_ms"] > 0 and lat["compressed_ms"] > 0 and lat["batch"] == 1
            assert lat["ratio"] == pytest.approx(lat["compressed_ms"] / lat["dense_ms"], abs=1e-3)
        else:
            assert p["flops"] is None and p["latency"] == {}
    # two blocks: skipping whole blocks reaches neither 0.6 nor 0.8 of the FLOPs; refused, not a crash
    depth = [p for p in doc["points"] if p["axes"] == "depth"]
    assert [p["status"] for p in depth] == ["refused", "refused"]
    assert all("depth alone" in p["reason"] for p in depth)


def test_table_and_plot_written(swept):
    md = (swept / "sweep.md").read_text()
    assert "| axes | budget (flops) | FLOPs | latency eager | top-1 | status |" in md
    assert md.count("| width |") == 2 and md.count("| depth |") == 2 and "## Refused" in md
    assert (swept / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_skips_finished_points(swept, spec_file, tmp_path, counted):
    out = tmp_path / "again"
    shutil.copytree(swept, out)
    before = json.loads((out / "sweep.json").read_text())["points"]
    assert sweep(*_argv(spec_file, out)) == 0
    assert counted == []
    assert sweep(*_argv(spec_file, out, budgets="0.7:0.8:0.1")) == 0  # 0.8 done, 0.7 new on both axis sets
    assert counted == [0.7, 0.7]
    after = json.loads((out / "sweep.json").read_text())["points"]
    assert after[:4] == before and [(p["axes"], p["budget"]) for p in after[4:]] == [("width", 0.7), ("depth", 0.7)]


def test_resume_into_another_sweep_refused(swept, tmp_path, spec_file):
    out = tmp_path / "again"
    shutil.copytree(swept, out)
    other = tmp_path / "other.yaml"
    other.write_text(SPEC.replace("align: 8", "align: 16"))
    with pytest.raises(SpecError, match="sweep.json holds another sweep .*spec.*new --out or delete"):
        sweep(*_argv(other, out))


def test_conv_refused_without_training(spec_file, tmp_path, counted):
    assert sweep(*_argv(spec_file, tmp_path / "conv", budgets="0.6:0.6:0.1", axes="conv")) == 0
    (point,) = json.loads((tmp_path / "conv" / "sweep.json").read_text())["points"]
    assert point["status"] == "refused" and "train.steps > 0" in point["reason"] and counted == []


def test_axis_sets_narrow_the_spec():
    base = Spec.from_dict({"budget": {"flops": 0.5}, "width": {"method": "taylor", "head_dim": True},
                           "depth": {"skip_blocks": True}, "tokens": {"stages": [1], "keep": [0.5]}})
    width = axis_spec(base, "width", 0.7)
    assert width.budget.flops == 0.7 and width.width == base.width
    assert not width.depth.skip_blocks and not width.tokens.on and not width.attention.to_conv
    depth = axis_spec(base, "depth", 0.7)
    assert depth.depth.skip_blocks and not depth.width.enabled and not depth.tokens.on
    tokens = axis_spec(base, "tokens", 0.7)
    assert tokens.tokens.on and tokens.tokens.method == "attention" and tokens.tokens.stages == (1,)
    assert tokens.tokens.keep == ()  # alone, the budget sets the ratios
    with_tokens = Spec.from_dict({"width": {"heads": False}, "tokens": {"method": "attention", "keep": [0.5]}})
    assert axis_spec(with_tokens, "width", 0.7).width.heads  # off only for the selectors
    assert not tokens.width.enabled and not tokens.depth.skip_blocks
    assert axis_spec(base, "all", 0.7) == Spec.from_dict({**base.to_dict(), "budget": {"flops": 0.7}})
    no_width = Spec.from_dict({"depth": {"skip_blocks": True}, "width": {"heads": False, "mlp": False}})
    assert axis_spec(no_width, "width", 0.7).width.method == "magnitude"
    assert axis_spec(no_width, "width", 0.7).width.heads and axis_spec(no_width, "width", 0.7).width.mlp
    trained = Spec.from_dict({"train": {"steps": 10}})
    conv = axis_spec(trained, "conv", 0.7)
    assert conv.attention.to_conv and conv.width.method == "spvit" and not conv.width.heads and conv.width.mlp
    latency = Spec.from_dict({"budget": {"latency": 0.5}})
    assert axis_spec(latency, "width", 0.7).budget.latency == 0.7 and axis_spec(latency, "width", 0.7).budget.flops is None


def test_budget_grid_includes_its_end():
    assert parse_budgets("0.6:0.8:0.2") == [0.6, 0.8]
    assert parse_budgets("0.5:0.9:0.1") == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert parse_budgets("0.3:0.3:0.1") == [0.3]


BAD = [
    (["--budgets", "0.6-0.8"], "--budgets"),
    (["--budgets", "0.8:0.6:0.1"], "--budgets"),
    (["--budgets", "0.6:0.8:0"], "--budgets"),
    (["--budgets", "0:0.5:0.1"], "--budgets"),
    (["--budgets", "0.5:1.2:0.1"], "--budgets"),
    (["--axes", "width,speed"], "--axes"),
    (["--out", "FILE"], "--out"),
]


def _bad_argv(flags: list[str], spec_file: Path, tmp_path: Path) -> list[str]:
    (tmp_path / "file").write_text("x")
    argv = _argv(spec_file, tmp_path / "out")
    for flag, value in zip(flags[::2], flags[1::2]):
        argv[argv.index(flag) + 1] = str(tmp_path / "file") if value == "FILE" else value
    return argv


@pytest.mark.parametrize("flags, needle", BAD)
def test_bad_input_names_the_flag(flags, needle, spec_file, tmp_path):
    with pytest.raises(SpecError, match=needle):
        sweep(*_bad_argv(flags, spec_file, tmp_path))
    assert not (tmp_path / "out").exists()


@pytest.fixture
def cli_with_sweep(monkeypatch) -> None:
    """``vitgraph.cli.commands.build_parser`` with the sweep subcommand, until cli.py registers it itself."""
    build = vitgraph.cli.commands.build_parser

    def with_sweep() -> argparse.ArgumentParser:
        p = build()
        subs = p._subparsers._group_actions[0]
        if "sweep" not in subs.choices:
            register(subs)
        return p
    monkeypatch.setattr(vitgraph.cli.commands, "build_parser", with_sweep)


@pytest.mark.parametrize("flags, needle", BAD[:1] + BAD[-2:])
def test_cli_exits_2(flags, needle, spec_file, tmp_path, capsys, cli_with_sweep):
    assert vitgraph.cli.commands.main(["sweep", *_bad_argv(flags, spec_file, tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"vitgraph sweep: error: {needle}" in err and "Traceback" not in err and err.count("\n") == 1
