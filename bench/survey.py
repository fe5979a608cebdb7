"""Which timm models does ``vg.compress`` take? A survey over every timm family with attention.

Each model (random weights, ``pretrained=False``, at its default input size: ``pretrained_cfg["input_size"]``)
goes through three one-shot specs: ``width`` (heads + MLP units by magnitude, 0.5 of the dense FLOPs),
``depth`` (whole blocks + width, 0.7) and ``tokens`` (attention-scored token dropping, 0.6; only where the
trace finds a token-prunable block, else ``n/a`` with the analysis's reason). A run that lands is checked
beyond what ``compress`` checks itself (gated vs compact parity): the saved ``model.pt2``, reloaded, matches
the compact module on a fresh input; the report's compressed FLOPs match ``FlopCounterMode`` on the compact
module within 1 %; the achieved FLOPs fraction is within +-0.03 of the budget. Each outcome is

* ``landed``  -- achieved fraction, seconds, peak RSS of the process;
* ``refused`` -- a ``VitgraphError`` with a message that names why (type and message kept);
* ``failed``  -- anything else: another exception, a check that does not hold, a crash, a timeout, a
  ``ParityError`` / ``PostconditionError`` (vitgraph's own checks catching itself), an error while saving.

Every (model, spec) runs in its own process with a timeout, and appends one JSON line to ``--out``; a
rerun skips what is there (resumable). The markdown table goes to ``--table`` (default bench/survey.md)::

    python bench/survey.py --list                                   # the model list (family order)
    python bench/survey.py --out /tmp/survey.jsonl                  # everything (hours on a CPU)
    python bench/survey.py --out /tmp/survey.jsonl --models deit_tiny_patch16_224,levit_128s --specs width
    python bench/survey.py --out /tmp/survey.jsonl --limit 10 --timeout 300
    python bench/survey.py --out /tmp/survey.jsonl --jobs 2 --threads 1         # two children at a time
    python bench/survey.py --out /tmp/survey.jsonl --table-only     # rewrite bench/survey.md from the jsonl
    python bench/survey.py --out /tmp/foreign.jsonl --table bench/foreign.md \
        --models tests/foreign.py:build_vit,tests/foreign.py:build_beit  # ViTs written elsewhere (file.py:fn)

The model list is :data:`FAMILIES`: per timm family with attention (in timm 1.0.x), its smallest variants at
a default input of at most 256 px (naflexvit, which has none smaller, at 384), plus variants that exercise
different code paths (distilled heads, registers, rope, relative positions, parallel blocks, hybrids). Names
the installed timm lacks are skipped (``--list`` says which).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

SPECS: dict[str, dict[str, Any]] = {
    "width": {"budget": {"flops": 0.5}, "width": {"method": "magnitude", "heads": True, "mlp": True}},
    "depth": {"budget": {"flops": 0.7}, "width": {"method": "magnitude", "heads": True, "mlp": True},
              "depth": {"skip_blocks": True}},
    "tokens": {"budget": {"flops": 0.6}, "tokens": {"method": "attention"}},
}
HEADERS = {"width": "width 0.5", "depth": "depth+width 0.7", "tokens": "tokens 0.6"}
BUDGET_TOL = 0.03     # achieved FLOPs fraction vs budget.flops
FLOPS_RTOL = 0.01     # report's compressed FLOPs vs FlopCounterMode on the compact module
PT2_ATOL = 1e-4       # reloaded .pt2 vs compact module, relative to the output's scale
# VitgraphErrors that are vitgraph catching its own bug, not a refusal of the model
BUG_ERRORS = ("ParityError", "PostconditionError")

# (family, timm names): smallest first, then variants with other code paths. Fixed order = table order.
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("test (timm's tiny test models)", ("test_vit", "test_vit2", "test_vit3", "test_vit4", "test_vit_relpos")),
    ("vit", ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_small_patch32_224", "vit_small_patch8_224",
             "vit_small_patch16_18x2_224", "vit_small_patch16_36x1_224", "vit_base_patch32_224")),
    ("vit (hybrid)", ("vit_tiny_r_s16_p8_224", "vit_small_r26_s32_224", "vit_small_resnet26d_224")),
    ("vit (registers, gap)", ("vit_wee_patch16_reg1_gap_256", "vit_pwee_patch16_reg1_gap_256",
                              "vit_dwee_patch16_reg1_gap_256", "vit_dpwee_patch16_reg1_gap_256",
                              "vit_little_patch16_reg1_gap_256", "vit_little_patch16_reg4_gap_256",
                              "vit_dlittle_patch16_reg1_gap_256", "vit_medium_patch16_reg4_gap_256",
                              "vit_betwixt_patch16_reg4_gap_256", "vit_medium_patch16_gap_240")),
    ("vit (rope)", ("vit_small_patch16_rope_224", "vit_small_patch16_rope_mixed_224",
                    "vit_small_patch16_rope_ape_224", "vit_medium_patch16_rope_reg1_gap_256")),
    ("vit (dinov3)", ("vit_small_patch16_dinov3", "vit_tiny_patch16_dinov3_qkvb")),
    ("vit (clip, siglip)", ("vit_medium_patch32_clip_224", "vit_base_patch32_clip_224",
                            "vit_base_patch32_siglip_256")),
    ("vit_relpos", ("vit_relpos_small_patch16_224", "vit_relpos_small_patch16_rpn_224",
                    "vit_relpos_medium_patch16_cls_224")),
    ("vit_srelpos", ("vit_srelpos_small_patch16_224",)),
    ("flexivit", ("flexivit_small",)),
    ("naflexvit", ("naflexvit_base_patch16_gap",)),
    ("deit", ("deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "deit_small_patch16_224",
              "deit_small_distilled_patch16_224")),
    ("deit3", ("deit3_small_patch16_224", "deit3_medium_patch16_224")),
    ("beit", ("beit_base_patch16_224",)),
    ("beitv2", ("beitv2_base_patch16_224",)),
    ("beit3", ("beit3_base_patch16_224",)),
    ("eva02", ("eva02_tiny_patch14_224", "eva02_small_patch14_224")),
    ("cait", ("cait_xxs24_224", "cait_xxs36_224")),
    ("xcit", ("xcit_nano_12_p16_224", "xcit_nano_12_p8_224", "xcit_tiny_12_p16_224", "xcit_tiny_24_p16_224")),
    ("samvit", ("samvit_base_patch16_224",)),
    ("swin", ("swin_tiny_patch4_window7_224", "swin_s3_tiny_224")),
    ("swinv2", ("swinv2_tiny_window8_256", "swinv2_tiny_window16_256")),
    ("swinv2_cr", ("swinv2_cr_tiny_224", "swinv2_cr_tiny_ns_224")),
    ("maxvit", ("test_maxvit", "maxvit_pico_rw_256", "maxvit_rmlp_pico_rw_256", "maxvit_nano_rw_256",
                "maxvit_tiny_tf_224")),
    ("maxxvit", ("maxxvit_rmlp_nano_rw_256", "maxxvitv2_nano_rw_256")),
    ("coatnet", ("test_coatnet", "coatnet_pico_rw_224", "coatnet_nano_rw_224", "coatnet_rmlp_nano_rw_224",
                 "coatnext_nano_rw_224")),
    ("coat", ("coat_lite_tiny", "coat_lite_mini", "coat_tiny")),
    ("crossvit", ("crossvit_tiny_240", "crossvit_9_240", "crossvit_9_dagger_240")),
    ("convit", ("convit_tiny", "convit_small")),
    ("pit", ("pit_ti_224", "pit_ti_distilled_224", "pit_xs_224")),
    ("levit", ("levit_128s", "levit_128", "levit_conv_128s")),
    ("mvitv2", ("mvitv2_tiny", "mvitv2_small_cls")),
    ("twins", ("twins_pcpvt_small", "twins_svt_small")),
    ("pvt_v2", ("pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2_li")),
    ("tnt", ("tnt_s_patch16_224",)),
    ("volo", ("volo_d1_224",)),
    ("nest", ("nest_tiny", "nest_tiny_jx")),
    ("efficientformer", ("efficientformer_l1",)),
    ("efficientformerv2", ("efficientformerv2_s0", "efficientformerv2_s1")),
    ("fastvit (attention stages)", ("fastvit_sa12", "fastvit_mci0")),
    ("hiera", ("hiera_tiny_224", "hiera_small_abswin_256", "hieradet_small")),
    ("davit", ("davit_tiny",)),
    ("gcvit", ("gcvit_xxtiny", "gcvit_xtiny")),
    ("nextvit", ("nextvit_small",)),
    ("mobilevit", ("mobilevit_xxs", "mobilevit_xs")),
    ("mobilevitv2", ("mobilevitv2_050",)),
    ("edgenext", ("edgenext_xx_small", "edgenext_x_small")),
    ("visformer", ("visformer_tiny",)),
    ("tiny_vit", ("tiny_vit_5m_224",)),
    ("vitamin", ("vitamin_small_224",)),
    ("efficientvit", ("efficientvit_m0", "efficientvit_b0")),
    ("shvit", ("shvit_s1",)),
    ("swiftformer", ("swiftformer_xs",)),
    ("iformer", ("iformer_t",)),
    ("lowformer", ("lowformer_b0",)),
    ("caformer", ("caformer_s18",)),
    ("attention in ResNets", ("botnet26t_256", "halonet26t", "lambda_resnet26rpt_256", "bat_resnext26ts")),
)


def survey_models(check: bool = True) -> tuple[list[str], list[str]]:
    """The survey's models in table order, and the names of :data:`FAMILIES` the installed timm lacks."""
    names = [name for _, members in FAMILIES for name in members]
    if not check:
        return names, []
    import timm

    known = set(timm.list_models())
    return [n for n in names if n in known], [n for n in names if n not in known]


