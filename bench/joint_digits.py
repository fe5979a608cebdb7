"""Joint one-shot allocation vs a uniform split, on the digits proxy.

The digits ViT (``_digits.trained_digits_vit``: 32 px, 64 patches, 4 blocks, trained dense) is compressed to
``--budget`` of its FLOPs by one-shot tokens (``method: attention``, default stages) plus one-shot Taylor widths
(heads + MLP units), then fine-tuned ``--steps`` steps with distillation, three ways:

* ``joint``: ``tokens.keep`` empty, the split chosen by ``vitgraph.axes.joint`` (least output distortion on a
  calibration batch over shares 0, 1/8, ..., 1 of the reduction);
* ``uniform``: the same machinery held to share 1/2 (each axis takes half of the reduction);
* ``tokens``/``width`` alone at the same budget, for reference.

Prints top-1 per seed and the mean; the seed moves the fine-tuning order (the dense model is the same).

    python bench/joint_digits.py --seeds 0,1,2 [--budget 0.5] [--steps 150] [--json OUT]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics


from _digits import trained_digits_vit

BOTH = {"width": {"method": "taylor", "heads": True, "mlp": True}, "tokens": {"method": "attention"}}


def run(model, data, example, spec: dict, share: float | None) -> tuple[float, float, dict]:
    import vitgraph as vg
    from vitgraph.axes import joint

    original = joint.split
    if share is not None:  # hold the joint machinery to one candidate share
        joint.split = lambda *a, **k: original(*a, **{**k, "shares": (share,)})
    try:
        r = vg.compress(copy.deepcopy(model), spec, example_inputs=example, data=data, progress=False,
                        latency_targets=())
    finally:
        joint.split = original
    rep = r.report
    return 100 * rep["compressed"]["top1"], rep["compressed"]["flops"] / rep["dense"]["flops"], \
        rep["budget"].get("split", {})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--dense-steps", type=int, default=600)
    p.add_argument("--json")
    args = p.parse_args()
    model, data, example = trained_digits_vit(args.dense_steps)
    ways = {"joint": (BOTH, None), "uniform": (BOTH, 0.5),
            "tokens": ({"width": {"heads": False, "mlp": False}, "tokens": {"method": "attention"}}, None),
            "width": ({"width": BOTH["width"]}, None)}
    rows: dict[str, list] = {w: [] for w in ways}
    for seed in (int(s) for s in args.seeds.split(",")):
        for way, (axes, share) in ways.items():
            spec = {"budget": {"flops": args.budget}, **copy.deepcopy(axes),
                    "train": {"steps": args.steps, "batch_size": 64, "lr": 5e-4, "seed": seed}}
            top1, frac, split = run(model, data, example, spec, share)
            rows[way].append({"seed": seed, "top1": top1, "flops": frac, "split": split})
            print(f"seed {seed} {way:8s} top-1 {top1:6.2f} %  FLOPs {frac:.3f}  split {split}", flush=True)
    print("\n| way | " + " | ".join(f"seed {r['seed']}" for r in rows["joint"]) + " | mean |")
    print("|---" * (len(rows["joint"]) + 2) + "|")
    for way, rs in rows.items():
        print(f"| {way} | " + " | ".join(f"{r['top1']:.2f}" for r in rs)
              + f" | **{statistics.mean(r['top1'] for r in rs):.2f}** |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
