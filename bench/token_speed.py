"""Token pruning vs width pruning at the same FLOPs: which one turns the cut into speed?

deit_small_patch16_224 (random weights: timing does not depend on them) is compressed one-shot to
``--flops`` of its dense FLOPs twice: by tokens (``tokens.method: attention``, static top-K with a
package token before blocks 3, 6 and 9) and by width (magnitude heads + MLP units). The three models
run side by side in eager PyTorch, torch.compile and ONNX Runtime (spinning off), all runners of one
batch size interleaved; medians. Per target and batch: speed-up over dense and *efficiency* =
speed-up / (dense FLOPs / compact FLOPs)::

    python bench/token_speed.py --flops 0.6 --batches 1,16 --json token_speed.json
    python bench/token_speed.py --targets eager,onnx --repeats 10     # skip the torch.compile build
    python bench/token_speed.py --cuts tokens --targets onnx --batches 1 --repeats 200   # dense vs tokens only
"""
from __future__ import annotations

import argparse
import json
import tempfile
from typing import Any

import timm
import torch

import vitgraph as vg
from vitgraph.analysis.cost import flop_counter_flops
from vitgraph.capture.frontend import trace_module
from vitgraph.targets import bench


def compress(model: torch.nn.Module, x: torch.Tensor, spec: dict[str, Any]) -> torch.nn.Module:
    result = vg.compress(model, vg.Spec.from_dict(spec), example_inputs=(x,), data="none", progress=False,
                         latency_targets=())
    return result.compact


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model name")
    parser.add_argument("--flops", type=float, default=0.6, help="target fraction of dense FLOPs")
    parser.add_argument("--stages", default="3,6,9", help="token selectors before these blocks (0-based)")
    parser.add_argument("--cuts", default="tokens,width", help="which cuts to time beside dense: tokens,width")
    bench.add_timing_args(parser)
    args = parser.parse_args(argv)
    batches, targets = bench.timing_args(args)

    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    budget = {"flops": args.flops}
    specs = {"tokens": {"budget": budget, "tokens": {"method": "attention",
                                                     "stages": [int(s) for s in args.stages.split(",")]}},
             "width": {"budget": budget, "width": {"method": "magnitude"}}}
    cuts = [c for c in args.cuts.split(",") if c]
    if not cuts or set(cuts) - set(specs):
        parser.error(f"--cuts takes a comma-separated subset of {sorted(specs)}, got {args.cuts!r}")
    models = {"dense": trace_module(model, (x,))}  # every side an fx graph: the comparison is the cut, not the front end
    models.update({c: compress(model, x, specs[c]) for c in cuts})
    fl = {k: flop_counter_flops(m, (x,), 1) for k, m in models.items()}
    print(f"{args.model}: target {args.flops:.2f} of dense FLOPs; torch threads {torch.get_num_threads()}, "
          "ORT intra-op threads the same, spinning off")
    for k in models:
        print(f"  {k:<7}{fl[k] / 1e9:6.2f} GFLOPs  ({fl[k] / fl['dense']:.3f} of dense)")

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="token-speed-") as workdir:
        for batch in batches:
            timing = bench.compare(models, (x,), batch=batch, targets=targets, warmup=args.warmup,
                                   repeats=args.repeats, workdir=workdir, name=args.model)
            for target in targets:
                d = timing[target]["dense"]
                for name in cuts:
                    c = timing[target][name]
                    speedup = d.median_ms / c.median_ms
                    rows.append({"cut": name, "target": target, "batch": batch, "dense_ms": d.median_ms,
                                 "compact_ms": c.median_ms, "speedup": speedup,
                                 "efficiency": speedup / (fl["dense"] / fl[name]), "n": d.n})

    print(f"\n{'cut':<8}{'target':<9}{'batch':>6}{'dense ms':>11}{'compact ms':>12}{'speed-up':>10}{'efficiency':>12}")
    for r in rows:
        print(f"{r['cut']:<8}{r['target']:<9}{r['batch']:>6}{r['dense_ms']:>11.2f}{r['compact_ms']:>12.2f}"
              f"{r['speedup']:>9.2f}x{r['efficiency']:>12.2f}")
    print(f"(efficiency = speed-up / (dense FLOPs / compact FLOPs); medians of {args.repeats} interleaved rounds)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "target_flops": args.flops, "flops": fl, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