# -- one (model, spec), in a child process -------------------------------------------------------

def _peak_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _message(exc: BaseException) -> str:
    return " ".join(str(exc).split())


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


def run_one(model_name: str, spec_name: str) -> dict[str, Any]:
    """Trace, compress, save, reload and cross-check one model under one spec; the outcome as a dict."""
    import torch

    import vitgraph as vg
    from vitgraph.analysis.cost import flop_counter_flops
    from vitgraph.errors import VitgraphError
    from vitgraph.frontend import max_abs_diff
    from vitgraph.targets import export

    spec = SPECS[spec_name]
    out: dict[str, Any] = {"model": model_name, "spec": spec_name, "budget": spec["budget"]["flops"]}
    stage = "create"
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        model, size = _create(model_name)
        out["input_size"] = list(size)
        x = torch.randn(2, *size)
        stage = "trace"
        g = vg.trace(model, (x,), name=model_name)
        info = g.to_dict()
        out["blocks"] = len(info["blocks"])
        if spec_name == "tokens" and not any(b["token_prunable"] for b in info["blocks"]):
            out.update(outcome="n/a", reason=_token_reason(info["blocks"]))
            return out
        stage = "compress"
        t1 = time.perf_counter()
        result = vg.compress(g, spec, data="none", progress=False, latency_targets=())
        out["seconds"] = round(time.perf_counter() - t1, 1)
        report = result.report
        achieved = float(report["budget"]["achieved"])
        out["achieved"] = round(achieved, 4)
        out["removed_blocks"] = len(report.get("depth", {}).get("removed_blocks") or [])
        failures = []
        if abs(achieved - spec["budget"]["flops"]) > BUDGET_TOL:
            failures.append(f"achieved {achieved:.3f} of the dense FLOPs, budget {spec['budget']['flops']} "
                            f"+- {BUDGET_TOL}")

        stage = "flops"
        compact = result.compact
        counted = flop_counter_flops(compact, (x[:1],), 1)
        reported = int(report["compressed"]["flops"])
        out["flops"] = {"report": reported, "counter": counted,
                        "dense_report": int(report["dense"]["flops"]),
                        "dense_counter": flop_counter_flops(g.gm, (x[:1],), 1)}
        rel = abs(reported - counted) / max(1, counted)
        if rel > FLOPS_RTOL:
            failures.append(f"report's compressed FLOPs {reported / 1e9:.4f} G vs FlopCounterMode "
                            f"{counted / 1e9:.4f} G on one image ({rel:.1%} apart)")

        stage = "save"
        with tempfile.TemporaryDirectory(prefix="survey-") as tmp:
            files = result.save(Path(tmp) / "out")
            stage = "reload"
            loaded = export.load(files["model.pt2"])
            fresh = torch.randn(3, *size, generator=torch.Generator().manual_seed(7))
            with torch.no_grad():
                expected = compact(fresh)
                err = max_abs_diff(loaded(fresh), expected)
            scale = max(1.0, max(float(t.abs().max()) for t in _tensors(expected)))
            out["pt2_max_abs_err"] = err
            if not err <= PT2_ATOL * scale:
                failures.append(f"reloaded model.pt2 differs from the compact module by {err:.2e} "
                                f"(allowed {PT2_ATOL:.0e} x scale {scale:.2f})")
        if failures:
            out.update(outcome="failed", stage="check", error="; ".join(failures))
        else:
            out["outcome"] = "landed"
    except VitgraphError as exc:
        kind = type(exc).__name__
        named = len(_message(exc)) >= 20 and not _message(exc).lower().startswith("internal error")
        bug = kind in BUG_ERRORS or stage in ("save", "reload", "flops")
        out.update(outcome="refused" if named and not bug else "failed", stage=stage, error_type=kind,
                   error=_message(exc))
        if out["outcome"] == "failed":
            out["where"] = _where(exc)
    except Exception as exc:  # noqa: BLE001 -- anything else is the survey's finding, not its crash
        out.update(outcome="failed", stage=stage, error_type=type(exc).__name__, error=_message(exc),
                   where=_where(exc))
    finally:
        out["total_seconds"] = round(time.perf_counter() - t0, 1)
        out["peak_mb"] = _peak_mb()
    return out


