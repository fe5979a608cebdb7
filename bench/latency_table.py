"""How well does a latency table predict latency? Held-out compact configurations, predicted vs measured.

A table is profiled (or loaded with ``--table``) for the model on one runtime and batch size; then
``--holdout`` fresh random one-shot configurations (another seed than the profile's: widths with
allocation uniform or global, value dims, embedding channels, blocks, token counts) are compiled and
timed interleaved with the dense model. For each it prints the measured ratio (compact / dense,
medians), the table's predicted ratio and the relative error; at the end the median and maximum
absolute error (issue 13: median within 10 %)::

    python bench/latency_table.py --target onnx --batch 1 --holdout 20
    python bench/latency_table.py --target onnx --batch 16 --holdout 20 --samples 12
    python bench/latency_table.py --table table.json --holdout 10      # a table from `vitgraph profile`
    python bench/latency_table.py --target onnx-int8 --holdout 12       # ratios to dense fp32 ONNX
"""
from __future__ import annotations

import argparse
import json
import time

import timm
import torch

from vitgraph.analysis.graph import trace
from vitgraph.cost.latency import LatencyTable
from vitgraph.cost.profile import measure_specs, profile, sample_specs
from vitgraph.gated import builder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--target", default="onnx", choices=("onnx", "onnx-int8", "eager", "compile"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--samples", type=int, default=12, help="configurations the table is fitted to")
    p.add_argument("--holdout", type=int, default=20, help="fresh configurations it must predict")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--table", help="a table from `vitgraph profile` instead of profiling here")
    p.add_argument("--json", metavar="OUT", help="write every figure here")
    args = p.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    g = trace(model, (torch.randn(2, *model.pretrained_cfg["input_size"]),), name=args.model)
    t0 = time.perf_counter()
    if args.table:
        table = LatencyTable.load(args.table)
        table.check(g, args.target, args.batch)
    else:
        table = profile(g, args.target, args.batch, builder(g), samples=args.samples, repeats=args.repeats)
    profiled = time.perf_counter() - t0
    rows, dense_ms = measure_specs(g, sample_specs(g, 3 * args.holdout, seed=1), args.target, args.batch,
                                   args.holdout, builder(g), args.repeats)
    rows = [r for r in rows if r["spec"] is not None]  # (onnx-int8 measures the dense model quantized first)
    errors = []
    print(f"\n{args.model} on {args.target}, batch {args.batch}, {torch.get_num_threads()} threads: dense "
          f"{dense_ms:.2f} ms; table from {len(table.samples)} configurations ({profiled:.0f} s)")
    print(f"{'configuration':36s} {'measured':>9s} {'predicted':>9s} {'error':>7s}")
    for r in rows:
        r["predicted"] = table.predict_ratio(r["features"])
        errors.append(abs(r["predicted"] - r["ratio"]) / r["ratio"])
        print(f"{r['label']:36s} {r['ratio']:9.3f} {r['predicted']:9.3f} {100 * errors[-1]:6.1f}%")
    errors.sort()
    print(f"held-out configurations: {len(rows)}; median abs error {100 * errors[len(errors) // 2]:.1f} %, "
          f"max {100 * errors[-1]:.1f} %")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"table": table.coef, "dense_ms": dense_ms, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
