"""Does attention->convolution keep accuracy? The digits ViT at 32 px, dense vs ``preset: spvit_conv``.

The model is the issue's digits ViT (deit_tiny layout, 32 px, patch 4: an 8x8 grid, embed 128, 4 blocks,
4 heads), trained dense on scikit-learn's digits as the demo trains its own. Then ``preset: spvit_conv``
at ``--flops`` with the demo's compression budget (``--steps``, half of them searching): each attention
chooses msa / conv3 / conv1 / skip and the MLP units are learned, under one quadratic FLOPs loss::

    python bench/conv_digits.py --flops 0.6 --dense-steps 600 --steps 1000
"""
from __future__ import annotations

import argparse
import json

import vitgraph as vg
from _digits import trained_digits_vit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops", type=float, default=0.6)
    parser.add_argument("--dense-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", help="write the compiled model here (compact.pt, model.pt2, report.json)")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)

    model, data, example = trained_digits_vit(args.dense_steps)
    spec = {"preset": "spvit_conv", "budget": {"flops": args.flops},
            "train": {"steps": args.steps, "batch_size": 64, "search": 0.5}}
    result = vg.compress(model, spec, example_inputs=example, data=data, progress=False, latency_targets=("onnx",),
                         out_dir=args.out)
    r = result.report
    row = {"dense_top1": r["dense"]["top1"], "top1": r["compressed"]["top1"], "budget": r["budget"],
           "decisions": r["conv"]["decisions"], "parity": r["parity"], "latency_ms": r["latency_ms"],
           "kinds": [(b.get("attention") or {}).get("kind") for b in r["blocks"]]}
    print(json.dumps(row, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)


if __name__ == "__main__":
    main()
