"""Is a converted attention faster? One block as msa / conv3 / conv1 / skip, and a whole model with a pattern.

Per block: deit_small's sizes (embed 384, 6 heads, 14x14 grid + class token) in a one-block model, each
decision forced and materialized; the table gives each model's median and the block's own time (minus
the ``skip`` model, which has the same embedding, MLP and head). Whole model: deit_small with
``--pattern`` forced (default every other block conv3, starting at block 0), speed-up and efficiency
(speed-up / (dense FLOPs / compact FLOPs)) against the dense graph. Random weights and BatchNorm
statistics (timing does not depend on them); interleaved medians, ORT with spinning off::

    python bench/conv_speed.py --batches 1,16 --targets eager,onnx --repeats 15
    python bench/conv_speed.py --pattern conv3,msa,conv1,msa   # repeated over the blocks
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
from vitgraph.gates.conv import CHOICES
from vitgraph.capture.frontend import trace_module
from vitgraph.gated import instrument, materialize
from vitgraph.targets import bench


def forced(model: torch.nn.Module, x: torch.Tensor, pattern: list[str]) -> torch.nn.Module:
    """``model`` with each attention's decision forced (cycling through ``pattern``), materialized."""
    g = vg.trace(model, (x,))
    spec = vg.Spec.from_dict({"budget": {"flops": 0.9, "tolerance": 0.4},  # (decisions are forced: any budget)
                              "attention": {"to_conv": True}, "width": {"heads": False, "mlp": False}})
    gated = instrument(g, spec)
    axis = gated.axes["conv"]
    axis.choice.copy_(torch.tensor([CHOICES.index(pattern[i % len(pattern)]) for i in range(len(axis.sites))]))
    gated.eval()
    return materialize(gated)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model name")
    parser.add_argument("--pattern", default="conv3,msa", help="decisions repeated over the blocks")
    bench.add_timing_args(parser)
    args = parser.parse_args(argv)
    batches, targets = bench.timing_args(args)

    torch.manual_seed(0)
    one = timm.create_model(args.model, depth=1).eval()
    x = torch.randn(1, *one.pretrained_cfg["input_size"])
    blocks = {c: forced(one, x, [c]) for c in ("msa", "conv3", "conv1", "skip")}
    full = timm.create_model(args.model).eval()
    models = {"dense": trace_module(full, (x,)), "pattern": forced(full, x, args.pattern.split(","))}
    fl = {k: flop_counter_flops(m, (x,), 1) for k, m in {**blocks, **models}.items()}

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="conv-speed-") as workdir:
        for batch in batches:
            t_block = bench.compare(blocks, (x,), batch=batch, targets=targets, warmup=args.warmup,
                                    repeats=args.repeats, workdir=workdir, name="block")
            t_model = bench.compare(models, (x,), batch=batch, targets=targets, warmup=args.warmup,
                                    repeats=args.repeats, workdir=workdir, name=args.model)
            for target in targets:
                base = t_block[target]["skip"].median_ms
                for c in ("msa", "conv3", "conv1"):
                    ms = t_block[target][c].median_ms
                    rows.append({"what": f"block {c}", "target": target, "batch": batch, "ms": ms,
                                 "block_ms": ms - base, "block_gflops": (fl[c] - fl["skip"]) / 1e9})
                d, p = t_model[target]["dense"].median_ms, t_model[target]["pattern"].median_ms
                rows.append({"what": f"model {args.pattern}", "target": target, "batch": batch, "dense_ms": d,
                             "ms": p, "speedup": d / p, "efficiency": (d / p) / (fl["dense"] / fl["pattern"])})

    print(f"{args.model}: blocks at its sizes; pattern {args.pattern} keeps {fl['pattern'] / fl['dense']:.3f} of "
          f"the dense FLOPs; threads {torch.get_num_threads()}")
    for r in rows:
        if "block_ms" in r:
            print(f"{r['what']:<16}{r['target']:<7}b{r['batch']:<4}{r['ms']:9.2f} ms  block {r['block_ms']:7.2f} ms"
                  f"  ({r['block_gflops']:.3f} GFLOPs/img)")
        else:
            print(f"{r['what']:<16}{r['target']:<7}b{r['batch']:<4}{r['dense_ms']:9.2f} -> {r['ms']:.2f} ms"
                  f"  speed-up {r['speedup']:.2f}x  efficiency {r['efficiency']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "pattern": args.pattern, "flops": fl, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
