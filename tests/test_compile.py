"""`vitgraph compile`: the artifacts, the report.json contract, and the compiled folder as a MODEL."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vitgraph.cli.commands import main

TINY = ["deit_tiny_patch16_224", "--model-kwargs", "img_size=32,patch_size=8,depth=3,embed_dim=64,num_heads=4"]
ONE_SHOT = "budget: {flops: 0.5}\nwidth: {method: magnitude, heads: true, mlp: true}\n"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    (root / "spec.yaml").write_text(ONE_SHOT)
    out = root / "out"
    assert main(["compile", *TINY, "--spec", str(root / "spec.yaml"), "--data", "none", "--out", str(out),
                 "--quiet"]) == 0
    return out


def test_compile_writes_the_contract(compiled):
    assert {"model.pt2", "compact.pt", "spec.yaml", "report.json", "report.md", "kept.png"} <= {
        p.name for p in compiled.iterdir()}
    report = json.loads((compiled / "report.json").read_text())
    assert {"model", "spec", "dense", "compressed", "blocks", "parity", "latency_ms"} <= set(report)
    for side in ("dense", "compressed"):
        assert {"flops", "params", "top1"} <= set(report[side]) and report[side]["top1"] is None
    assert 0.47 <= report["compressed"]["flops"] / report["dense"]["flops"] <= 0.53
    assert report["parity"]["max_abs_err"] <= 1e-4
    assert report["spec"]["width"]["method"] == "magnitude"
    assert {"dense", "compressed"} <= set(report["latency_ms"]["eager"])
    for b in report["blocks"]:
        assert {"index", "attention", "mlp", "skippable", "token_prunable", "flops", "params"} <= set(b)
    assert sum(b["attention"]["heads"] for b in report["blocks"] if b["attention"]) < 3 * 4
    assert "| block | heads |" in (compiled / "report.md").read_text()


def test_pt2_runs_without_vitgraph_or_timm(compiled, tmp_path):
    code = ("import sys, torch; m = torch.export.load(sys.argv[1]).module(); "
            "y = m(torch.randn(5, 3, 32, 32)); assert y.shape == (5, 1000), y.shape; "
            "assert 'vitgraph' not in sys.modules and 'timm' not in sys.modules; print('ok')")
    run = subprocess.run([sys.executable, "-c", code, str(compiled / "model.pt2")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr


def test_compiled_folder_is_a_model_for_inspect_and_export(compiled, capsys, tmp_path):
    assert main(["inspect", str(compiled), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    report = json.loads((compiled / "report.json").read_text())
    assert data["flops"] == report["compressed"]["flops"]
    assert [b["attention"]["heads"] if b["attention"] else 0 for b in data["blocks"]] == [
        b["attention"]["heads"] if b["attention"] else 0 for b in report["blocks"]]
    assert main(["export", str(compiled), "--target", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert "max abs error" in capsys.readouterr().out


def test_compile_bad_spec_exits_2(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("width: {method: magnitude, hedas: true}\n")
    assert main(["compile", *TINY, "--spec", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "hedas" in capsys.readouterr().err
    (tmp_path / "s.yaml").write_text("train: {steps: 5}\n")
    assert main(["compile", *TINY, "--spec", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o"),
                 "--data", "imagefolder:/nonexistent"]) == 2


@pytest.mark.slow
def test_deit_small_half_flops_one_shot(tmp_path):
    """The issue's acceptance case: deit_small at 0.5 FLOPs, one-shot magnitude, parity <= 1e-4."""
    (tmp_path / "spec.yaml").write_text(ONE_SHOT)
    assert main(["compile", "deit_small_patch16_224", "--spec", str(tmp_path / "spec.yaml"), "--data", "none",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert 0.47 <= report["compressed"]["flops"] / report["dense"]["flops"] <= 0.53
    assert report["parity"]["max_abs_err"] <= 1e-4
