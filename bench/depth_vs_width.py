"""Width vs depth vs both, at the same FLOPs budget, on the demo's digits ViT.

One dense DeiT (16x16x1, patch 4, embed 128, depth 4; ``vitgraph.cli.demo.demo_model``) is trained once on
scikit-learn's digits, then compressed three ways to ``--flops`` of its dense FLOPs, each with the same
learned search + distillation fine-tuning (``--steps``, 30 % search):

* width: WDPruning head and MLP-unit masks (align 16);
* depth: UVC block gates only (whole blocks; with 4 blocks only ~0.5 or ~0.75 are reachable);
* both:  width masks and block gates under one budget.

Dense and the three compact models are lowered to ONNX and timed interleaved in one ``measure()`` call
per batch size (ONNX Runtime, batch 1 and 16; medians). Top-1 is on the digits val split. Prints a
markdown table; a budget the variant cannot reach prints as ``unreachable: <SpecError>``::

    PYTHONPATH=. .venv/bin/python bench/depth_vs_width.py                     # 0.5 FLOPs, 1000 steps
    PYTHONPATH=. .venv/bin/python bench/depth_vs_width.py --flops 0.75 --json dvw.json
    PYTHONPATH=. .venv/bin/python bench/depth_vs_width.py --steps 50 --dense-steps 100   # quick smoke run
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

import torch
from torch import nn

import vitgraph as vg
from vitgraph.train.data import Data, load_data
from vitgraph.cli.demo import DENSE_STEPS, INPUT, demo_model
from vitgraph.spec import Train
from vitgraph.targets import bench
from vitgraph.train.loop import evaluate, fit

WIDTH = {"method": "wdpruning", "heads": True, "mlp": True, "align": 16}
VARIANTS: dict[str, dict[str, Any]] = {
    "width": {"width": WIDTH},
    "depth": {"width": {"heads": False, "mlp": False}, "depth": {"skip_blocks": True}},
    "both": {"width": WIDTH, "depth": {"skip_blocks": True}},
}
BATCHES = {1: 50, 16: 20}   # batch -> timed rounds, as the demo


def train_dense(data: Data, steps: int) -> nn.Module:
    torch.manual_seed(0)
    model = demo_model()
    fit(model, data.train, Train(steps=steps, batch_size=64, lr=2e-3, warmup_steps=30, seed=0), progress=False)
    return model.eval()


def compress(dense: nn.Module, variant: str, flops: float, steps: int, data: Data,
             example: tuple[torch.Tensor, ...]) -> vg.Result | str:
    """The compressed Result, or the SpecError message when this variant cannot reach the budget."""
    spec = {**VARIANTS[variant], "budget": {"flops": flops},
            "train": {"steps": steps, "search": 0.3, "batch_size": 64, "lr": 5e-4}}
    torch.manual_seed(0)  # every variant starts from the same RNG state, whatever ran before it
    try:
        return vg.compress(copy.deepcopy(dense), spec, example_inputs=example, data=data,
                           name=f"deit digits ({variant})", progress=False, latency_targets=())
    except vg.SpecError as err:
        return f"unreachable: {err}"


def latency(models: dict[str, nn.Module], example: tuple[torch.Tensor, ...]) -> dict[int, dict[str, float]]:
    """ORT median ms per batch, all models in one interleaved measure() so load drift hits them alike."""
    out = {}
    for batch, repeats in BATCHES.items():
        runners = {label: bench.runners(m, example, batch=batch, targets=("onnx",), name=label)["onnx"]
                   for label, m in models.items()}
        out[batch] = {k: t.median_ms for k, t in bench.measure(runners, repeats=repeats).items()}
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = ["variant", "GFLOPs", "x dense FLOPs", "params (M)", "blocks", "ORT ms b1", "speed-up b1",
            "ORT ms b16", "speed-up b16", "top-1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dense = rows[0]
    for r in rows:
        if "error" in r:
            cells = [r["variant"], r["error"]] + [""] * (len(head) - 2)
        else:
            cells = [r["variant"], f"{r['flops'] / 1e9:.4f}", f"{r['flops_frac']:.3f}", f"{r['params'] / 1e6:.3f}",
                     str(r["blocks"]), f"{r['ms_b1']:.3f}", f"{dense['ms_b1'] / r['ms_b1']:.2f}x",
                     f"{r['ms_b16']:.3f}", f"{dense['ms_b16'] / r['ms_b16']:.2f}x", f"{100 * r['top1']:.2f} %"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops", type=float, default=0.5, help="target fraction of dense FLOPs")
    parser.add_argument("--steps", type=int, default=1000, help="compression steps (search + fine-tune)")
    parser.add_argument("--dense-steps", type=int, default=DENSE_STEPS, help="dense training steps")
    parser.add_argument("--json", metavar="PATH", help="dump every figure here")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    torch.manual_seed(0)
    data = load_data("digits", INPUT, 64, seed=0)
    example = (torch.randn(2, *INPUT),)
    dense = train_dense(data, args.dense_steps)
    dense_g = vg.trace(copy.deepcopy(dense), example, name="deit digits (dense)")
    results = {v: compress(dense, v, args.flops, args.steps, data, example) for v in VARIANTS}
    compact = {v: r.compact for v, r in results.items() if not isinstance(r, str)}
    ms = latency({"dense": dense_g.gm, **compact}, example)

    rows: list[dict[str, Any]] = [{
        "variant": "dense", "flops": dense_g.structure.flops, "flops_frac": 1.0, "params": dense_g.structure.params,
        "blocks": len(dense_g.structure.blocks), "top1": evaluate(dense_g.gm, data.val, 64)}]
    for v, r in results.items():
        if isinstance(r, str):
            rows.append({"variant": v, "error": r})
            continue
        rep = r.report
        rows.append({"variant": v, "flops": rep["compressed"]["flops"],
                     "flops_frac": rep["compressed"]["flops"] / rep["dense"]["flops"],
                     "params": rep["compressed"]["params"], "blocks": len(r.compressed.structure.blocks),
                     "top1": rep["compressed"]["top1"], "removed_blocks": rep["depth"]["removed_blocks"],
                     "kept": rep.get("kept", {}), "budget": rep["budget"]})
    for row in rows:
        if "error" not in row:
            row["ms_b1"], row["ms_b16"] = ms[1][row["variant"]], ms[16][row["variant"]]

    print(f"digits ViT, budget {args.flops} of dense FLOPs, {args.steps} compression steps "
          f"({args.dense_steps} dense); ORT, {torch.get_num_threads()} threads, interleaved medians\n")
    print(table(rows))
    print(f"\ndone in {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"flops": args.flops, "steps": args.steps, "dense_steps": args.dense_steps, "rows": rows},
                      f, indent=2)


if __name__ == "__main__":
    main()
