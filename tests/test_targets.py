"""Lowering targets on tiny randomly initialised timm models: parity, dynamic batch, portability, timing."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
import timm
import torch
from torch import nn

from vitgraph.errors import ParityError, VitgraphError
from vitgraph.targets import LoweringError, LoweringReport, bench
from vitgraph.targets import compile as compile_target
from vitgraph.targets import export as export_target
from vitgraph.targets import onnx as onnx_target
from vitgraph.capture.frontend import max_abs_diff, trace_module


@pytest.fixture(scope="module")
def vit() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(eager tiny ViT, its fx trace, a batch-1 example)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2,
                              num_heads=2, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    return model, trace_module(model, (x,)), x


def test_onnx_parity_and_dynamic_batch(vit, tmp_path):
    _, gm, x = vit
    path = tmp_path / "vit.onnx"
    report = onnx_target.lower(gm, (x,), path)
    assert isinstance(report, LoweringReport) and report.target == "onnx"
    assert set(report.per_batch) == {1, 3}
    assert report.max_abs_err <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["vit.onnx"]  # self-contained: no external data file
    axes = onnx_target.batch_axes(path)
    assert len(axes) == 1 and all(isinstance(a, str) and a for a in axes.values()), axes
    # The session helper runs any batch size, torch or numpy inputs alike.
    sess = onnx_target.session(path, threads=1)
    x5 = torch.randn(5, 3, 32, 32)
    (out,) = onnx_target.run(sess, x5)
    assert out.shape == (5, 10)
    with torch.inference_mode():
        assert max_abs_diff(torch.from_numpy(out), gm(x5)) <= 1e-4
    assert onnx_target.run(sess, x5.numpy())[0].shape == (5, 10)


class _DriftsWhenExported(nn.Module):
    """Eager output is the wrapped model's; the exported graph adds a constant offset."""

    def __init__(self, inner: nn.Module, offset: float) -> None:
        super().__init__()
        self.inner, self.offset = inner, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return y + self.offset if torch.compiler.is_exporting() else y


def test_onnx_parity_violation_raises(vit, tmp_path):
    _, gm, x = vit
    drifting = _DriftsWhenExported(gm, 1e-3).eval()
    with pytest.raises(ParityError) as info:
        onnx_target.lower(drifting, (x,), tmp_path / "drift.onnx", check_batches=(2,), name="drifting-vit")
    msg = str(info.value)
    assert "drifting-vit" in msg and "onnx" in msg and "atol=0.0001" in msg and "0.001" in msg
    # The measured error is the real one: a looser tolerance accepts the same lowering.
    report = onnx_target.lower(drifting, (x,), tmp_path / "drift.onnx", check_batches=(2,), atol=1e-2)
    assert report.max_abs_err == pytest.approx(1e-3, rel=1e-2)


_FAMILIES = {  # num_classes=0 where the head is initialised near zero: features make a stronger check
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=4, window_size=4, embed_dim=32,
                                                  depths=(1, 1), num_heads=(1, 2), num_classes=10), 32),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=14, embed_dim=64, depth=2, num_heads=2,
                                             num_classes=0), 28),
    # Relative-position bias through SDPA's attn_mask: failed in the exporter before the SDPA math pin.
    "beit": ("beit_base_patch16_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2,
                                           num_classes=0), 32),
}


