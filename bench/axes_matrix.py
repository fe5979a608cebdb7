"""Axes x axes, one-shot: does every pair of the one-shot axes land on one model under one budget?

For each pair (and each axis alone, the diagonal, and all six together) of heads, value dims, MLP units,
embedding channels (width ``magnitude``), blocks (``depth.skip_blocks``) and tokens (``method: attention``,
``tokens.keep`` empty: the joint split decides), ``vg.compress`` runs with ``--data none`` at one FLOPs
budget; a cell is the achieved fraction (each run checked by ``compress``: gated == compact parity, the
fraction within the budget's tolerance) or the refusal. Prints a markdown matrix.

    python bench/axes_matrix.py [--model deit_small_patch16_224] [--budget 0.7] [--out bench/axes_matrix.md]
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch

AXES = ("heads", "head_dim", "mlp", "embed", "depth", "tokens")


def spec_for(axes: set[str], budget: float) -> dict:
    width = {k: k in axes for k in ("heads", "head_dim", "mlp", "embed")}
    spec = {"budget": {"flops": budget},
            "width": {"method": "magnitude", **width},
            "depth": {"skip_blocks": "depth" in axes}}
    if "tokens" in axes:
        spec["tokens"] = {"method": "attention"}
    return spec


def cell(model: torch.nn.Module, size: tuple[int, ...], axes: set[str], budget: float) -> str:
    import copy

    import vitgraph as vg
    from vitgraph.errors import VitgraphError

    try:
        r = vg.compress(copy.deepcopy(model), spec_for(axes, budget), example_inputs=(torch.randn(2, *size),),
                        data="none", progress=False, latency_targets=())
    except VitgraphError as exc:
        return f"refused: {str(exc).splitlines()[0][:60]}"
    frac = r.report["compressed"]["flops"] / r.report["dense"]["flops"]
    split = r.report.get("budget", {}).get("split")
    extra = f" (tokens {split['tokens']:.2f})" if split and len(axes) > 1 and "tokens" in split else ""
    return f"{frac:.3f}{extra}"


def main() -> None:
    import timm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--budget", type=float, default=0.7)
    p.add_argument("--out")
    args = p.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    cells: dict[tuple[str, str], str] = {}
    t0 = time.perf_counter()
    for a, b in itertools.combinations_with_replacement(AXES, 2):
        cells[a, b] = cells[b, a] = cell(model, size, {a, b}, args.budget)
        print(f"{a} + {b}: {cells[a, b]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    every = cell(model, size, set(AXES), args.budget)
    lines = [f"{args.model}, FLOPs budget {args.budget}, one-shot, random weights, `--data none` "
             f"(`python bench/axes_matrix.py`); cell: achieved FLOPs fraction (tokens' share of the "
             f"reduction where the joint split decided it)\n",
             "| | " + " | ".join(AXES) + " |", "|---" * (len(AXES) + 1) + "|"]
    lines += [f"| {a} | " + " | ".join(cells[a, b] for b in AXES) + " |" for a in AXES]
    lines.append(f"\nAll six together: {every}. {time.perf_counter() - t0:.0f} s in all.")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
