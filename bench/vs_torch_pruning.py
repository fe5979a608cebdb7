"""Torch-Pruning (TP) against vitgraph at the same FLOPs target: where each lands, how fast each runs, how accurate.

TP follows its own timm ViT recipe (examples/transformers/prune_timm_vit.py): a ``BasePruner`` (alias
``MetaPruner``) with group L2 magnitude importance, whole heads removed (``prune_num_heads``, head ratio =
channel ratio), uniform per-layer ratios, the classifier ignored, then each timm ``Attention``'s
``num_heads``/``head_dim``/``attn_dim`` patched by hand. Its ratio is bisected until its FLOPs
(``FlopCounterMode`` on the math SDPA kernel, 2 x MACs) land on the target. vitgraph uses ``vg.compress``
(one-shot magnitude: heads, value dims, MLP units and embedding channels, allocated across layers). Both
compact models are timed beside the dense one, interleaved, in eager PyTorch and ONNX Runtime (spinning
off); efficiency = speed-up / (dense FLOPs / compact FLOPs). On a small digits ViT both are fine-tuned with
the same steps and distillation and their top-1 compared over seeds (mean, min..max); the learned vitgraph
methods spend half their steps searching. The timed model keeps random weights (no network; timing does
not depend on them). Needs ``pip install -e '.[bench]'``::

    python bench/vs_torch_pruning.py --flops 0.5 --batches 1,16 --json vs_tp.json
    python bench/vs_torch_pruning.py --only tp --skip-digits     # TP alone (no vitgraph pipeline)
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import timm
import torch
from timm.models.vision_transformer import Attention
from torch import nn

import vitgraph as vg
from vitgraph.analysis.cost import flop_counter_flops
from vitgraph.targets import bench

try:
    import torch_pruning as tp
except ImportError:
    sys.exit("bench/vs_torch_pruning.py needs Torch-Pruning: pip install -e '.[bench]'  "
             "(or: pip install torch-pruning)")


def flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs per image (2 x multiply-adds) by ``FlopCounterMode`` on the math SDPA kernel (the fused one counts 0)."""
    return flop_counter_flops(model, (x[:1],), 1)


def tp_prune(model: nn.Module, x: torch.Tensor, ratio: float, *, heads: bool = True, round_to: int = 1) -> nn.Module:
    """TP's timm ViT recipe on a copy: heads (or, with ``heads=False``, TP's default head dims) + channels."""
    model = copy.deepcopy(model).eval()
    num_heads = {m.qkv: m.num_heads for m in model.modules() if isinstance(m, Attention)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model, x[:1], importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
            ignored_layers=[model.get_classifier()], num_heads=num_heads, prune_num_heads=heads,
            prune_head_dims=not heads, head_pruning_ratio=ratio if heads else 0.0, round_to=round_to)
        for group in pruner.step(interactive=True):
            group.prune()
    for m in model.modules():  # reshape sizes live in Python attributes, so TP's example patches them
        if isinstance(m, Attention):
            m.num_heads = pruner.num_heads[m.qkv]
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            m.attn_dim = m.num_heads * m.head_dim  # newer timm reshapes with attn_dim; m.scale is left as TP leaves it
    return model


def tp_at_budget(model: nn.Module, x: torch.Tensor, target: float, round_to: int = 1,
                 steps: int = 14) -> tuple[nn.Module, float, float]:
    """Bisect TP's ratio until its FLOPs fraction is closest to ``target``; returns (model, ratio, fraction)."""
    dense = flops(model, x)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(steps):
        ratio = (lo + hi) / 2
        pruned = tp_prune(model, x, ratio, round_to=round_to)
        frac = flops(pruned, x) / dense
        if best is None or abs(frac - target) < abs(best[2] - target):
            best = (pruned, ratio, frac)
        lo, hi = (ratio, hi) if frac > target else (lo, ratio)
    assert best is not None
    return best


# heads, value dims, MLP units and the stream, ranked across layers (examples/specs/width_full.yaml)
VG_WIDTH = {"heads": True, "mlp": True, "head_dim": True, "embed": True, "allocation": "global"}


