"""report.md and kept.png: every axis a report has is shown, per block and stream-wide; removed blocks
say so; a latency budget sits beside the FLOPs; nothing the figure draws (its title first) falls outside
it at 4, 12 or 24 blocks; an old report with none of the newer keys still renders.

Real reports come from one-shot ``vg.compress`` runs on tiny models; the latency and 24-block reports
are written out by hand in the shape ``vitgraph.pipeline`` and ``vitgraph.cost.profile`` produce.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import vitgraph as vg
from vitgraph.report.kept import kept_blocks, report_axes
from vitgraph.report.views import write_markdown

plot = pytest.importorskip("vitgraph.report.plot")


def _deit(depth: int, heads: int = 4, embed: int = 64) -> vg.VitGraph:
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=1, num_classes=10,
                          embed_dim=embed, depth=depth, num_heads=heads).eval()
    return vg.trace(m, torch.randn(2, 1, 32, 32))


SPECS = {
    "width": (4, {"budget": {"flops": 0.5}, "width": {"method": "magnitude", "heads": True, "mlp": True,
                                                      "head_dim": True, "embed": True, "align": 1}}),
    "depth": (6, {"budget": {"flops": 0.55}, "width": {"method": "magnitude"}, "depth": {"skip_blocks": True}}),
    "tokens": (4, {"budget": {"flops": 0.6}, "width": {"heads": False, "mlp": False},
                   "tokens": {"method": "attention", "stages": [1, 2]}}),
}


@pytest.fixture(scope="module")
def reports() -> dict[str, dict]:
    out = {}
    for key, (depth, spec) in SPECS.items():
        result = vg.compress(_deit(depth), spec, data="none", progress=False, latency_targets=())
        out[key] = result.report
    return out


def _write(report: dict, tmp_path) -> tuple[str, object]:
    files = write_markdown(report, tmp_path)
    assert set(files) == {"report.md", "kept.png"}
    assert (tmp_path / "kept.png").stat().st_size > 1000
    return (tmp_path / "report.md").read_text(), plot.kept_figure(report)


def _legend(fig) -> list[str]:
    legend = fig.axes[0].get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def test_width_report_shows_heads_value_dims_mlp_and_the_stream(reports, tmp_path):
    report = reports["width"]
    assert report_axes(report, kept_blocks(report)) == ["heads", "head_dim", "mlp", "embed"]
    md, fig = _write(report, tmp_path)
    kept, units = report["kept"]["embed"], report["units"]["embed"]
    assert 0 < kept < units and f"Embedding channels (the residual stream, every block): {kept} / {units}" in md
    assert "| block | heads | value dims / head | MLP hidden |" in md
    b, d = report["blocks"][0], report["dense_blocks"][0]
    assert b["attention"]["v_head_dim"] < d["attention"]["v_head_dim"]
    assert (f"| {d['name']} | {b['attention']['heads']} / {d['attention']['heads']} | "
            f"{b['attention']['v_head_dim']} / {d['attention']['v_head_dim']} | "
            f"{b['mlp']['hidden']} / {d['mlp']['hidden']} |") in md
    labels = _legend(fig)
    assert {"heads", "value dims / head", "MLP units"} <= set(labels)
    assert any(f"{kept} / {units}" in t and "embedding channels" in t for t in labels)
    assert "tokens in" not in labels and "removed block" not in labels
    assert plot.clipped_texts(fig) == []


def test_removed_blocks_are_labelled_removed(reports, tmp_path):
    report = reports["depth"]
    removed = report["depth"]["removed_blocks"]
    assert removed, "the depth spec removes blocks"
    md, fig = _write(report, tmp_path)
    for name in removed:
        assert f"| {name} | removed | removed |" in md
    assert f"Blocks removed: {', '.join(f'`{n}`' for n in removed)}" in md
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts].count("removed") == len(removed)
    assert "removed block" in _legend(fig)
    names = [d["name"] for d in report["dense_blocks"]]
    kept_slots = {i for i, n in enumerate(names) if n not in removed}
    heads = ax.containers[_legend(fig).index("heads")]  # the bars of removed blocks are not drawn empty
    assert {round(p.get_x() + p.get_width() / 2) for p in heads} == kept_slots
    assert plot.clipped_texts(fig) == []


def test_token_report_draws_tokens_in_as_fractions_of_the_dense_tokens(reports, tmp_path):
    report = reports["tokens"]
    assert report_axes(report, kept_blocks(report)) == ["tokens"]
    md, fig = _write(report, tmp_path)
    b, d = report["blocks"][2], report["dense_blocks"][2]
    assert b["tokens_in"] < d["tokens_in"]
    assert f"| {d['name']} | 2 / 2 | 192 / 192 | {b['tokens_in']} / {d['tokens_in']} |" not in md  # 4 heads
    assert f"| {b['tokens_in']} / {d['tokens_in']} |" in md and "| tokens |" in md
    assert f"{report['tokens']['kept_tokens']['blocks.1']} kept before `blocks.1`" in md
    line = next(ln for ln in fig.axes[0].get_lines() if ln.get_label() == "tokens in")
    assert line.get_ydata()[2] == pytest.approx(b["tokens_in"] / d["tokens_in"])
    assert "heads" not in _legend(fig)  # the width axis was off: only the token axis is drawn
    assert plot.clipped_texts(fig) == []


def test_converted_and_skipped_attention_is_named_per_block(reports, tmp_path):
    report = copy.deepcopy(reports["tokens"])
    for block, kind in zip(report["blocks"], ("conv3", "conv1", "skip")):
        block["attention"] = {"kind": kind, "heads": 0, "head_dim": 0}
    md, fig = _write(report, tmp_path)
    assert "| **3x3 conv** (was msa) |" in md and "| **1x1 conv** (was msa) |" in md and "**skipped**" in md
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks[:4] == ["0\n3x3", "1\n1x1", "2\nskip", "3"]
    assert {"attention → 3x3 conv", "attention → 1x1 conv", "attention → skipped"} <= set(_legend(fig))


def _synthetic(n: int, model: str = "vit_base_patch16_224.augreg2_in21k_ft_in1k") -> dict:
    """A report of ``n`` blocks with every axis at once, removed blocks and a latency budget."""
    dense, blocks = [], []
    for i in range(n):
        d = {"index": i, "name": f"blocks.{i}", "tokens_in": 197, "tokens_out": 197, "flops": 10**9,
             "attention": {"kind": "msa", "heads": 12, "head_dim": 64, "v_head_dim": 64}, "mlp": {"hidden": 3072}}
        dense.append(d)
        if i % 7 == 5:
            continue  # removed
        t = 197 - 6 * i
        kind = {3: "conv3", 4: "conv1", 9: "skip"}.get(i, "msa")
        attn = ({"kind": "msa", "heads": 12 - i % 4, "head_dim": 64, "v_head_dim": 48} if kind == "msa"
                else {"kind": kind, "heads": 0, "head_dim": 0})
        blocks.append({**d, "attention": attn, "mlp": {"hidden": 3072 - 64 * i}, "tokens_in": t, "tokens_out": t,
                       "flops": 5 * 10**8})
    kept = {f"blocks.{i}.attn.heads": 10 for i in range(n)} | {"embed": 640}
    return {"model": model, "method": "magnitude + depth + tokens (attention)", "blocks": blocks,
            "dense_blocks": dense, "dense": {"flops": 35 * 10**9, "params": 86 * 10**6, "top1": 0.81},
            "compressed": {"flops": 17 * 10**9, "params": 60 * 10**6, "top1": 0.79},
            "parity": {"max_abs_err": 2e-6}, "kept": kept, "units": {"embed": 768},
            "tokens": {"method": "attention", "mode": "static", "stages": [1], "kept_tokens": {"blocks.1": 150},
                       "patches": 196, "prefix": 1},
            "depth": {"blocks": {"dense": n, "compressed": len(blocks)},
                      "removed_blocks": [d["name"] for d in dense if d["index"] % 7 == 5]},
            "latency_ms": {"onnx": {"dense": 12.3, "compressed": 7.3, "batch": 1}},
            "budget": {"metric": "latency", "target": 0.6, "flops": None, "achieved": 0.49, "tolerance": 0.05,
                       "latency": {"target": 0.6, "tolerance": 0.05, "runtime": "onnx", "batch": 1,
                                   "predicted": 0.61, "measured": 0.59, "dense_ms": 12.3, "compressed_ms": 7.3,
                                   "rounds": [{"aim": 0.6, "predicted": 0.6, "measured": 0.67},
                                              {"aim": 0.537, "predicted": 0.61, "measured": 0.59}],
                                   "adjusted": True, "within": True}}}


def test_latency_budget_sits_beside_the_flops(tmp_path):
    md, fig = _write(_synthetic(12), tmp_path)
    assert "| FLOPs | none | - | **0.490** |" in md
    assert "| latency (onnx, batch 1) | 0.60 ± 0.05 | 0.610 | **0.590** (12.30 → 7.30 ms) |" in md
    assert "within the target, after re-aiming the decisions over 2 measured rounds" in md
    assert "| 1 | 0.600 | 0.600 | 0.670 |" in md and "| 2 | 0.537 | 0.610 | 0.590 |" in md
    assert "| | FLOPs (G) | params (M) | top-1 | onnx ms (batch 1) |" in md
    assert "| compressed | 17.000 | 60.00 | 79.00 % | 7.30 |" in md
    assert "latency 0.59 of dense measured (onnx, batch 1)" in fig._suptitle.get_text().replace("\n", " ")
    report = _synthetic(12)
    del report["budget"]["latency"]["within"], report["budget"]["latency"]["rounds"]
    md, _ = _write(report, tmp_path)
    assert "| latency (onnx, batch 1) |" in md and "measured rounds" not in md


@pytest.mark.parametrize("n", [12, 24])
def test_every_axis_at_12_and_24_blocks_stays_inside_the_figure(n, tmp_path):
    report = _synthetic(n, model="a_long_model_name_" * 6)
    md, fig = _write(report, tmp_path)
    assert report_axes(report, kept_blocks(report)) == ["heads", "head_dim", "mlp", "embed", "tokens", "attention"]
    assert plot.clipped_texts(fig) == [], "the title and every label lie inside the figure"
    assert fig.get_figwidth() / n >= 0.5  # about half an inch per block at 24 blocks: the bars stay apart
    assert [t.get_text() for t in fig.axes[0].texts].count("removed") == len(report["depth"]["removed_blocks"])
    gone = [ln.split(" | ")[0][2:] for ln in md.splitlines() if ln.endswith("| removed | removed | 0 |")]
    assert gone == report["depth"]["removed_blocks"]


def test_clipped_texts_finds_a_title_wider_than_the_figure():
    """The check the layout tests rely on: the old kept.png layout (a 4-inch figure, ``tight_layout``, the
    title on the axes) cut its own title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar([0, 1], [0.5, 0.7])
    ax.set_title("deit_tiny_patch16_224: 0.50 of dense FLOPs")
    fig.tight_layout()
    assert plot.clipped_texts(fig) == ["deit_tiny_patch16_224: 0.50 of dense FLOPs"]


