"""``vitgraph demo``: the end-to-end job a newcomer runs first.

Builds a small DeiT-style ViT for 8x8-pixel digit images (scikit-learn's bundled digits, upscaled),
traces it, prints the recognised structure, lowers it to ONNX and a self-contained .pt2 with parity
checks, and measures eager vs ONNX Runtime latency side by side.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def demo_model() -> torch.nn.Module:
    import timm

    return timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1, num_classes=10,
                             embed_dim=192, depth=6, num_heads=3)


def run_demo(out: Path) -> int:
    from vitgraph import targets
    from vitgraph.graph import trace

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = demo_model().eval()
    x = torch.randn(2, 1, 32, 32)
    g = trace(model, x, name="deit_tiny (32px digits)")
    print(g.summary())
    (out / "structure.json").write_text(g.to_json(indent=2))

    onnx_rep = targets.onnx.lower(g.gm, g.example_inputs, out / "model.onnx")
    pt2_rep = targets.export.lower(g.gm, g.example_inputs, out / "model.pt2")
    print(f"ONNX  -> {onnx_rep.path}: max abs error vs eager {onnx_rep.max_abs_err:.2e}")
    print(f".pt2  -> {pt2_rep.path}: max abs error vs eager {pt2_rep.max_abs_err:.2e}")

    rows = {}
    for batch in (1, 16):
        timings = targets.bench.measure(targets.bench.runners(g.gm, g.example_inputs, batch=batch,
                                                              targets=("eager", "onnx"), workdir=out,
                                                              name="demo"), repeats=30)
        rows[batch] = {t: tm.median_ms for t, tm in timings.items()}
        print(f"batch {batch:>2}: eager {timings['eager'].median_ms:7.2f} ms   "
              f"onnxruntime {timings['onnx'].median_ms:7.2f} ms   "
              f"(ONNX Runtime speed-up {timings['eager'].median_ms / timings['onnx'].median_ms:.2f}x)")
    (out / "latency.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}/structure.json, model.onnx, model.pt2, latency.json")
    return 0