def _create(model_name: str) -> tuple[Any, tuple[int, ...]]:
    """A timm name at its default input size, or ``file.py:function`` (a model written elsewhere) at the size
    it was built for (3x32x32 when it does not say)."""
    import timm

    if ":" in model_name:
        from vitgraph.models import default_input_size, load_model
        model = load_model(model_name)
        return model, tuple(default_input_size(model) or (3, 32, 32))
    model = timm.create_model(model_name, pretrained=False).eval()
    return model, tuple(model.pretrained_cfg["input_size"])


def _tensors(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _where(exc: BaseException) -> str:
    """The innermost frame of the traceback, as ``file:line in function``."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}"


# -- the survey ----------------------------------------------------------------------------------

def run_child(model: str, spec: str, timeout: float, threads: int | None) -> dict[str, Any]:
    """``run_one`` in a fresh process; a crash, a kill or a timeout is a ``failed`` row."""
    with tempfile.NamedTemporaryFile(prefix="survey-", suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [sys.executable, __file__, "--child", model, spec, result_path]
    if threads:
        cmd.append(f"--threads={threads}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group: a timeout kills what it started too
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        Path(result_path).unlink(missing_ok=True)
        return {"model": model, "spec": spec, "outcome": "failed", "stage": "timeout",
                "error": f"timeout after {timeout:.0f} s", "total_seconds": round(time.perf_counter() - t0, 1)}
    try:
        text = Path(result_path).read_text()
        return json.loads(text)
    except (OSError, json.JSONDecodeError):
        code = proc.returncode
        why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        if code == -signal.SIGKILL:
            why += " (out of memory?)"
        tail = [line for line in (output or "").strip().splitlines() if line.strip()][-1:]
        return {"model": model, "spec": spec, "outcome": "failed", "stage": "crash",
                "error": why + (f": {tail[0].strip()}" if tail else ""),
                "total_seconds": round(time.perf_counter() - t0, 1)}
    finally:
        Path(result_path).unlink(missing_ok=True)


def read_rows(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Rows already in the jsonl, by (model, spec); a torn last line (a killed survey) is ignored."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[(row["model"], row["spec"])] = row
    return rows


def _short(text: str, n: int = 90) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    outcome = row["outcome"]
    if outcome == "landed":
        return f"landed {row['achieved']:.3f} ({row['seconds']:.0f} s)"
    if outcome == "n/a":
        return f"n/a: {_short(row['reason'])}"
    error = row.get("error", "")
    if outcome == "refused":
        return f"refused: {_short(row.get('error_type', '') + ': ' + error)}"
    prefix = f"{row['error_type']}: " if row.get("error_type") else ""
    return f"failed: {_short(prefix + error)}"


def table(rows: dict[tuple[str, str], dict[str, Any]], models: list[str], specs: list[str]) -> str:
    """The markdown table (models in list order, then any others in the jsonl) and the counts per spec."""
    listed = [m for m in models if any((m, s) in rows for s in specs)]
    extra = sorted({m for m, s in rows if s in specs} - set(listed))
    lines = ["# vitgraph compress survey over timm", "",
             "Generated by `python bench/survey.py` (random weights, default input size, one-shot). "
             "Cells: achieved FLOPs fraction and compress seconds; `refused` is a VitgraphError naming why; "
             "`failed` is a bug (an exception, a failed parity / FLOPs / .pt2 check, a crash or a timeout).", "",
             "| model | " + " | ".join(HEADERS[s] for s in specs) + " |",
             "|---" * (len(specs) + 1) + "|"]
    for m in listed + extra:
        lines.append(f"| {m} | " + " | ".join(cell(rows.get((m, s))) for s in specs) + " |")
    lines.append("")
    for s in specs:
        counts: dict[str, int] = {}
        for (m, spec), row in rows.items():
            if spec == s and m in listed + extra:
                counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
        parts = [f"{counts.get(k, 0)} {k}" for k in ("landed", "refused", "failed", "n/a")]
        lines.append(f"- **{HEADERS[s]}**: " + ", ".join(parts) + f" (of {sum(counts.values())})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/vitgraph-survey.jsonl", help="jsonl file, appended to (resumable)")
    parser.add_argument("--table", default=str(Path(__file__).with_name("survey.md")), help="markdown table")
    parser.add_argument("--models", help="comma-separated timm names (default: the whole list)")
    parser.add_argument("--limit", type=int, help="only the first N models of the list")
    parser.add_argument("--specs", default="width,depth,tokens", help="comma list of " + ",".join(SPECS))
    parser.add_argument("--timeout", type=float, default=600, help="seconds per (model, spec)")
    parser.add_argument("--threads", type=int, help="torch threads in each child (default: torch's)")
    parser.add_argument("--jobs", type=int, default=1, help="children at a time (e.g. --jobs 2 --threads 1)")
    parser.add_argument("--table-only", action="store_true", help="rewrite the table from --out, run nothing")
    parser.add_argument("--list", action="store_true", help="print the model list and exit")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        model, spec, result_path = args.child
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        row = run_one(model, spec)
        Path(result_path).write_text(json.dumps(row))
        return

    specs = [s for s in args.specs.split(",") if s]
    unknown = [s for s in specs if s not in SPECS]
    if unknown:
        parser.error(f"unknown spec(s) {unknown}; choose from {','.join(SPECS)}")
    models, missing = survey_models(check=not args.table_only)
    if args.list:
        for family, members in FAMILIES:
            print(f"{family}: {', '.join(m for m in members if m in models)}")
        print(f"{len(models)} models in {len(FAMILIES)} families"
              + (f"; not in this timm: {', '.join(missing)}" if missing else ""))
        return
    if args.models:
        models = [m for m in args.models.split(",") if m]
    if args.limit is not None:
        models = models[: args.limit]
    out = Path(args.out)
    if not args.table_only:
        done = read_rows(out)
        todo = [(m, s) for m in models for s in specs if (m, s) not in done]
        print(f"{len(todo)} runs to do ({len(models) * len(specs) - len(todo)} already in {out})", flush=True)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # threads only wait on the child processes
            runs = pool.map(lambda job: run_child(*job, args.timeout, args.threads), todo)
            for i, ((m, s), row) in enumerate(zip(todo, runs), 1):
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"[{i}/{len(todo)}] {m} / {s}: {cell(row)}", flush=True)
    rows = read_rows(out)
    foreign = [m for m in models if ":" in m]  # file.py:function models: a table of their own (--table)
    text = table(rows, foreign or survey_models(check=False)[0], list(SPECS))  # all columns, whatever ran
    Path(args.table).write_text(text)
    print(text.rsplit("\n\n", 1)[-1].strip())
    print(f"table: {args.table}")


if __name__ == "__main__":
    main()