def test_an_old_minimal_report_still_renders(tmp_path):
    block = {"index": 0, "name": "blocks.0", "attention": {"heads": 3, "head_dim": 64}, "mlp": {"hidden": 768},
             "flops": 2 * 10**8, "params": 10**6}
    report = {"model": "m", "method": "magnitude", "budget": {"target": 0.5, "achieved": 0.51},
              "dense": {"flops": 4 * 10**8, "params": 2 * 10**6, "top1": None},
              "compressed": {"flops": 2 * 10**8, "params": 10**6, "top1": None}, "blocks": [block],
              "parity": {"max_abs_err": 1e-7}, "latency_ms": {"eager": {"dense": 2.0, "compressed": 1.0}}}
    md, fig = _write(report, tmp_path)
    assert "| FLOPs | 0.50 | - | **0.510** |" in md
    assert "| block | heads | MLP hidden | GFLOPs |" in md and "| blocks.0 | 3 / 3 | 768 / 768 | 0.200 |" in md
    assert "| dense | 0.400 | 2.00 | - | 2.00 |" in md
    assert set(_legend(fig)) == {"heads", "MLP units"}
    bare = {"model": "m", "blocks": [block]}  # nothing else at all
    md, _ = _write(bare, tmp_path)
    assert "| blocks.0 | 3 / 3 | 768 / 768 |" in md
