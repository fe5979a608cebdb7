"""Human-readable views of a compile report: ``report.md`` and ``kept.png`` (drawn by
``vitgraph.report.plot``). A VitGraph's own table and drawing are ``vitgraph.analysis.summary``.

The report views read ``report.json`` as written by any version: every key beyond the contract's may be
absent, and an axis is shown only where the report has it."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from vitgraph.report.kept import AXIS_NAMES, KIND_LABELS, KeptBlock, Pair, embed_kept, kept_blocks, report_axes


def _num(v: Any, fmt: str = ".3f", scale: float = 1.0) -> str:
    """``v / scale`` formatted, or "-" for a missing (None, absent, non-numeric) value."""
    return format(v / scale, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _budget_lines(report: dict) -> list[str]:
    """FLOPs and latency budgets side by side: target, what the table predicted, what the compact model has."""
    b = report.get("budget") or {}
    flops = b["flops"] if "flops" in b else (b.get("target") if b.get("metric", "flops") == "flops" else None)
    tol = b.get("tolerance")
    target = "none" if flops is None else _num(flops, ".2f") + (f" ± {_num(tol, '.2f')}" if tol is not None else "")
    lines = ["| budget (fraction of dense) | target | predicted | achieved |", "|---|---|---|---|",
             f"| FLOPs | {target} | - | **{_num(b.get('achieved'))}** |"]
    lat = b.get("latency")
    if isinstance(lat, dict):
        ms = (f" ({_num(lat.get('dense_ms'), '.2f')} → {_num(lat.get('compressed_ms'), '.2f')} ms)"
              if lat.get("dense_ms") is not None else "")
        where = ", ".join(str(x) for x in (lat.get("runtime"), f"batch {lat['batch']}" if "batch" in lat else None)
                          if x is not None)
        lines.append(f"| latency{f' ({where})' if where else ''} | {_num(lat.get('target'), '.2f')} ± "
                     f"{_num(lat.get('tolerance'), '.2f')} | {_num(lat.get('predicted'))} | "
                     f"**{_num(lat.get('measured'))}**{ms} |")
    lines.append("")
    lines += _latency_notes(lat) if isinstance(lat, dict) else []
    if b.get("per_image"):
        lines += [f"FLOPs: {b['per_image']}.", ""]
    parity = (report.get("parity") or {}).get("max_abs_err")
    lines += [f"Parity (compact vs gated graph, max abs error): {_num(parity, '.1e')}.", ""]
    return lines


def _latency_notes(lat: dict) -> list[str]:
    """Whether the measured latency landed, and the measured rounds when the decisions were re-aimed."""
    lines = []
    if "within" in lat:
        lines.append(f"Measured latency is {'within' if lat['within'] else '**outside**'} the target"
                     + (f", after re-aiming the decisions over {len(lat.get('rounds') or [])} measured rounds."
                        if lat.get("adjusted") else "."))
    rounds = lat.get("rounds") or []
    if len(rounds) > 1:
        lines += ["", "| round | aimed at | predicted | measured |", "|---|---|---|---|"]
        lines += [f"| {i} | {_num(r.get('aim'))} | {_num(r.get('predicted'))} | {_num(r.get('measured'))} |"
                  for i, r in enumerate(rounds, 1)]
    return lines + [""] if lines else []


def _unit(v: Any, at: float, big: str, big_scale: float, small: str, small_scale: float) -> tuple[str, float]:
    """The unit a column of numbers like ``v`` reads best in: ``big`` from ``at`` up, else ``small``."""
    return (big, big_scale) if not isinstance(v, (int, float)) or v >= at else (small, small_scale)


def _summary_lines(report: dict) -> list[str]:
    """Dense and compressed side by side: FLOPs, params, top-1 and each runtime's latency."""
    dense, comp = report.get("dense") or {}, report.get("compressed") or {}
    lat = {t: v for t, v in (report.get("latency_ms") or {}).items() if isinstance(v, dict)}

    def top1(v: Any) -> str:
        return "-" if v is None else _num(v, ".2f", 0.01) + " %"

    def ratio(a: Any, b: Any) -> str:
        return _num(a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None)

    fu, fs = _unit(dense.get("flops"), 1e8, "G", 1e9, "M", 1e6)
    pu, ps = _unit(dense.get("params"), 1e5, "M", 1e6, "K", 1e3)
    heads = "".join(f" {t} ms" + (f" (batch {v['batch']})" if "batch" in v else "") + " |" for t, v in lat.items())
    lines = [f"| | FLOPs ({fu}) | params ({pu}) | top-1 |" + heads, "|---|---|---|---|" + "---|" * len(lat)]
    for label, row in (("dense", dense), ("compressed", comp)):
        ms = "".join(f" {_num(v.get(label), '.2f')} |" for v in lat.values())
        lines.append(f"| {label} | {_num(row.get('flops'), '.3f', fs)} | {_num(row.get('params'), '.2f', ps)} | "
                     f"{top1(row.get('top1'))} |{ms}")
    ms = "".join(f" {ratio(v.get('compressed'), v.get('dense'))} |" for v in lat.values())
    lines.append(f"| compressed / dense | {ratio(comp.get('flops'), dense.get('flops'))} | "
                 f"{ratio(comp.get('params'), dense.get('params'))} | |{ms}")
    return lines + [""]


