"""``vitgraph demo``: the end-to-end job a newcomer runs first.

1. trains a small DeiT-style ViT on scikit-learn's bundled digits (8x8 images, upscaled);
2. compresses it to about half its FLOPs with ``preset: wdpruning`` — learned head and MLP-unit
   masks, then fine-tuning with distillation from the dense model;
3. physically rewrites it, exports both models to ONNX (parity-checked with ONNX Runtime), quantizes the
   compact one to static INT8 (QDQ, calibrated on digits training images, checked for top-1 agreement) and
   prints a table: params, FLOPs, ONNX Runtime latency (interleaved medians), file size, top-1.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

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

    console.print("[bold]3/3[/] exporting both to ONNX, the compact one also to static INT8, and timing them "
                  "with ONNX Runtime")
    lowered = {}
    for label, module in (("dense", result.dense.gm), ("compressed", result.compact)):
        lowered[label] = targets.onnx.lower(module, example, out / f"{label}.onnx")
    int8 = targets.int8.lower_int8(result.compact, example, out / "compressed.int8.onnx",
                                   data_batches=list(data.loader("val")), calibration=_calibration(data),
                                   config=targets.int8.Int8Config(mode="static"), name="compressed")
    report["int8"] = int8.to_dict()
    latency = _latency(result, example, out / "compressed.int8.onnx")
    report["latency_ms"]["onnx"] = {**latency[16], "batch": 16}
    report["latency_ms"]["onnx_batch1"] = {**latency[1], "batch": 1}
    (out / "compressed" / "report.json").write_text(json.dumps(report, indent=2))
    console.print(_table(report, latency, {"dense": out / "dense.onnx", "compressed": out / "compressed.onnx",
                                           "int8": out / "compressed.int8.onnx"}))
    console.print(f"parity: compact vs gated {report['parity']['max_abs_err']:.1e}; ONNX Runtime vs PyTorch "
                  f"{lowered['compressed'].max_abs_err:.1e}; INT8 ({int8.plan}; fp32: {', '.join(int8.fp32_ops)}) "
                  f"agrees with fp32 compact on {100 * int8.agreement:.1f} % of {int8.checked_on}. "
                  f"Kept per block: {out / 'compressed' / 'report.md'}")
    console.print(f"done in {time.perf_counter() - t0:.0f} s; outputs in {out}/")
    return 0


def _calibration(data: Any, images: int = 256) -> list[Any]:
    """Shuffled training batches, ``images`` in all: static INT8 calibrates its activation ranges on them."""
    batches, seen = [], 0
    for batch in data.loader("train", shuffle=True, seed=0):
        batches.append(batch)
        seen += len(batch[0])
        if seen >= images:
            break
    return batches


def _latency(result: Any, example: tuple[torch.Tensor, ...], int8_path: Path) -> dict[int, dict[str, float]]:
    """ORT medians (ms) of dense, compact and compact INT8 at batch 1 and 16, all three interleaved."""
    from vitgraph import targets

    latency = {}
    for batch in (1, 16):
        runners = {label: targets.bench.runners(module, example, batch=batch, targets=("onnx",), name=label)["onnx"]
                   for label, module in (("dense", result.dense.gm), ("compressed", result.compact))}
        sess = targets.onnx.session(int8_path, threads=torch.get_num_threads())
        feed = {sess.get_inputs()[0].name: torch.randn(batch, *INPUT).numpy()}
        runners["int8"] = lambda sess=sess, feed=feed: sess.run(None, feed)
        timings = targets.bench.measure(runners, repeats=50 if batch == 1 else 20)
        latency[batch] = {k: v.median_ms for k, v in timings.items()}
    return latency


def _table(report: dict[str, Any], latency: dict[int, dict[str, float]], files: dict[str, Path]) -> Any:
    from rich.table import Table

    table = Table(title="vitgraph demo: dense vs compressed, fp32 and INT8 (compressed, static) on digits")
    for col in ("", "params", "GFLOPs", "ORT ms (b=1)", "ORT ms (b=16)", "MB", "top-1"):
        table.add_column(col, justify="right")
    size = {k: p.stat().st_size for k, p in files.items()}
    int8 = report["int8"]
    rows = {"dense": report["dense"], "compressed": report["compressed"],
            "int8": {**report["compressed"], "top1": int8["top1"]["int8"]}}
    for label, row in rows.items():
        table.add_row("INT8" if label == "int8" else label, f"{row['params'] / 1e6:.3f} M",
                      f"{row['flops'] / 1e9:.4f}", f"{latency[1][label]:.3f}", f"{latency[16][label]:.3f}",
                      f"{size[label] / 1e6:.2f}", f"{100 * row['top1']:.2f} %")
    d = report["dense"]
    for label in ("compressed", "int8"):
        c = rows[label]
        table.add_row("INT8 ratio" if label == "int8" else "ratio", f"{c['params'] / d['params']:.2f}",
                      f"{c['flops'] / d['flops']:.3f}", f"{latency[1]['dense'] / latency[1][label]:.2f}x",
                      f"{latency[16]['dense'] / latency[16][label]:.2f}x", f"{size[label] / size['dense']:.3f}",
                      f"{100 * (c['top1'] - d['top1']):+.2f} pt")
    return table
