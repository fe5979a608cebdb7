"""The digits proxy's Pareto front: ``vitgraph sweep`` over width, depth, tokens and all four methods at once.

The model is the demo's digits ViT (deit_tiny layout, ``--size`` 16 px, patch 4: 16 patches, embed 128,
4 heads) with ``--depth`` blocks, trained dense on scikit-learn's digits as the demo trains its own and
saved as a state dict. Then ``vitgraph sweep`` compresses it at every budget for every axis set, from
``examples/specs/all.yaml`` (conv + MLP widths + blocks + tokens) with ``--steps`` steps of search and
fine-tuning, measures top-1, FLOPs and ONNX Runtime latency at batch 1 (interleaved with the dense
model), and writes ``sweep.json``, ``sweep.md`` and ``sweep.png`` into ``--out``::

    python bench/sweep_digits.py --out sweep-digits --budgets 0.3:0.9:0.15 --steps 100
    python bench/sweep_digits.py --out s1 --budgets 0.5:0.5:0.1 --axes width,depth,tokens,conv,all --seed 1

A stopped run resumes: the dense checkpoint and the finished points are kept.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

from _digits import trained_digits_vit
from vitgraph.cli.commands import main as vitgraph_main

SPEC = Path(__file__).resolve().parent.parent / "examples" / "specs" / "all.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="sweep-digits")
    parser.add_argument("--budgets", default="0.3:0.9:0.15")
    parser.add_argument("--axes", default="width,depth,tokens,all")
    parser.add_argument("--depth", type=int, default=8, help="blocks of the digits ViT")
    parser.add_argument("--size", type=int, default=16, help="image size (px; patches of 4 px)")
    parser.add_argument("--dense-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=100, help="search + fine-tuning steps per point")
    parser.add_argument("--spec", default=str(SPEC))
    parser.add_argument("--seed", type=int, help="train.seed for every point (moves the validation split and the "
                        "training order; the dense model stays the one trained with seed 0)")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / f"dense_depth{args.depth}_{args.size}px.pt"
    kwargs = (f"img_size={args.size},patch_size=4,in_chans=1,num_classes=10,embed_dim=128,depth={args.depth},"
              f"num_heads=4")
    if not checkpoint.exists():
        model, _, _ = trained_digits_vit(args.dense_steps, depth=args.depth, size=args.size)
        torch.save(model.state_dict(), checkpoint)
        print(f"dense model trained in {time.perf_counter() - t0:.0f} s -> {checkpoint}", flush=True)
    spec = args.spec
    if args.seed is not None:  # a copy of the spec with train.seed set, beside the results
        raw = yaml.safe_load(Path(spec).read_text())
        raw["train"] = {**(raw.get("train") or {}), "seed": args.seed}
        spec = str(out / f"spec_seed{args.seed}.yaml")
        Path(spec).write_text(yaml.safe_dump(raw, sort_keys=False))
    code = vitgraph_main(["sweep", "deit_tiny_patch16_224", "--model-kwargs", kwargs, "--checkpoint", str(checkpoint),
                          "--spec", spec, "--budgets", args.budgets, "--axes", args.axes, "--data", "digits",
                          "--steps", str(args.steps), "--targets", "onnx", "--out", str(out)])
    print(f"sweep finished in {(time.perf_counter() - t0) / 60:.1f} min (exit {code})", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
