"""Human-readable views: a VitGraph's per-block table and Graphviz drawing; a compile report as
``report.md`` and ``kept.png`` (drawn by ``vitgraph.report_plot``).

The report views read ``report.json`` as written by any version: every key beyond the contract's may be
absent, and an axis is shown only where the report has it."""
from __future__ import annotations

import importlib.util
import io
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vitgraph.meta import Structure


class Viewable(Protocol):
    """What the views read of a ``VitGraph`` (no import of vitgraph.graph: it imports these views)."""

    name: str
    structure: Structure
    input_size: Any


def _fmt_flops(f: int) -> str:
    return f"{f / 1e9:.3f} G" if f >= 1e8 else f"{f / 1e6:.2f} M"


def _fmt_params(p: int) -> str:
    return f"{p / 1e6:.2f} M" if p >= 1e5 else f"{p / 1e3:.1f} K"


def _passes(b, to_conv: str | None) -> str:  # noqa: ANN001 - a Block
    """Which passes apply at this block, and the first reason one does not."""
    ok, no = [], []
    for label, reason in (("heads", b.attention.prunable.get("heads") if b.attention else "no attention"),
                          ("head_dim", b.attention.prunable.get("head_dim") if b.attention else "no attention"),
                          ("mlp", b.mlp.prunable.get("mlp") if b.mlp else "no MLP"),
                          ("skip", b.skip_reason),
                          ("tokens", b.token_reason),
                          ("to_conv", to_conv if b.attention else "no attention")):
        (no if reason else ok).append((label, reason))
    text = ",".join(label for label, _ in ok) or "-"
    if no:
        text += "; not " + "; ".join(f"{label}: {reason}" for label, reason in no
                                     if reason not in ("no attention", "no MLP"))
    return text.rstrip("; not ")


def _conv_reasons(g: Viewable) -> dict[str, str]:
    """Why each attention that cannot become a convolution cannot (attention name -> reason)."""
    if getattr(g, "gm", None) is None:
        return {}
    from vitgraph.analysis.conv import conv_sites
    return conv_sites(g)[1]


def structure_table(g: Viewable, console_width: int = 200) -> str:
    """The ``vitgraph inspect`` table as text (rendered with rich)."""
    from rich.console import Console
    from rich.table import Table

    s = g.structure
    t = Table(title=f"{g.name}  input {'x'.join(map(str, g.input_size))}  "
                    f"{_fmt_flops(s.flops)}FLOPs  {_fmt_params(s.params)} params", show_lines=False)
    for col in ("#", "block", "attn", "heads", "head dim", "MLP", "tokens", "FLOPs", "params", "passes"):
        t.add_column(col, overflow="fold")
    refused = _conv_reasons(g)
    for b in s.blocks:
        a = b.attention
        kind = {"token": "msa", "channel": "xca", "separable": "sep"}.get(a.mode, a.mode) if a is not None \
            else b.mixer or ("skip" if b.mlp else "-")
        head_dim = "-" if a is None else (str(a.head_dim) if a.head_dim == a.v_head_dim
                                          else f"{a.head_dim}/{a.v_head_dim}")
        tokens = str(b.tokens_in) if b.tokens_in == b.tokens_out else f"{b.tokens_in}->{b.tokens_out}"
        t.add_row(str(b.index), b.name, kind, "-" if a is None else str(a.heads), head_dim,
                  "-" if b.mlp is None else str(b.mlp.hidden) + (" (gated)" if b.mlp.gated else ""),
                  tokens, _fmt_flops(b.flops), _fmt_params(b.params),
                  _passes(b, refused.get(a.name) if a is not None else None))
    tok = s.tokens
    grid = f"{tok.grid[0]}x{tok.grid[1]}" if tok.grid else "?"
    footer = (f"embed dim {tok.embed_dim}, tokens {tok.tokens} = {tok.prefix_tokens} prefix + grid {grid}, "
              f"layout {tok.layout}, pooling {tok.pooling}")
    console = Console(width=console_width, record=True, file=io.StringIO())
    console.print(t)
    console.print(footer)
    for note in s.notes:
        console.print(f"note: {note}")
    return console.export_text()


def write_dot(g: Viewable, path: str | Path) -> list[Path]:
    """Graphviz drawing of the block structure; also an SVG when the ``dot`` program exists."""
    s = g.structure
    lines = ["digraph vit {", "  rankdir=TB; node [shape=box, fontname=Helvetica, fontsize=10];",
             f'  input [label="input {"x".join(map(str, g.input_size))}", shape=oval];']
    prev = "input"
    if s.tokens.embed:
        lines.append(f'  embed [label="patch embed\\n{s.tokens.tokens} tokens ({s.tokens.prefix_tokens} prefix)"];')
        lines.append(f"  {prev} -> embed;")
        prev = "embed"
    for b in s.blocks:
        a = b.attention
        parts = [f"block {b.index}: {b.name}"]
        if a is not None:
            parts.append(f"attn {a.heads}x{a.head_dim} ({a.impl}, {a.mode})")
        if b.mlp is not None:
            parts.append(f"mlp {b.mlp.hidden}")
        parts.append(f"{_fmt_flops(b.flops)}FLOPs")
        style = "" if b.skippable else ", style=dashed"
        label = "\\n".join(parts)
        lines.append(f'  b{b.index} [label="{label}"{style}];')
        lines.append(f'  {prev} -> b{b.index} [label="{b.tokens_in}"];')
        prev = f"b{b.index}"
    lines.append(f'  head [label="head ({s.tokens.pooling} pool)", shape=oval];')
    lines.append(f"  {prev} -> head;")
    lines.append("}")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    written = [path]
    if shutil.which("dot"):
        svg = path.with_suffix(".svg")
        subprocess.run(["dot", "-Tsvg", str(path), "-o", str(svg)], check=True)
        written.append(svg)
    return written