def vg_compress(model: nn.Module, x: torch.Tensor, target: float, data: str = "none", steps: int = 0,
                batch_size: int = 64, method: str = "magnitude", width: dict[str, Any] | None = None,
                seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    spec: dict[str, Any] = {"budget": {"flops": target}, "width": {"method": method, **(width or VG_WIDTH)}}
    if steps:
        spec["train"] = {"steps": steps, "batch_size": batch_size, "seed": seed}
    result = vg.compress(model, vg.Spec.from_dict(spec), example_inputs=(x[:1],), data=data, progress=False,
                         latency_targets=())  # this script times both sides itself
    return result.compact, result.report


def fused_vs_unfused(model: nn.Module, x: torch.Tensor) -> float | None:
    """Max |SDPA output - explicit softmax(q k^T * self.scale) v output| of a timm ViT (None if no timm Attention)."""
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    if not attns:
        return None
    outs = []
    with torch.no_grad():
        for fused in (True, False):
            for m in attns:
                m.fused_attn = fused
            outs.append(model(x))
    for m in attns:
        m.fused_attn = True
    return (outs[0] - outs[1]).abs().max().item()


def shape(model: nn.Module) -> str:
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    if not attns:
        return ""
    a, fc1 = attns[0], next(m.fc1 for m in model.modules() if hasattr(m, "fc1"))
    return f"embed {a.qkv.in_features}, heads {a.num_heads}x{a.head_dim}, mlp {fc1.out_features} (block 0)"


def speed(models: dict[str, nn.Module], x: torch.Tensor, batches: list[int], repeats: int,
          targets: tuple[str, ...] = ("eager", "onnx")) -> list[dict[str, Any]]:
    """Every model on every target, all interleaved per batch; one row per (compact model, target, batch)."""
    fl = {name: flops(m, x) for name, m in models.items()}
    rows = []
    with tempfile.TemporaryDirectory(prefix="vs-tp-") as workdir:
        for batch in batches:
            run: dict[str, Callable[[], Any]] = {}
            for name, m in models.items():
                for t, fn in bench.runners(m, (x[:1],), batch=batch, targets=targets, workdir=workdir,
                                           name=name, atol=1e-3).items():
                    run[f"{name}/{t}"] = fn
            ms = {k: v.median_ms for k, v in bench.measure(run, repeats=repeats).items()}
            for name in list(models)[1:]:
                for t in targets:
                    up = ms[f"dense/{t}"] / ms[f"{name}/{t}"]
                    ratio = fl["dense"] / fl[name]
                    rows.append(dict(model=name, flops=fl[name] / fl["dense"], target=t, batch=batch,
                                     dense_ms=ms[f"dense/{t}"], compact_ms=ms[f"{name}/{t}"], speedup=up,
                                     efficiency=up / ratio))
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'model':<10}{'FLOPs':>7}{'target':>8}{'batch':>6}{'dense ms':>10}{'compact ms':>12}{'speed-up':>10}"
          f"{'efficiency':>12}")
    for r in rows:
        print(f"{r['model']:<10}{r['flops']:>7.3f}{r['target']:>8}{r['batch']:>6}{r['dense_ms']:>10.2f}"
              f"{r['compact_ms']:>12.2f}{r['speedup']:>9.2f}x{r['efficiency']:>12.2f}")


def digits_seed(args: argparse.Namespace, seed: int) -> dict[str, float]:
    """One seed: train a small digits ViT dense, prune every way to the budget, fine-tune alike, top-1 of each."""
    from vitgraph.train.data import load_data
    from vitgraph.spec import Spec
    from vitgraph.train.loop import evaluate, fit

    def cfg(steps: int, **extra: Any) -> Any:
        return Spec.from_dict({"train": {"steps": steps, "batch_size": args.batch_size, "seed": seed, **extra}}).train

    torch.manual_seed(seed)
    dense = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1, num_classes=10,
                              embed_dim=192, depth=6, num_heads=3)
    data = load_data("digits", (1, 32, 32), args.batch_size)
    fit(dense, data.train, cfg(args.dense_steps, lr=2e-3, warmup_steps=30), progress=False)  # vitgraph demo's recipe
    dense.eval()
    x = torch.randn(1, 1, 32, 32)
    top1 = {"dense": evaluate(dense, data.val)}
    tp_model, ratio, frac = tp_at_budget(dense, x, args.flops, args.tp_round_to)
    top1["tp_oneshot"] = evaluate(tp_model, data.val)
    fit(tp_model, data.train, cfg(args.steps), teacher=dense, progress=False)  # same loss, KD and schedule as vitgraph
    top1["tp"], top1["tp_flops"] = evaluate(tp_model, data.val), frac
    if args.only == "tp":
        return top1
    width = json.loads(args.vg_width)
    runs = {"vitgraph_oneshot": ("magnitude", "none", 0), "vitgraph": ("magnitude", "digits", args.steps),
            **{f"vitgraph_{m}": (m, "digits", args.steps) for m in args.learned.split(",") if m}}
    for key, (method, data_name, steps) in runs.items():  # learned methods: half the steps search, half fine-tune
        compact, _ = vg_compress(dense, x, args.flops, data=data_name, steps=steps, batch_size=args.batch_size,
                                 method=method, width=width, seed=seed)
        top1[key] = evaluate(compact, data.val)
        top1[f"{key}_flops"] = flops(compact, x) / flops(dense, x)
    return top1


