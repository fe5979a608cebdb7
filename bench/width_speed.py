"""Does a FLOPs cut turn into speed? Dense vs one-shot-compressed ViT on every lowering target.

The model (default deit_small_patch16_224, random weights: timing does not depend on them) is compressed
by ``vg.compress`` to ``--flops`` of its dense FLOPs, one-shot: ``--axis width`` prunes heads + MLP units
by magnitude (``--embed``: the residual stream's channels too; ``--head-dim``: value dims), ``--axis
depth`` deletes whole blocks (the ones that change the residual stream least), ``--axis both`` deletes
blocks first and narrows the rest to close the gap. Then dense and compact run side by side in eager
PyTorch, torch.compile and ONNX Runtime (spinning off), all runners of one batch size interleaved;
medians. Per target and batch it prints the speed-up and the *efficiency* = speed-up / (dense FLOPs /
compact FLOPs): 1.0 means latency fell as much as FLOPs did::

    python bench/width_speed.py --flops 0.5 --batches 1,16 --json width_speed.json
    python bench/width_speed.py --targets eager,onnx --repeats 10     # skip the torch.compile build
    python bench/width_speed.py --embed --targets onnx --batches 1,16   # heads + MLP + embedding channels
    python bench/width_speed.py --axis depth --flops 0.75              # 3 of deit_small's 12 blocks deleted
"""
from __future__ import annotations

import argparse
import json
import tempfile
from typing import Any

import timm
import torch
from torch import nn

import vitgraph as vg
from vitgraph.analysis.cost import flop_counter_flops
from vitgraph.capture.frontend import trace_module
from vitgraph.targets import bench


def flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs per image (2 x multiply-adds) by ``FlopCounterMode`` on the math SDPA kernel (the fused one counts 0)."""
    return flop_counter_flops(model, (x[:1],), 1)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compress(model: nn.Module, x: torch.Tensor, target: float, align: int | None, axis: str = "width",
             embed: bool = False, head_dim: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    on = axis in ("width", "both")
    width: dict[str, Any] = {"method": "magnitude", "heads": on, "mlp": on, "embed": on and embed,
                             "head_dim": on and head_dim}
    if align is not None:
        width["align"] = align
    spec = vg.Spec.from_dict({"budget": {"flops": target}, "width": width,
                              "depth": {"skip_blocks": axis in ("depth", "both")}})
    result = vg.compress(model, spec, example_inputs=(x,), data="none", progress=False, latency_targets=())
    return result.compact, result.report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model name")
    parser.add_argument("--flops", type=float, default=0.5, help="target fraction of dense FLOPs")
    parser.add_argument("--align", type=int, default=None, help="width.align in the spec (default: the spec's)")
    parser.add_argument("--axis", choices=("width", "depth", "both"), default="width", help="what to cut")
    parser.add_argument("--embed", action="store_true", help="width.embed: narrow the residual stream too")
    parser.add_argument("--head-dim", action="store_true", help="width.head_dim: value dims inside heads too")
    bench.add_timing_args(parser)
    args = parser.parse_args(argv)
    batches, targets = bench.timing_args(args)

    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    compact, report = compress(model, x, args.flops, args.align, args.axis, args.embed, args.head_dim)
    dense = trace_module(model, (x,))  # both sides fx graphs: the comparison is the width, not the front end
    fl = {"dense": flops(dense, x), "compact": flops(compact, x)}
    pa = {"dense": params(dense), "compact": params(compact)}
    ratio = fl["dense"] / fl["compact"]
    print(f"{args.model}: {args.axis}, target {args.flops:.2f} of dense FLOPs; removed blocks "
          f"{report['depth']['removed_blocks'] or 'none'}; torch threads {torch.get_num_threads()}, "
          "ORT intra-op threads the same, spinning off")
    print(f"  dense   {fl['dense'] / 1e9:6.2f} GFLOPs {pa['dense'] / 1e6:6.2f} M params")
    print(f"  compact {fl['compact'] / 1e9:6.2f} GFLOPs {pa['compact'] / 1e6:6.2f} M params  "
          f"(FLOPs fraction {fl['compact'] / fl['dense']:.3f}; report says "
          f"{report['compressed']['flops'] / report['dense']['flops']:.3f})")

    rows: list[dict[str, Any]] = []
    models = {"dense": dense, "compact": compact}
    with tempfile.TemporaryDirectory(prefix="width-speed-") as workdir:
        for batch in batches:
            timing = bench.compare(models, (x,), batch=batch, targets=targets, warmup=args.warmup,
                                   repeats=args.repeats, workdir=workdir, name=args.model)
            for target in targets:
                d, c = timing[target]["dense"], timing[target]["compact"]
                speedup = d.median_ms / c.median_ms
                rows.append({"target": target, "batch": batch, "dense_ms": d.median_ms, "compact_ms": c.median_ms,
                             "dense_iqr_ms": d.iqr_ms, "compact_iqr_ms": c.iqr_ms, "speedup": speedup,
                             "efficiency": speedup / ratio, "n": d.n})

    print(f"\n{'target':<9}{'batch':>6}{'dense ms':>11}{'compact ms':>12}{'speed-up':>10}{'efficiency':>12}")
    for r in rows:
        print(f"{r['target']:<9}{r['batch']:>6}{r['dense_ms']:>11.2f}{r['compact_ms']:>12.2f}"
              f"{r['speedup']:>9.2f}x{r['efficiency']:>12.2f}")
    print(f"(efficiency = speed-up / {ratio:.2f}, the dense/compact FLOPs ratio; medians of {args.repeats} "
          "interleaved rounds)")
    if args.json:
        out = {"model": args.model, "axis": args.axis, "target_flops": args.flops, "flops": fl, "params": pa, "flops_ratio": ratio,
               "spec": report.get("spec"), "rows": rows}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)


if __name__ == "__main__":
    main()
