"""``kept.png``: what the compact model kept of each dense block, on every axis its report has.

Bars per block: kept fractions of heads, value dims per head and MLP units. Lines: the tokens a block
takes in (and gives out, where a block changes the count), as fractions of the dense block's tokens;
the embedding channels, one fraction for the whole residual stream, as a dashed horizontal line. A
removed block is a grey hatched slot labelled "removed"; an attention that became a convolution or was
skipped is shaded and named under its block index. Only the axes the report has are drawn
(``vitgraph.report.kept.report_axes``).

The figure uses constrained layout and wraps its title to its own width, so nothing it draws falls
outside it; ``clipped_texts`` lists what would.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from vitgraph.report.kept import KIND_LABELS, KeptBlock, embed_kept, kept_blocks, report_axes

BARS = (("heads", "heads", "tab:blue"), ("head_dim", "value dims / head", "tab:cyan"),
        ("mlp", "MLP units", "tab:orange"))
KIND_SHADES = {"conv3": "tab:red", "conv1": "tab:pink", "skip": "tab:gray"}
SHORT_KINDS = {"conv3": "3x3", "conv1": "1x1", "skip": "skip"}
TITLE_PT = 11


def kept_figure(report: dict) -> Figure:
    """The ``kept.png`` figure of ``report`` (an Agg canvas: no pyplot state, no backend switch)."""
    rows = kept_blocks(report)
    axes = report_axes(report, rows)
    bars = [b for b in BARS if b[0] in axes]
    n = max(1, len(rows))
    # wide enough for every bar of 24 blocks to stay readable, and for the legend to the right
    width = min(26.0, max(7.0, 3.2 + n * (0.18 * max(1, len(bars)) + 0.14)))
    fig = Figure(figsize=(width, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    _draw_bars(ax, rows, bars)
    _draw_lines(ax, rows, axes, report)
    _draw_removed(ax, rows)
    _label_blocks(ax, rows, "attention" in axes)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0, 1.08)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("kept fraction of the dense block")
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=8)
    fig.suptitle(_title(report, width), fontsize=TITLE_PT)
    return fig


def save_kept(report: dict, path: Path | str) -> Path:
    """Draw ``report`` into ``path`` (PNG)."""
    fig = kept_figure(report)
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.1)
    return Path(path)


def clipped_texts(fig: Figure) -> list[str]:
    """The drawn texts (title, labels, legend, annotations) that reach outside the figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    box = fig.bbox
    out, undrawn = [], set()
    for ax in fig.axes:  # tick labels outside the view are kept as artists but never drawn
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            eps = 1e-9 * max(1.0, hi - lo)
            undrawn |= {id(label) for tick in axis.get_major_ticks() + axis.get_minor_ticks()
                        if not lo - eps <= tick.get_loc() <= hi + eps for label in (tick.label1, tick.label2)}
    for t in fig.findobj(Text):
        if id(t) in undrawn or not t.get_visible() or not t.get_text().strip():
            continue
        e = t.get_window_extent(renderer)
        if e.x0 < box.x0 - 0.5 or e.y0 < box.y0 - 0.5 or e.x1 > box.x1 + 0.5 or e.y1 > box.y1 + 0.5:
            out.append(t.get_text())
    return out


def _title(report: dict, width_in: float) -> str:
    budget = report.get("budget") or {}
    parts = [f"{report.get('model', 'model')}: {_frac(budget.get('achieved'))} of the dense FLOPs"]
    lat = budget.get("latency")
    if isinstance(lat, dict) and lat.get("measured") is not None:
        where = f"{lat.get('runtime', '?')}, batch {lat.get('batch', '?')}"
        parts.append(f"latency {_frac(lat['measured'])} of dense measured ({where})")
    chars = max(30, int(width_in * 72 / (0.62 * TITLE_PT)))  # a character is ~0.6 em wide at most
    return textwrap.fill("; ".join(parts), chars)


def _frac(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) else "?"


def _draw_bars(ax: Axes, rows: list[KeptBlock], bars: list[tuple[str, str, str]]) -> None:
    w = 0.8 / max(1, len(bars))
    for k, (axis, label, color) in enumerate(bars):
        x, y = [], []
        for i, r in enumerate(rows):
            f = r.fraction(axis)
            if not r.removed and f is not None:
                x.append(i - 0.4 + w * (k + 0.5))
                y.append(f)
        ax.bar(x, y, w, color=color, label=label)


def _draw_lines(ax: Axes, rows: list[KeptBlock], axes: list[str], report: dict) -> None:
    if "tokens" in axes:
        def series(field: str) -> list[float]:
            return [math.nan if r.removed or r.fraction(field) is None else r.fraction(field) for r in rows]

        idx = list(range(len(rows)))
        ax.plot(idx, series("tokens_in"), "o-", color="tab:green", lw=1.5, ms=4, label="tokens in")
        if any(r.tokens_in != r.tokens_out for r in rows if not r.removed):
            ax.plot(idx, series("tokens_out"), "v--", color="tab:olive", lw=1.2, ms=4, label="tokens out")
    embed = embed_kept(report)
    if "embed" in axes and embed:
        ax.axhline(embed[0] / embed[1], ls="--", lw=1.5, color="tab:purple",
                   label=f"embedding channels\n(whole stream): {embed[0]} / {embed[1]}")


def _draw_removed(ax: Axes, rows: list[KeptBlock]) -> None:
    gone = [i for i, r in enumerate(rows) if r.removed]
    if not gone:
        return
    ax.bar(gone, [1.0] * len(gone), 0.86, color="0.9", edgecolor="0.5", hatch="///", label="removed block")
    for i in gone:
        ax.text(i, 0.5, "removed", rotation=90, ha="center", va="center", fontsize=8, color="0.2",
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8})


def _label_blocks(ax: Axes, rows: list[KeptBlock], kinds: bool) -> None:
    """Block indices on the x axis; under them, the attention kind where it changed (and a shade)."""
    labels, shaded = [], set()
    for i, r in enumerate(rows):
        changed = kinds and not r.removed and r.kind != r.dense_kind
        kind = r.kind or "skip"
        labels.append(f"{r.index}\n{SHORT_KINDS.get(kind, kind)}" if changed else str(r.index))
        if changed:
            first = kind not in shaded
            shaded.add(kind)
            ax.axvspan(i - 0.45, i + 0.45, color=KIND_SHADES.get(kind, "tab:brown"), alpha=0.15, lw=0, zorder=0,
                       label=f"attention → {KIND_LABELS.get(kind, kind)}" if first else None)
    ax.set_xticks(range(len(rows)), labels, fontsize=8 if len(rows) <= 16 else 7)
    ax.set_xlabel("block" + (" (attention kind under the index where it changed)" if shaded else ""))
