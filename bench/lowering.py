"""Time a timm model on the lowering targets (eager, torch.compile, ONNX Runtime), interleaved.

Every lowered runner is parity-checked before it is timed. Randomly initialised weights: timing
does not depend on them. Example::

    python bench/lowering.py vit_tiny_patch16_224 --batch 1 8 --targets eager onnx compile
"""
from __future__ import annotations

import argparse
import tempfile

import timm
import torch

from vitgraph.capture.frontend import trace_module
from vitgraph.targets import bench


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="timm model name, e.g. vit_tiny_patch16_224")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--targets", nargs="+", default=list(bench.DEFAULT_TARGETS), choices=bench.TARGETS)
    parser.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-trace", action="store_true", help="lower the eager model, not its fx trace")
    args = parser.parse_args(argv)

    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = timm.create_model(args.model, **kwargs).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224)) if not args.img_size else (3, args.img_size,
                                                                                             args.img_size)
    example = (torch.randn(1, *size),)
    module = model if args.no_trace else trace_module(model, example)
    print(f"{args.model}: torch threads {torch.get_num_threads()}, ORT intra-op threads the same, spinning off")
    with tempfile.TemporaryDirectory(prefix="vitgraph-bench-") as workdir:
        for batch in args.batch:
            runners = bench.runners(module, example, batch=batch, targets=args.targets, workdir=workdir,
                                    name=args.model)
            timings = bench.measure(runners, warmup=args.warmup, repeats=args.repeats)
            base = timings.get("eager")
            for target, timing in timings.items():
                speedup = f"  x{base.median_ms / timing.median_ms:.2f} vs eager" if base else ""
                print(f"  batch {batch:>3}  {target:<8} {timing}{speedup}")


if __name__ == "__main__":
    main()
