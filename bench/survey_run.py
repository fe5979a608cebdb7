"""The survey's runner (bench/survey.py): one model, every spec, in a child process.

A child creates the model, captures it once (``vg.trace``) and runs each spec on that graph: ``vg.compress``
one-shot, then the checks ``compress`` does not do itself -- the achieved FLOPs fraction within
:data:`BUDGET_TOL` of the budget, the report's compressed FLOPs within :data:`FLOPS_RTOL` of
``FlopCounterMode`` on the compact module, and the saved ``model.pt2`` reloaded equal to the compact module.
Each (model, spec) is one row: ``landed``, ``refused`` (a ``VitgraphError`` naming why), ``n/a`` (tokens where
no block can drop them, with the analysis's reason) or ``failed`` (anything else). A crash or a timeout of the
child fails every spec it had not written.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from survey_models import SPECS

BUDGET_TOL = 0.03     # achieved FLOPs fraction vs budget.flops
FLOPS_RTOL = 0.01     # report's compressed FLOPs vs FlopCounterMode on the compact module
PT2_ATOL = 1e-4       # reloaded .pt2 vs compact module, relative to the output's scale
# VitgraphErrors that are vitgraph catching its own bug, not a refusal of the model
BUG_ERRORS = ("ParityError", "PostconditionError")


def _peak_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _message(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _where(exc: BaseException) -> str:
    """The innermost frame of the traceback, as ``file:line in function``."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""


def _token_reason(blocks: list[dict[str, Any]]) -> str:
    """Why no block is token-prunable: the analysis's reasons, most frequent first."""
    counts: dict[str, int] = {}
    for b in blocks:
        reason = b.get("token_reason") or "no reason given"
        counts[reason] = counts.get(reason, 0) + 1
    if not counts:
        return "the trace found no blocks"
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    return "; ".join(f"{r} ({n} blocks)" if n > 1 else r for r, n in ranked[:2])


def _create(model_name: str) -> tuple[Any, tuple[int, ...]]:
    """A timm name at its default input size, or ``file.py:function`` (a model written elsewhere) at the size
    it was built for (3x32x32 when it does not say)."""
    import timm

    if ":" in model_name:
        from vitgraph.capture.models import default_input_size, load_model
        model = load_model(model_name)
        return model, tuple(default_input_size(model) or (3, 32, 32))
    model = timm.create_model(model_name, pretrained=False).eval()
    return model, tuple(model.pretrained_cfg["input_size"])


def _checks(g: Any, result: Any, spec: dict[str, Any], x: Any, out: dict[str, Any]) -> list[str]:
    """The budget, FLOPs against FlopCounterMode and the reloaded .pt2; what does not hold, in words."""
    import torch

    from vitgraph.analysis.cost import flop_counter_flops
    from vitgraph.capture.frontend import flat_tensors, max_abs_diff
    from vitgraph.targets import export

    report, compact, failures = result.report, result.compact, []
    achieved = float(report["budget"]["achieved"])
    out["achieved"] = round(achieved, 4)
    out["removed_blocks"] = len(report.get("depth", {}).get("removed_blocks") or [])
    if abs(achieved - spec["budget"]["flops"]) > BUDGET_TOL:
        failures.append(f"achieved {achieved:.3f} of the dense FLOPs, budget {spec['budget']['flops']} +- {BUDGET_TOL}")
    out["stage"] = "flops"
    counted, reported = flop_counter_flops(compact, (x[:1],), 1), int(report["compressed"]["flops"])
    out["flops"] = {"report": reported, "counter": counted, "dense_report": int(report["dense"]["flops"]),
                    "dense_counter": flop_counter_flops(g.gm, (x[:1],), 1)}
    if abs(reported - counted) > FLOPS_RTOL * max(1, counted):
        failures.append(f"report's compressed FLOPs {reported / 1e9:.4f} G vs FlopCounterMode {counted / 1e9:.4f} G "
                        f"on one image ({abs(reported - counted) / max(1, counted):.1%} apart)")
    out["stage"] = "save"
    with tempfile.TemporaryDirectory(prefix="survey-") as tmp:
        files = result.save(Path(tmp) / "out")
        out["stage"] = "reload"
        loaded = export.load(files["model.pt2"])
        fresh = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            expected = compact(fresh)
            err = max_abs_diff(loaded(fresh), expected)
    scale = max(1.0, max(float(t.abs().max()) for t in flat_tensors(expected)))
    out["pt2_max_abs_err"] = err
    if not err <= PT2_ATOL * scale:
        failures.append(f"reloaded model.pt2 differs from the compact module by {err:.2e} "
                        f"(allowed {PT2_ATOL:.0e} x scale {scale:.2f})")
    return failures