@pytest.mark.parametrize("family", list(_FAMILIES))
def test_onnx_parity_other_families(family, tmp_path):
    torch.manual_seed(0)
    arch, kwargs, size = _FAMILIES[family]
    model = timm.create_model(arch, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    gm = trace_module(model, (x,))
    report = onnx_target.lower(gm, (x,), tmp_path / f"{family}.onnx", name=family)
    assert report.max_abs_err <= 1e-4, report
    assert all(isinstance(a, str) for a in onnx_target.batch_axes(tmp_path / f"{family}.onnx").values())


class _Eig(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvals(x @ x.transpose(-1, -2)).real


def test_onnx_exporter_failure_names_the_op(tmp_path):
    with pytest.raises(LoweringError) as info:
        onnx_target.lower(_Eig().eval(), (torch.randn(2, 4, 4),), tmp_path / "eig.onnx")
    assert "linalg_eig" in str(info.value) and "_Eig" in str(info.value)


class _BatchIsTwo(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.ones(2, 4)  # broadcasting ties the batch size to 2


def test_specialised_batch_axis_is_reported(tmp_path):
    x = torch.randn(2, 4)
    with pytest.raises(LoweringError, match="batch axis of _BatchIsTwo was specialised"):
        with pytest.warns(UserWarning, match="training mode"):  # nn.Module's default; harmless here
            onnx_target.lower(_BatchIsTwo(), (x,), tmp_path / "b.onnx")
    with pytest.raises(LoweringError, match="specialized it to be a constant"):
        export_target.lower(_BatchIsTwo().eval(), (x,), tmp_path / "b.pt2")


def test_bad_inputs_are_vitgraph_errors(vit, tmp_path):
    model, gm, x = vit
    with pytest.raises(VitgraphError, match="non-empty tuple"):
        onnx_target.lower(gm, (), tmp_path / "a.onnx")
    with pytest.raises(VitgraphError, match="same non-zero batch"):
        export_target.lower(gm, (x, torch.randn(2, 3)), tmp_path / "a.pt2")
    with pytest.raises(VitgraphError, match="no ONNX file"):
        onnx_target.session(tmp_path / "missing.onnx")


def test_compile_parity(vit):
    _, gm, x = vit
    x2 = torch.randn(2, 3, 32, 32)
    fn, report = compile_target.lower_with_report(gm, (x2,), dynamic=False)
    assert report.target == "compile" and report.path is None and report.max_abs_err <= 1e-4
    with torch.inference_mode():
        assert max_abs_diff(fn(x2), gm(x2)) <= 1e-4
    with pytest.raises(ParityError, match="torch.compile"):
        compile_target.lower(_DriftsWhenCompiled(gm).eval(), (x2,), backend="eager")


class _DriftsWhenCompiled(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return y + 1.0 if torch.compiler.is_compiling() else y


_FRESH = textwrap.dedent("""
    import sys, torch
    x, expected = torch.load(sys.argv[2])
    module = torch.export.load(sys.argv[1]).module()
    with torch.inference_mode():
        err = float((module(x) - expected).abs().max())
    leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('timm', 'vitgraph'))
    print(err, leaked)
    assert not leaked, leaked
""")


def test_pt2_runs_in_fresh_process_without_vitgraph(vit, tmp_path):
    model, gm, x = vit
    path = tmp_path / "vit.pt2"
    report = export_target.lower(gm, (x,), path)
    assert report.target == "export" and report.max_abs_err <= 1e-4 and set(report.per_batch) == {1, 3}
    with torch.inference_mode():
        assert max_abs_diff(export_target.load(path)(x), model(x)) <= 1e-4
    x4 = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        torch.save((x4, model(x4)), tmp_path / "io.pt")
    # -I: isolated mode, no PYTHONPATH, no cwd on sys.path; the child imports torch only.
    proc = subprocess.run([sys.executable, "-I", "-c", _FRESH, str(path), str(tmp_path / "io.pt")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    err, leaked = proc.stdout.split(maxsplit=1)
    assert float(err) <= 1e-4 and leaked.strip() == "[]"


def test_measure_interleaves_and_orders():
    calls: list[str] = []

    def runner(name: str, seconds: float):
        def go() -> None:
            calls.append(name)
            time.sleep(seconds)
        return go

    timings = bench.measure({"fast": runner("fast", 0.001), "slow": runner("slow", 0.004)}, warmup=2, repeats=7)
    assert {t.n for t in timings.values()} == {7}
    assert len(calls) == 2 * 9
    assert all(set(calls[i:i + 2]) == {"fast", "slow"} for i in range(0, len(calls), 2))  # one of each per round
    assert calls[0] != calls[2]  # the starting runner rotates
    fast, slow = timings["fast"], timings["slow"]
    assert 1.0 <= fast.median_ms < slow.median_ms and slow.median_ms >= 4.0
    assert fast.p25_ms <= fast.median_ms <= fast.p75_ms and fast.iqr_ms >= 0
    with pytest.raises(VitgraphError):
        bench.measure({})


def test_measure_steady_drops_rounds_in_a_load_burst(monkeypatch):
    """Rounds where the reference runs over 10 % above its best are not counted: a burst that slows the
    compact runner 1.6x and the reference 1.25x (measured here on INT8 vs fp32 ONNX Runtime) leaves the
    ratio alone; without ``steady`` the median of 10 rounds, 6 of them in the burst, is off."""
    from vitgraph.targets import _timing

    clock = [0.0]
    monkeypatch.setattr(_timing.time, "perf_counter", lambda: clock[0])
    rounds = {"dense": 0, "compact": 0}

    def runner(name: str, quiet_ms: float, burst_ms: float):
        def go() -> None:
            burst = 2 <= rounds[name] < 8  # the 3rd to 8th calls (after 2 warm-up rounds: timed rounds 1-6)
            clock[0] += (burst_ms if burst else quiet_ms) / 1e3
            rounds[name] += 1
        return go

    def ratio(**kw):
        rounds.update(dense=0, compact=0)
        t = bench.measure({"dense": runner("dense", 50, 62.5), "compact": runner("compact", 14, 22.4)},
                          warmup=2, repeats=10, **kw)
        return t["compact"].median_ms / t["dense"].median_ms, t["dense"].n

    steady, n = ratio(steady="dense")
    assert steady == pytest.approx(14 / 50) and n == 10  # 16 rounds timed, the 6 in the burst dropped
    assert ratio()[0] == pytest.approx(22.4 / 62.5)  # the burst's ratio, 28 % off
    with pytest.raises(VitgraphError, match="steady"):
        bench.measure({"a": runner("dense", 1, 1)}, steady="b")


def test_bench_runners_eager_and_onnx(vit, tmp_path):
    _, gm, x = vit
    runs = bench.runners(gm, (x,), batch=2, targets=("eager", "onnx"), workdir=tmp_path)
    assert set(runs) == {"eager", "onnx"} and (tmp_path / "VisionTransformer.onnx").is_file()
    assert max_abs_diff(torch.from_numpy(runs["onnx"]()[0]), runs["eager"]()) <= 1e-4
    timings = bench.measure(runs, warmup=1, repeats=3)
    assert all(t.n == 3 and t.median_ms > 0 for t in timings.values())


def test_verify_runs_the_lowered_model_without_autograd():
    """A reloaded .pt2 holds parameters that require grad; run with autograd on, its activations stayed
    alive (a 1024-px SAM encoder was killed for memory while its .pt2 was checked)."""
    from vitgraph.targets._common import verify

    seen = []
    module = torch.nn.Linear(4, 2).eval()

    def lowered(x: torch.Tensor) -> torch.Tensor:
        seen.append(torch.is_grad_enabled())
        return module(x)
    verify(module, {1: (torch.randn(1, 4),), 3: (torch.randn(3, 4),)}, lowered, target="test", name="linear",
           atol=1e-6)
    assert seen == [False, False]
