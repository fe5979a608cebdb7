"""INT8 deployment (``vitgraph.targets.int8``, ``export --target onnx-int8``, ``compile --quantize int8``): the
files ONNX Runtime runs, what stays fp32 read from the quantized graph, agreement measured and enforced,
bad requests exit 2 with the reason and the fix."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch

from vitgraph.cli.commands import main
from vitgraph.errors import ParityError
from vitgraph.targets import int8
from vitgraph.targets import onnx as onnx_target

TINY = ["deit_tiny_patch16_224", "--model-kwargs", "img_size=32,patch_size=8,depth=2,embed_dim=64,num_heads=2"]
CONTRACT = {"mode", "calibration", "fp32_ops", "top1", "agreement", "max_abs_err", "latency_ms", "bytes"}


def tiny_vit() -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2,
                             num_heads=2, num_classes=10).eval()


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> Path:
    """A tiny ViT's fp32 ONNX file: 2 blocks, each with 4 weight products and 2 attention products."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("int8") / "tiny.onnx"
    onnx_target.lower(tiny_vit(), (torch.randn(1, 3, 32, 32),), path, check_batches=(1,))
    return path


def _ops(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _batches(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(n)]


def test_dynamic_measures_plans_and_runs(fp32, tmp_path):
    out = tmp_path / "dyn.onnx"
    rep = int8.quantize(fp32, out, mode="dynamic")
    assert set(rep.plans_ms) == {p.name for p in int8.PLANS} and rep.plan in rep.plans_ms
    assert all(ms > 0 for ms in rep.plans_ms.values())
    assert rep.mode == "dynamic" and rep.calibration is None and rep.quantized_nodes > 0
    assert _ops(out)["MatMulInteger"] > 0 or _ops(out)["DynamicQuantizeMatMul"] > 0
    assert {"LayerNormalization", "Gelu"} <= set(rep.fp32_ops)  # ORT cannot quantize them dynamically
    assert ("MultiHeadAttention" if rep.plan == "products+mha" else "Softmax") in rep.fp32_ops
    assert rep.bytes["int8"] < 0.5 * rep.bytes["fp32"]
    (logits,) = onnx_target.run(onnx_target.session(out, threads=1), torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 10)
    int8.check(rep, fp32, None, repeats=3)
    assert rep.agreement >= 0.9 and rep.checked_on.startswith("random inputs") and rep.top1["fp32"] is None
    assert 0 < rep.max_abs_err < 0.5 and set(rep.latency_ms) == {"fp32", "int8"}


def test_fp32_ops_are_read_from_the_graph(fp32, tmp_path):
    products = int8.quantize(fp32, tmp_path / "a.onnx", plan="products")
    attention = int8.quantize(fp32, tmp_path / "b.onnx", plan="products+attention")
    matmuls = _ops(fp32)["MatMul"]
    # products leaves the attention products (q@k, attn@v: 2 per block) in fp32; the wider plan does not
    assert products.fp32_nodes["MatMul"] == 4 and "MatMul" not in attention.fp32_nodes
    assert attention.quantized_nodes == products.quantized_nodes + 4 and products.plans_ms == {}
    kept = int8.quantize(fp32, tmp_path / "c.onnx", keep_fp32=("MatMul",))
    assert kept.fp32_nodes["MatMul"] == matmuls and kept.plan == "keep:MatMul"
    assert kept.quantized_nodes == 1 and "Conv" not in kept.fp32_nodes  # the patch Conv only
    assert kept.fp32_nodes["Gemm"] == 1  # the head: dynamic mode rewrites it as a float MatMul + Add


def test_static_qdq_calibrates_and_reports_top1(fp32, tmp_path):
    out = tmp_path / "static.onnx"
    data = _batches()
    rep = int8.quantize(fp32, out, mode="static", calibration=_batches(seed=1), method="percentile",
                        plan="products", tolerance=0.9)  # random weights, random images: near-ties flip
    ops = _ops(out)
    assert rep.mode == "static" and rep.calibration == "percentile"
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    int8.check(rep, fp32, data, repeats=3)
    assert rep.agreement >= 0.9 and rep.checked_on == "validation data (64 images)"
    assert set(rep.top1) == {"fp32", "int8"} and all(0 <= v <= 1 for v in rep.top1.values())


def test_bad_requests_raise_with_the_fix(fp32, tmp_path):
    from vitgraph.errors import SpecError

    with pytest.raises(SpecError, match="pass --data digits"):
        int8.quantize(fp32, tmp_path / "x.onnx", mode="static")
    with pytest.raises(SpecError, match="unknown quantization mode 'int4'"):
        int8.quantize(fp32, tmp_path / "x.onnx", mode="int4")
    with pytest.raises(SpecError, match="unknown calibration method"):
        int8.Int8Config(method="mse")
    assert not (tmp_path / "x.onnx").exists()


TIED = """
import timm, torch

def build():
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                          num_classes=10)
    with torch.no_grad():  # every class sees almost the same logit: int8 noise decides the top-1
        m.head.weight.copy_(m.head.weight[:1].expand(10, -1) + 1e-6 * torch.randn(10, 64))
        m.head.bias.zero_()
    return m.eval()

def pool():
    return Pool().eval()

class Pool(torch.nn.Module):  # nothing ORT can quantize: no MatMul, Gemm or Conv
    def forward(self, x):
        return x.mean((2, 3)).repeat(1, 4)[:, :10] * 2.0
"""


def test_export_exit_2_below_agreement_and_unquantizable(tmp_path, capsys):
    models = tmp_path / "models.py"
    models.write_text(TIED)
    out = tmp_path / "tied.onnx"
    assert issubclass(int8.AgreementError, ParityError)  # a VitgraphError: the CLI's exit 2
    assert main(["export", f"{models}:build", "--input-size", "3,32,32", "--target", "onnx-int8", "--data", "digits",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "of validation data" in err and "below the tolerance 97.0 %" in err
    assert "not written" in err and not out.exists()
    assert main(["export", f"{models}:pool", "--input-size", "3,32,32", "--target", "onnx-int8",
                 "--out", str(out)]) == 2
    assert "quantized no node" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("argv, needle", [
    (["export", *TINY, "--target", "onnx-int8", "--out", "x.onnx", "--int8-mode", "static"], "pass --data digits"),
    (["export", *TINY, "--target", "onnx-int8", "--out", "x.onnx", "--int8-mode", "int4"], "unknown quantization mode"),
    (["compile", *TINY, "--spec", "examples/specs/magnitude.yaml", "--out", "o", "--quantize", "int4"],
     "unknown target 'int4'"),
    (["compile", *TINY, "--spec", "examples/specs/magnitude.yaml", "--out", "o", "--quantize", "int8",
      "--int8-mode", "static"], "pass --data digits"),
])
def test_cli_bad_input_exits_2(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    spec = Path(__file__).resolve().parents[1] / "examples/specs/magnitude.yaml"
    argv = [str(spec) if a.endswith("magnitude.yaml") else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # failed before writing anything


def test_compile_quantize_writes_model_and_report(tmp_path, capsys):
    spec = Path(__file__).resolve().parents[1] / "examples/specs/magnitude.yaml"
    out = tmp_path / "run"
    assert main(["compile", *TINY, "--spec", str(spec), "--out", str(out), "--quantize", "int8", "--quiet"]) == 0
    assert "onnx-int8 ->" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())["int8"]
    assert CONTRACT <= set(report) and report["mode"] == "dynamic" and report["calibration"] is None
    assert report["top1"] == {"fp32": None, "int8": None} and report["checked_on"].startswith("random inputs")
    assert report["judged"] >= 0.97 and report["agreement"] >= 0.9 and report["fp32_ops"]
    assert report["bytes"]["int8"] < report["bytes"]["fp32"]
    sess = onnx_target.session(out / "model.int8.onnx", threads=1)
    assert onnx_target.run(sess, np.zeros((2, 3, 32, 32), np.float32))[0].shape == (2, 1000)
    assert not out.with_name("run.partial").exists()
    assert "INT8 (`model.int8.onnx`, dynamic" in (out / "report.md").read_text()


def test_export_static_with_data_reports_top1(tmp_path, capsys):
    out = tmp_path / "m.int8.onnx"
    assert main(["export", *TINY, "--target", "onnx-int8", "--out", str(out), "--data", "digits",
                 "--calibration", "entropy", "--int8-tolerance", "0.5"]) == 0  # random weights: near-ties
    text = capsys.readouterr().out
    assert "static (entropy calibration)" in text and "on validation data (359 images)" in text
    assert "top-1 fp32" in text and out.is_file() and _ops(out)["QuantizeLinear"] > 0


def test_bench_times_onnx_int8(capsys):
    assert main(["bench", *TINY, "--batch", "1", "--targets", "onnx,onnx-int8", "--repeats", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["target"] for r in rows} == {"onnx", "onnx-int8"} and all(r["median_ms"] > 0 for r in rows)
