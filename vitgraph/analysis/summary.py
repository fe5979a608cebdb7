"""What ``vitgraph inspect`` shows of a traced graph: the per-block table (which passes apply at each block, and
why not where one does not) and a Graphviz drawing of the blocks."""
from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path
from typing import Any, Protocol

from vitgraph.meta import Structure


class Viewable(Protocol):
    """What the views read of a ``VitGraph`` (a VitGraph, or anything with these fields)."""

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