# ---- compile reports: report.md and kept.png -------------------------------------------------------

Pair = tuple[int, int]  # (kept, dense)

WIDTH_KEYS = {"heads": ".heads", "head_dim": ".v_dims", "mlp": ".mlp"}  # report["kept"] group name suffixes
AXES = ("heads", "head_dim", "mlp", "embed", "tokens", "attention")  # in the order the views show them
AXIS_NAMES = {"heads": "heads", "head_dim": "value dims", "mlp": "MLP units", "embed": "embedding channels",
              "tokens": "tokens", "attention": "attention kind"}
KIND_LABELS = {"msa": "msa", "conv3": "3x3 conv", "conv1": "1x1 conv", "skip": "skipped"}


@dataclass(frozen=True)
class KeptBlock:
    """One dense block of a report and what the compact model kept of it, as (kept, dense) per axis;
    None where the dense block has no such part. ``kind``: the compact block's attention (msa, conv3,
    conv1, skip, ...), None when it has none."""

    index: int
    name: str
    removed: bool
    kind: str | None
    dense_kind: str | None
    heads: Pair | None
    v_dims: Pair | None  # value dims per head
    mlp: Pair | None
    tokens_in: Pair | None
    tokens_out: Pair | None
    flops: int

    def fraction(self, axis: str) -> float | None:
        """Kept fraction on ``axis`` (heads, head_dim, mlp, tokens_in, tokens_out); 0 when removed."""
        pair = getattr(self, "v_dims" if axis == "head_dim" else axis)
        return None if pair is None or not pair[1] else pair[0] / pair[1]


def _kind(attn: dict | None) -> str | None:
    return None if not attn else attn.get("kind", "msa")


def _pair(kept: Any, dense: Any) -> Pair | None:
    return (int(kept or 0), int(dense)) if dense else None


def kept_blocks(report: dict) -> list[KeptBlock]:
    """Per dense block (``dense_blocks``, else ``blocks``), what the compact block of the same name kept."""
    after = {b["name"]: b for b in report.get("blocks") or []}  # compact blocks keep their module names
    rows = []
    for i, d in enumerate(report.get("dense_blocks") or report.get("blocks") or []):
        b = after.get(d["name"])
        da, ba = d.get("attention") or {}, (b or {}).get("attention") or {}
        dm, bm = d.get("mlp") or {}, (b or {}).get("mlp") or {}
        msa = _kind(ba) == "msa"  # a converted or skipped attention keeps no heads and no value dims
        rows.append(KeptBlock(
            index=d.get("index", i), name=d["name"], removed=b is None, kind=_kind(ba),
            dense_kind=_kind(da),
            heads=_pair(ba.get("heads") if msa else 0, da.get("heads")),
            v_dims=_pair(ba.get("v_head_dim", ba.get("head_dim")) if msa else 0,
                         da.get("v_head_dim", da.get("head_dim")) if _kind(da) == "msa" else 0),
            mlp=_pair(bm.get("hidden"), dm.get("hidden")),
            tokens_in=_pair((b or {}).get("tokens_in"), d.get("tokens_in")),
            tokens_out=_pair((b or {}).get("tokens_out"), d.get("tokens_out")),
            flops=int((b or {}).get("flops") or 0)))
    return rows


def embed_kept(report: dict) -> Pair | None:
    """Residual-stream (embedding) channels kept, when the report pruned them."""
    kept, units = report.get("kept") or {}, report.get("units") or {}
    return (int(kept["embed"]), int(units["embed"])) if "embed" in kept and units.get("embed") else None


def report_axes(report: dict, rows: list[KeptBlock]) -> list[str]:
    """The axes the report has, in ``AXES`` order: a width group it pruned or a per-block count that changed,
    its embedding channels, a token axis, an attention that changed kind. A report with none of these (an
    older one, or depth alone) shows heads and MLP units, as the views always did."""
    kept = report.get("kept") or {}
    live = [r for r in rows if not r.removed]
    same = [r for r in live if r.kind == r.dense_kind]  # a converted attention is the attention axis's change

    def changed(field: str, among: list[KeptBlock]) -> bool:
        return any(getattr(r, field) is not None and getattr(r, field)[0] != getattr(r, field)[1] for r in among)

    found = {axis for axis, suffix in WIDTH_KEYS.items() if any(k.endswith(suffix) for k in kept)}
    found |= {axis for axis, field in (("heads", "heads"), ("head_dim", "v_dims")) if changed(field, same)}
    if changed("mlp", live):
        found.add("mlp")
    if embed_kept(report):
        found.add("embed")
    if report.get("tokens") or changed("tokens_in", live) or changed("tokens_out", live):
        found.add("tokens")
    if report.get("conv") or any(r.kind != r.dense_kind for r in live):
        found.add("attention")
    if not found - {"attention"}:
        found |= {axis for axis, field in (("heads", "heads"), ("mlp", "mlp")) if any(getattr(r, field) for r in rows)}
    return [a for a in AXES if a in found]


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


def _plot_kept(report: dict, path: Path) -> Path | None:
    """``kept.png``, or None without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    from vitgraph.report_plot import save_kept
    return save_kept(report, path)
