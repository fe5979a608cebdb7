"""Does token pruning keep accuracy? The digits ViT at 32 px, dense vs tokens at 60 % of its FLOPs.

The model is the issue's digits ViT (deit_tiny layout, 32 px, patch 4: 64 patches, embed 128, 4 blocks,
4 heads), trained dense on scikit-learn's digits as the demo trains its own. Then, at ``--flops``, with
selectors at the default L/4, L/2, 3L/4 stages and ratios from the budget: ``tokens.method: attention``
one-shot and fine-tuned, and ``preset: spvit_tokens`` (learned selectors), both with the demo's
compression budget (``--finetune-steps`` steps, 30 % of them searching for the learned method)::

    python bench/tokens_digits.py --flops 0.6 --dense-steps 600 --finetune-steps 1000
"""
from __future__ import annotations

import argparse
import json

import vitgraph as vg
from _digits import trained_digits_vit
from vitgraph.train.loop import evaluate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops", type=float, default=0.6)
    parser.add_argument("--dense-steps", type=int, default=600)
    parser.add_argument("--finetune-steps", type=int, default=1000)
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)

    model, data, example = trained_digits_vit(args.dense_steps)
    rows = {"dense": {"flops": 1.0, "top1": evaluate(model, data.val)}}
    train = {"batch_size": 64, "lr": 5e-4, "search": 0.3}
    runs = {"tokens one-shot": {"tokens": {"method": "attention", "enabled": True}, "train": {"steps": 0}},
            "tokens + fine-tune": {"tokens": {"method": "attention", "enabled": True},
                                   "train": {**train, "steps": args.finetune_steps}},
            "spvit_tokens": {"preset": "spvit_tokens", "train": {**train, "steps": args.finetune_steps}}}
    for label, spec in runs.items():
        spec = {**spec, "budget": {"flops": args.flops}}
        result = vg.compress(model, spec, example_inputs=example, data=data, progress=False, latency_targets=())
        rows[label] = {"flops": result.report["budget"]["achieved"], "top1": result.report["compressed"]["top1"],
                       "kept_tokens": result.report["tokens"]["kept_tokens"]}
        print(label, rows[label], flush=True)
    for label, r in rows.items():
        print(f"{label:<20} FLOPs {r['flops']:.3f}  top-1 {100 * r['top1']:.2f} %  {r.get('kept_tokens', '')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
