"""``vitgraph demo``: the end-to-end job a newcomer runs first.

1. trains a small DeiT-style ViT on scikit-learn's bundled digits (8x8 images, upscaled);
2. compresses it to about half its FLOPs with ``preset: wdpruning`` — learned head and MLP-unit
   masks, then fine-tuning with distillation from the dense model;
3. physically rewrites it, exports both models to ONNX (parity-checked with ONNX Runtime) and
   prints a before/after table: params, FLOPs, ONNX Runtime latency (interleaved medians), top-1.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

INPUT = (1, 16, 16)
DENSE_STEPS = 600
COMPRESS_STEPS = 1000   # 30 % learn the masks, 70 % fine-tune the frozen architecture


def demo_model() -> torch.nn.Module:
    import timm

    return timm.create_model("deit_tiny_patch16_224", img_size=INPUT[1], patch_size=4, in_chans=1, num_classes=10,
                             embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0)


def run_demo(out: Path, *, dense_steps: int = DENSE_STEPS, compress_steps: int = COMPRESS_STEPS,
             progress: bool = True) -> int:
    from rich.console import Console
    from rich.table import Table

    import vitgraph as vg
    from vitgraph import targets
    from vitgraph.train.data import load_data
    from vitgraph.spec import Train
    from vitgraph.train.loop import fit

    t0 = time.perf_counter()
    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    data = load_data("digits", INPUT, 64, seed=0)
    model = demo_model()

    console.print(f"[bold]1/3[/] training the dense ViT on digits ({len(data.train)} train / {len(data.val)} val "
                  f"images, {dense_steps} steps)")
    fit(model, data.train, Train(steps=dense_steps, batch_size=64, lr=2e-3, warmup_steps=30, seed=0),
        out_dir=out / "dense", progress=progress)
    model.eval()

    console.print("[bold]2/3[/] compressing to 50 % FLOPs with preset wdpruning (learn masks, then fine-tune "
                  "with distillation)")
    spec = vg.Spec.from_dict({"preset": "wdpruning", "budget": {"flops": 0.5},
                              "train": {"steps": compress_steps, "search": 0.3, "batch_size": 64, "lr": 5e-4}})
    example = (torch.randn(2, *INPUT),)
    result = vg.compress(model, spec, example_inputs=example, data=data, name="deit (digits, 16px)",
                         out_dir=out / "compressed", progress=progress, latency_targets=())
    report = result.report

    console.print("[bold]3/3[/] exporting both to ONNX and timing them with ONNX Runtime")
    lowered = {}
    for label, module in (("dense", result.dense.gm), ("compressed", result.compact)):
        lowered[label] = targets.onnx.lower(module, example, out / f"{label}.onnx")
    latency = {}
    for batch in (1, 16):
        runners = {label: targets.bench.runners(module, example, batch=batch, targets=("onnx",), name=label)["onnx"]
                   for label, module in (("dense", result.dense.gm), ("compressed", result.compact))}
        timings = targets.bench.measure(runners, repeats=50 if batch == 1 else 20)
        latency[batch] = {k: v.median_ms for k, v in timings.items()}
    report["latency_ms"]["onnx"] = {**latency[16], "batch": 16}
    report["latency_ms"]["onnx_batch1"] = {**latency[1], "batch": 1}
    (out / "compressed" / "report.json").write_text(json.dumps(report, indent=2))

    table = Table(title="vitgraph demo: dense vs compressed (digits)")
    for col in ("", "params", "GFLOPs", "ORT ms (b=1)", "ORT ms (b=16)", "top-1"):
        table.add_column(col, justify="right")
    for label in ("dense", "compressed"):
        row = report[label]
        table.add_row(label, f"{row['params'] / 1e6:.3f} M", f"{row['flops'] / 1e9:.4f}",
                      f"{latency[1][label]:.3f}", f"{latency[16][label]:.3f}", f"{100 * row['top1']:.2f} %")
    d, c = report["dense"], report["compressed"]
    table.add_row("ratio", f"{c['params'] / d['params']:.2f}", f"{c['flops'] / d['flops']:.3f}",
                  f"{latency[1]['dense'] / latency[1]['compressed']:.2f}x",
                  f"{latency[16]['dense'] / latency[16]['compressed']:.2f}x",
                  f"{100 * (c['top1'] - d['top1']):+.2f} pt")
    console.print(table)
    console.print(f"parity: compact vs gated {report['parity']['max_abs_err']:.1e}; ONNX Runtime vs PyTorch "
                  f"{lowered['compressed'].max_abs_err:.1e}. Kept per block: {out / 'compressed' / 'report.md'}")
    console.print(f"done in {time.perf_counter() - t0:.0f} s; outputs in {out}/")
    return 0