def digits(args: argparse.Namespace) -> dict[str, Any]:
    """Every seed of ``digits_seed``, then mean and spread (min..max) per column."""
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [digits_seed(args, seed) for seed in seeds]
    print(f"\ndigits ViT ({args.dense_steps} dense steps from random init; {args.steps} fine-tune steps each, "
          f"KD from dense; vitgraph width {args.vg_width}); top-1 on the held-out split over seeds {seeds}")
    summary: dict[str, Any] = {"seeds": seeds, "runs": runs}
    for key in runs[0]:
        vals = [r[key] for r in runs]
        mean = sum(vals) / len(vals)
        summary[key] = {"mean": mean, "min": min(vals), "max": max(vals)}
        print(f"  {key:<24} {mean:.4f}  ({min(vals):.4f} .. {max(vals):.4f})")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--flops", type=float, default=0.5, help="target fraction of dense FLOPs")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--skip-digits", action="store_true", help="no training / top-1 comparison")
    parser.add_argument("--only", choices=("tp", "both"), default="both", help="tp: skip vitgraph entirely")
    parser.add_argument("--steps", type=int, default=150, help="fine-tune steps after pruning (digits)")
    parser.add_argument("--dense-steps", type=int, default=300, help="dense training steps (digits)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds for the digits comparison")
    parser.add_argument("--vg-width", default=json.dumps(VG_WIDTH), help="vitgraph's width keys (JSON)")
    parser.add_argument("--learned", default="wdpruning,uvc", help="learned vitgraph methods to run (comma-separated)")
    parser.add_argument("--tp-round-to", type=int, default=1, help="TP channel rounding (its ViT recipe: 1)")
    parser.add_argument("--json", metavar="OUT", help="write every figure here")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)

    model = timm.create_model(args.model).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    dense_flops = flops(model, x)
    tp_model, ratio, frac = tp_at_budget(model, x, args.flops, args.tp_round_to)
    print(f"{args.model}: dense {dense_flops / 1e9:.2f} GFLOPs; torch threads {torch.get_num_threads()}")
    print(f"  TP (ratio {ratio:.4f}, heads removed with ceil(ratio x heads)) lands at {frac:.3f}: {shape(tp_model)}")
    out: dict[str, Any] = {"model": args.model, "target": args.flops, "tp_ratio": ratio, "tp_flops": frac}
    models: dict[str, nn.Module] = {"dense": model, "tp": tp_model}
    if args.only != "tp":
        compact, report = vg_compress(model, x, args.flops)
        out["vitgraph_flops"] = flops(compact, x) / dense_flops
        b0 = report["blocks"][0]
        embed = vg.trace(compact, (x,)).structure.tokens.embed_dim
        print(f"  vitgraph lands at {out['vitgraph_flops']:.3f} (report {report['budget']['achieved']:.3f}): embed "
              f"{embed}, heads {b0['attention']['heads']}x"
              f"{b0['attention']['head_dim']}, mlp {b0['mlp']['hidden']} (block 0)")
        models["vitgraph"] = compact

    xs = torch.randn(4, *x.shape[1:])
    out["tp_fused_vs_unfused"] = fused_vs_unfused(tp_model, xs)
    head_dims = tp_prune(model, x, ratio, heads=False, round_to=args.tp_round_to)  # TP's default mode, same ratio
    out["tp_headdim_fused_vs_unfused"] = fused_vs_unfused(head_dims, xs)
    with torch.no_grad():
        scale = model(xs).abs().max().item()
    print(f"  TP fused vs unfused attention, max |diff| (outputs up to {scale:.3g}): heads recipe "
          f"{out['tp_fused_vs_unfused']:.2e}; head-dim mode ({shape(head_dims)}) "
          f"{out['tp_headdim_fused_vs_unfused']:.2e}  <- m.scale stays 1/sqrt(old head_dim) there")

    rows = speed(models, x, batches, args.repeats)
    print()
    print_table(rows)
    out["speed"] = rows
    if not args.skip_digits:
        out["digits"] = digits(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)


if __name__ == "__main__":
    main()