def _cell(pair: Pair | None, removed: bool) -> str:
    return "removed" if removed else "-" if pair is None else f"{pair[0]} / {pair[1]}"


def _tokens_cell(r: KeptBlock) -> str:
    if r.removed or r.tokens_in is None:
        return _cell(r.tokens_in, r.removed)
    if r.tokens_out is None or (r.tokens_in == r.tokens_out):
        return _cell(r.tokens_in, False)
    return f"{r.tokens_in[0]} → {r.tokens_out[0]} / {r.tokens_in[1]} → {r.tokens_out[1]}"


def _kind_cell(r: KeptBlock) -> str:
    if r.removed:
        return "removed"
    kind = KIND_LABELS.get(r.kind or "", r.kind or "-")
    return kind if r.kind == r.dense_kind else f"**{kind}** (was {r.dense_kind or '-'})"


def _block_table(rows: list[KeptBlock], axes: list[str], dense_flops: Any) -> list[str]:
    """One row per dense block: kept / dense per axis the report has (heads and MLP hidden always)."""
    unit, scale = _unit(dense_flops, 1e8, "G", 1e9, "M", 1e6)
    cols: list[tuple[str, Any]] = [("heads", lambda r: _cell(r.heads, r.removed))]
    if "head_dim" in axes:
        cols.append(("value dims / head", lambda r: _cell(r.v_dims, r.removed)))
    cols.append(("MLP hidden", lambda r: _cell(r.mlp, r.removed)))
    if "attention" in axes:
        cols.append(("attention", _kind_cell))
    if "tokens" in axes:
        cols.append(("tokens", _tokens_cell))
    cols.append((f"{unit}FLOPs", lambda r: "0" if r.removed else _num(r.flops, ".3f", scale)))
    lines = ["| block | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {r.name} | " + " | ".join(f(r) for _, f in cols) + " |" for r in rows]
    return lines + [""]