def _outcome(exc: BaseException, stage: str) -> dict[str, Any]:
    """A refusal (a VitgraphError that names why) or a failure (anything else, or vitgraph catching itself)."""
    from vitgraph.errors import VitgraphError

    kind, message = type(exc).__name__, _message(exc)
    refused = (isinstance(exc, VitgraphError) and len(message) >= 20 and not message.lower().startswith("internal error")
               and kind not in BUG_ERRORS and stage not in ("save", "reload", "flops"))
    row = {"outcome": "refused" if refused else "failed", "stage": stage, "error_type": kind, "error": message}
    if not refused:
        row["where"] = _where(exc)
    return row


def run_spec(g: Any, info: dict[str, Any], model_name: str, spec_name: str, x: Any) -> dict[str, Any]:
    """One spec on the captured graph ``g``: compress, check, the row."""
    import vitgraph as vg

    spec = SPECS[spec_name]
    out: dict[str, Any] = {"model": model_name, "spec": spec_name, "budget": spec["budget"]["flops"],
                           "input_size": list(x.shape[1:]), "blocks": len(info["blocks"])}
    t0 = time.perf_counter()
    if spec_name == "tokens" and not any(b["token_prunable"] for b in info["blocks"]):
        return {**out, "outcome": "n/a", "reason": _token_reason(info["blocks"])}
    out["stage"] = "compress"
    try:
        result = vg.compress(g, spec, data="none", progress=False, latency_targets=())
        out["seconds"] = round(time.perf_counter() - t0, 1)
        failures = _checks(g, result, spec, x, out)
        out.update({"outcome": "failed", "stage": "check", "error": "; ".join(failures)} if failures
                   else {"outcome": "landed"})
        if not failures:
            out.pop("stage")
    except Exception as exc:  # noqa: BLE001 -- anything is the survey's finding, not its crash
        out.update(_outcome(exc, out["stage"]))
    out["total_seconds"] = round(time.perf_counter() - t0, 1)
    out["peak_mb"] = _peak_mb()
    return out


def run_model(model_name: str, specs: list[str], write: Any) -> None:
    """Create and capture ``model_name`` once, then every spec; ``write(row)`` as each finishes."""
    import torch

    import vitgraph as vg

    t0, stage = time.perf_counter(), "create"
    try:
        torch.manual_seed(0)
        model, size = _create(model_name)
        x = torch.randn(2, *size)
        stage = "trace"
        g = vg.trace(model, (x,), name=model_name)
        info = g.to_dict()
    except Exception as exc:  # noqa: BLE001
        for spec in specs:
            write({"model": model_name, "spec": spec, "budget": SPECS[spec]["budget"]["flops"], **_outcome(exc, stage),
                   "total_seconds": round(time.perf_counter() - t0, 1), "peak_mb": _peak_mb()})
        return
    capture = round(time.perf_counter() - t0, 1)
    for spec in specs:
        write({**run_spec(g, info, model_name, spec, x), "capture_seconds": capture})


def run_child(script: str, model: str, specs: list[str], timeout: float, threads: int | None
              ) -> list[dict[str, Any]]:
    """``run_model`` in a fresh process (``script --child``); a crash, a kill or a timeout fails the specs it
    had not written."""
    with tempfile.NamedTemporaryFile(prefix="survey-", suffix=".jsonl", delete=False) as f:
        result_path = Path(f.name)
    cmd = [sys.executable, script, "--child", model, ",".join(specs), str(result_path)]
    if threads:
        cmd.append(f"--threads={threads}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group: a timeout kills what it started too
    why = None
    try:
        output, _ = proc.communicate(timeout=timeout * len(specs))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        why = ("timeout", f"timeout after {timeout * len(specs):.0f} s for {len(specs)} spec(s)")
    rows = [json.loads(line) for line in result_path.read_text().splitlines() if line.strip()]
    result_path.unlink(missing_ok=True)
    if why is None and len(rows) < len(specs):
        code = proc.returncode
        tail = [line for line in (output or "").strip().splitlines() if line.strip()][-1:]
        why = ("crash", (f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}")
               + (" (out of memory?)" if code == -signal.SIGKILL else "") + (f": {tail[0].strip()}" if tail else ""))
    done = {r["spec"] for r in rows}
    return rows + [{"model": model, "spec": s, "outcome": "failed", "stage": why[0], "error": why[1],
                    "total_seconds": round(time.perf_counter() - t0, 1)} for s in specs if s not in done and why]