def _axis_notes(report: dict) -> list[str]:
    """Stream-wide and per-axis facts the per-block table has no column for."""
    lines = []
    embed = embed_kept(report)
    if embed:
        lines.append(f"Embedding channels (the residual stream, every block): {embed[0]} / {embed[1]} kept "
                     f"({embed[0] / embed[1]:.2f}).")
    tok = report.get("tokens") or {}
    if tok.get("kept_tokens"):
        kept = ", ".join(f"{v} kept before `{k}`" for k, v in tok["kept_tokens"].items())
        lines.append(f"Tokens ({tok.get('method', '?')}, {tok.get('mode', 'static')}), of "
                     f"{tok.get('patches', '?')} patch tokens besides {tok.get('prefix', 0)} prefix: {kept}."
                     + (f" {tok['dynamic']}." if tok.get("dynamic") else ""))
    depth = report.get("depth") or {}
    blocks = depth.get("blocks") or {}
    if depth.get("removed_blocks"):
        lines.append(f"Blocks removed: {', '.join(f'`{b}`' for b in depth['removed_blocks'])} "
                     f"({blocks.get('dense', '?')} → {blocks.get('compressed', '?')} blocks).")
    if depth.get("skipped_branches"):
        lines.append(f"Branches skipped: {', '.join(f'`{b}`' for b in depth['skipped_branches'])}.")
    if depth.get("exit"):
        lines.append(f"Cut after block {depth['exit']} (exit top-1 on validation data: {depth.get('exit_top1')}).")
    lines = [line for text in lines for line in (text, "")]
    for title, reasons in (("Blocks that cannot be skipped", depth.get("not_skippable")),
                           ("Sites left dense", report.get("skipped_sites")),
                           ("Attentions that cannot become convolutions", (report.get("conv") or {})
                            .get("not_convertible"))):
        if reasons:
            lines += [f"{title}:"] + [f"- `{k}`: {v}" for k, v in reasons.items()] + [""]
    return lines


def write_markdown(report: dict, out_dir: Path | str) -> dict[str, str]:
    """``report.md`` (budgets, before/after, kept per block on every axis the report has) and ``kept.png``
    (the same per block, drawn); returns {file name: path}."""
    out = Path(out_dir)
    rows = kept_blocks(report)
    axes = report_axes(report, rows)
    lines = [f"# {report.get('model', 'model')} compressed with `{report.get('method', '?')}`", ""]
    lines += _budget_lines(report) + _summary_lines(report)
    lines += _axis_notes(report) + _block_table(rows, axes, (report.get("dense") or {}).get("flops"))
    lines += _int8_lines(report.get("int8"))
    if report.get("train"):
        t = report["train"]
        lines += [f"Trained {t.get('steps')} steps in {_num(t.get('seconds'), '.1f')} s "
                  f"({_num(t.get('images_per_s'), '.0f')} images/s), final loss {_num(t.get('final_loss'))}.", ""]
    files = {}
    png = _plot_kept(report, out / "kept.png")
    if png:
        shown = ", ".join(AXIS_NAMES[a] for a in axes)
        lines += [f"![kept per block: {shown}](kept.png)", ""]
        files["kept.png"] = str(png)
    (out / "report.md").write_text("\n".join(lines).rstrip("\n") + "\n")
    files["report.md"] = str(out / "report.md")
    return files


def _int8_lines(q: Any) -> list[str]:
    """``model.int8.onnx`` (``--quantize int8``): how it was quantized, what stayed fp32, how it agrees."""
    if not isinstance(q, dict):
        return []
    top1, lat, size = q.get("top1") or {}, q.get("latency_ms") or {}, q.get("bytes") or {}
    how = q.get("mode", "?") + (f", {q['calibration']} calibration" if q.get("calibration") else "")
    lines = [f"INT8 (`model.int8.onnx`, {how}, plan {q.get('plan', '?')}): fp32 ops "
             f"{', '.join(q.get('fp32_ops') or []) or 'none'}; top-1 agreement with fp32 "
             f"**{_num(q.get('agreement'), '.1%')}** on {q.get('checked_on', '?')}, max abs logit error "
             f"{_num(q.get('max_abs_err'), '.3g')}; top-1 fp32 {_num(top1.get('fp32'), '.2%')} → int8 "
             f"{_num(top1.get('int8'), '.2%')}; ONNX Runtime batch 1 {_num(lat.get('fp32'), '.2f')} → "
             f"{_num(lat.get('int8'), '.2f')} ms; {_num(size.get('fp32'), '.2f', 1e6)} → "
             f"{_num(size.get('int8'), '.2f', 1e6)} MB.", ""]
    return lines


def _plot_kept(report: dict, path: Path) -> Path | None:
    """``kept.png``, or None without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    from vitgraph.report.plot import save_kept
    return save_kept(report, path)
