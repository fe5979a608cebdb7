"""``vitgraph sweep``: one model compressed at a grid of budgets, per axis set, each point measured.

What it guarantees:

- The model is traced once; every point compresses that same ``VitGraph`` with the user's spec
  narrowed to one axis set (``axis_spec``) and its budget set to the point's. The budget varied is
  ``budget.latency`` when the spec sets it (``budget.flops`` is then dropped, so no FLOPs ceiling
  fights the latency targets), else ``budget.flops``.
- Every point is recorded, never lost to a crash of the sweep: ``ok`` with its FLOPs fraction,
  parameters, top-1 and latency (dense and compact timed interleaved on each ``--targets`` runtime at
  ``--latency-batch``), or ``refused`` with the ``SpecError`` that said why (a budget the axis set
  cannot reach, an axis set that needs training under ``train.steps: 0``).
- ``OUT/sweep.json`` is rewritten atomically after every point; a rerun into the same folder with
  the same model, spec, data, targets and batch skips the points it holds, and a different sweep
  there is refused rather than mixed in.
- ``OUT/sweep.md`` tabulates the points and ``OUT/sweep.png`` plots one curve per axis set: x the
  measured latency ratio on the first target, y top-1 with data or the FLOPs fraction without.
  Torch-Pruning is not plotted, even where ``torch_pruning`` is installed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vitgraph.cli.common import load_graph, model_args, parse_targets
from vitgraph.errors import SpecError

AXIS_SETS = ("width", "depth", "tokens", "conv", "all")
# a sweep that was stopped resumes only into a file these header fields of agree with
IDENTITY = ("model", "dense", "spec", "data", "targets", "batch")


def register(sub: Any) -> None:
    """Add the ``sweep`` subcommand to ``vitgraph.cli.commands``'s subparsers, with ``func=run``."""

    s = sub.add_parser("sweep", help="compress at a grid of budgets per axis set; table and Pareto plot")
    s.add_argument("model")
    s.add_argument("--spec", required=True, help="the base spec; each axis set narrows it")
    s.add_argument("--budgets", required=True, help="A:B:STEP, B included, e.g. 0.5:0.9:0.1")
    s.add_argument("--axes", default="width,depth,tokens,all", help="axis sets: " + ",".join(AXIS_SETS))
    s.add_argument("--data", default="none", help="digits | imagefolder:PATH | none (no top-1, default)")
    s.add_argument("--out", required=True, help="folder for sweep.json, sweep.md, sweep.png")
    s.add_argument("--targets", default="onnx", help="latency measured on these; the first is the plot's x axis")
    s.add_argument("--latency-batch", type=int, default=1, help="batch size latency is measured at (default 1)")
    s.add_argument("--steps", type=int, help="override train.steps")
    s.add_argument("--quiet", action="store_true", help="no progress and no final table")
    model_args(s)
    s.set_defaults(func=run)


def parse_budgets(text: str) -> list[float]:
    """``A:B:STEP`` -> ``[A, A + STEP, ..., B]`` (B included within float tolerance), 0 < A <= B <= 1."""
    fix = "write A:B:STEP with 0 < A <= B <= 1 and STEP > 0, e.g. 0.5:0.9:0.1"
    try:
        a, b, step = (float(v) for v in text.split(":"))
    except ValueError:
        raise SpecError(f"--budgets {text!r} is not A:B:STEP; {fix}") from None
    if step <= 0 or a > b or not (0.0 < a and b <= 1.0):
        raise SpecError(f"--budgets {text!r} is out of range; {fix}")
    n = int((b - a) / step + 1e-9) + 1
    return [round(a + i * step, 6) for i in range(n)]


def parse_axes(text: str) -> tuple[str, ...]:
    """``--axes width,depth`` checked against ``AXIS_SETS``, duplicates dropped, order kept."""
    names = tuple(dict.fromkeys(a.strip() for a in text.split(",") if a.strip()))
    unknown = [a for a in names if a not in AXIS_SETS]
    if unknown or not names:
        raise SpecError(f"--axes {text!r}: unknown axis set(s) {unknown}; choose from {', '.join(AXIS_SETS)}")
    return names


def axis_spec(base: Any, axes: str, budget: float) -> Any:
    """``base`` (a ``Spec``) with only the axes of ``axes`` on and its budget at ``budget``."""
    from vitgraph.spec import PRESETS, Spec

    d = base.to_dict()
    if base.budget.latency is not None:
        d["budget"].update(latency=budget, flops=None)
    else:
        d["budget"]["flops"] = budget
    if axes == "all":
        return Spec.from_dict(d, source=f"sweep {axes}")
    if axes == "conv" and base.train.steps == 0:
        raise SpecError("axis set conv: attention.to_conv chooses between attention and convolutions by "
                        "training; set train.steps > 0 (or pass --steps N) and --data digits or imagefolder:PATH")
    if axes == "width":  # widths alone: heads and MLP units
        d["width"].update(heads=True, mlp=True, **({} if base.width.enabled else {"method": "magnitude"}))
    elif axes == "conv":
        d["width"].update(PRESETS["spvit_conv"]["width"], head_dim=False, embed=False)
    else:
        d["width"].update(heads=False, head_dim=False, mlp=False, embed=False)
    d["depth"].update(skip_blocks=axes == "depth", exits=[], exit=None)
    d["attention"]["to_conv"] = axes == "conv"
    d["tokens"]["enabled"] = axes == "tokens"
    if axes == "tokens":  # alone, the budget sets the ratios
        d["tokens"]["keep"] = []
    if axes == "tokens" and base.train.steps == 0:
        d["tokens"]["method"] = "attention"
    return Spec.from_dict(d, source=f"sweep {axes}")


def run(args: argparse.Namespace) -> int:
    """Run (or resume) the sweep ``args`` describe; writes sweep.json, sweep.md and sweep.png."""
    from vitgraph.train.data import check_source, load_data
    from vitgraph.analysis.graph import require_vit
    from vitgraph.spec import Spec

    budgets, axis_sets, targets = parse_budgets(args.budgets), parse_axes(args.axes), parse_targets(args.targets)
    if not targets:
        raise SpecError("--targets is empty; name one or more of eager, compile, onnx (the first is the plot's x axis)")
    if args.latency_batch < 1:
        raise SpecError(f"--latency-batch must be a positive batch size, got {args.latency_batch}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SpecError(f"--out {out} is a file; sweep writes sweep.json, sweep.md and sweep.png into a folder. "
                        "Name a new or existing folder instead.")
    base = Spec.load(args.spec)
    if args.steps is not None:
        if args.steps < 0:
            raise SpecError(f"--steps {args.steps} is negative; pass 0 (one-shot) or a number of training steps")
        base = dataclasses.replace(base, train=dataclasses.replace(base.train, steps=args.steps))
    check_source(args.data)  # before the model is built and traced
    g = load_graph(args, args.model)
    require_vit(g)
    doc = {"model": g.name, "dense": {"flops": g.structure.flops, "params": g.structure.params,
                                      "input_size": list(g.input_size)},
           "spec": base.to_dict(), "budget_kind": base.budget.metric, "data": args.data,
           "targets": list(targets), "batch": args.latency_batch, "points": []}
    doc = json.loads(json.dumps(doc))  # compared as a reread file is: lists, not tuples
    path = out / "sweep.json"
    doc["points"] = _resumed(path, doc)
    done = {_key(p["axes"], p["budget"]) for p in doc["points"]}
    data = load_data(args.data, tuple(g.input_size), base.train.batch_size, seed=base.train.seed)
    out.mkdir(parents=True, exist_ok=True)
    timer = _Timer(g, targets, args.latency_batch)
    for axes in axis_sets:
        for budget in budgets:
            if _key(axes, budget) in done:
                continue
            point = _point(g, base, axes, budget, data, timer, args)
            doc["points"].append(point)
            _write_json(path, doc)
            if not args.quiet:
                print(f"sweep {axes} @ {budget:g}: {point['status']} ({point['seconds']:.1f} s)", flush=True)
    write_markdown(doc, out / "sweep.md")
    plot(doc, out / "sweep.png")
    if not args.quiet:
        _print_table(doc)
        print(f"wrote sweep.json, sweep.md, sweep.png to {out}")
    return 0


def _key(axes: str, budget: float) -> tuple[str, float]:
    return axes, round(float(budget), 4)


def _resumed(path: Path, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The points of an earlier run of this same sweep at ``path``; none when there is no file."""
    if not path.exists():
        return []
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SpecError(f"{path} is not a sweep.json this command can resume ({exc}); use a new --out or delete "
                        f"{path}") from None
    differ = [k for k in IDENTITY if not isinstance(old, dict) or old.get(k) != doc[k]]
    if differ:
        raise SpecError(f"{path} holds another sweep (its {', '.join(differ)} differ from this one's); use a new "
                        f"--out or delete {path} to start over")
    return list(old.get("points", []))


def _point(g: Any, base: Any, axes: str, budget: float, data: Any, timer: _Timer,
           args: argparse.Namespace) -> dict[str, Any]:
    """Compress and measure one point; a ``SpecError`` makes it ``refused`` with the error's message."""
    from vitgraph import pipeline

    t0 = time.perf_counter()
    point: dict[str, Any] = {"axes": axes, "budget": budget, "status": "ok", "reason": None, "flops": None,
                             "params": None, "top1": None, "latency": {}, "seconds": None}
    try:
        spec = axis_spec(base, axes, budget)
        with warnings.catch_warnings():
            if not getattr(args, "debug", False):  # as `vitgraph` without --debug: progress, not warnings
                warnings.simplefilter("ignore")
            result = pipeline.compress(g, spec, data=data, out_dir=None, progress=not args.quiet,
                                       latency_targets=())
    except SpecError as exc:
        point.update(status="refused", reason=str(exc))
    else:
        dense, compressed = result.report["dense"], result.report["compressed"]
        point.update(flops=compressed["flops"] / dense["flops"],
                     params={"dense": dense["params"], "compressed": compressed["params"]},
                     top1={"dense": dense["top1"], "compressed": compressed["top1"]},
                     latency=timer(result.compact, result.gated.serving_batch))
    point["seconds"] = round(time.perf_counter() - t0, 3)
    return point


class _Timer:
    """Times compact models against the dense one, interleaved, per target; the dense runners (an ONNX
    export each) are built once per batch size and shared by every point."""

    def __init__(self, g: Any, targets: tuple[str, ...], batch: int) -> None:
        self.example = tuple(x[:1] for x in g.example_inputs)
        self.dense_gm, self.targets, self.batch = g.gm, targets, batch
        self.dense: dict[int, dict[str, Callable[[], Any]]] = {}

    def __call__(self, compact: Any, serving_batch: int | None) -> dict[str, dict[str, float]]:
        """``{target: {dense_ms, compressed_ms, ratio, batch}}``; a compact graph that serves one batch size
        only (per-image token counts) is timed, with the dense one, at that batch."""
        from vitgraph.cost.profile import measure_ratio
        from vitgraph.targets import bench

        batch = serving_batch or self.batch
        if batch not in self.dense:
            self.dense[batch] = bench.runners(self.dense_gm, self.example, batch=batch, targets=self.targets,
                                              name="dense")
        mine = bench.runners(compact, self.example, batch=batch, targets=self.targets, name="compressed")
        out = {}
        for t in self.targets:
            ratio, dense_ms, compact_ms = measure_ratio(self.dense[batch][t], mine[t])
            out[t] = {"dense_ms": round(dense_ms, 4), "compressed_ms": round(compact_ms, 4),
                      "ratio": round(ratio, 4), "batch": batch}
        return out


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write-then-rename in the same folder: a killed sweep leaves the previous file, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def table_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and one row per point: axes, budget, FLOPs, latency ratio per target, top-1, status."""
    head = ["axes", f"budget ({doc['budget_kind']})", "FLOPs",
            *(f"latency {t}" for t in doc["targets"]), "top-1", "status"]
    rows = []
    for p in doc["points"]:
        top1 = (p["top1"] or {}).get("compressed")
        rows.append([p["axes"], f"{p['budget']:.2f}", "-" if p["flops"] is None else f"{p['flops']:.3f}",
                     *(f"{p['latency'][t]['ratio']:.3f}" if t in p["latency"] else "-" for t in doc["targets"]),
                     "-" if top1 is None else f"{100 * top1:.2f}%", p["status"]])
    return head, rows


def write_markdown(doc: dict[str, Any], path: Path) -> Path:
    """``sweep.md``: the table, then why each refused point was refused."""
    head, rows = table_rows(doc)
    lines = [f"# Sweep of {doc['model']}", "",
             f"FLOPs and latency are fractions of the dense model's (latency at batch {doc['batch']}).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    refused = [p for p in doc["points"] if p["status"] == "refused"]
    if refused:
        lines += ["", "## Refused", ""]
        lines += [f"- {p['axes']} @ {p['budget']:g}: {p['reason']}" for p in refused]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def plot(doc: dict[str, Any], path: Path) -> Path:
    """``sweep.png``: per axis set, measured latency ratio on the first target against top-1 (with data)
    or the FLOPs fraction (without); the dense model is the star at (1, its value)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

    first = doc["targets"][0]
    ok = [p for p in doc["points"] if p["status"] == "ok"]
    with_top1 = any((p["top1"] or {}).get("compressed") is not None for p in ok)

    def y(p: dict[str, Any], which: str = "compressed") -> float:
        return p["top1"][which] if with_top1 else (p["flops"] if which == "compressed" else 1.0)

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    for axes in dict.fromkeys(p["axes"] for p in ok):
        xs, ys = zip(*sorted((p["latency"][first]["ratio"], y(p)) for p in ok if p["axes"] == axes))
        ax.plot(xs, ys, marker="o", label=axes)
    ax.scatter([1.0], [y(ok[0], "dense") if ok else 1.0], marker="*", s=160, color="black", zorder=3,
               label="dense")
    what = "top-1" if with_top1 else "FLOPs (fraction of dense)"
    ax.set_xlabel(f"latency on {first}, batch {doc['batch']} (fraction of dense)")
    ax.set_ylabel(what)
    ax.set_title(f"{doc['model']}: {what.split(' ')[0]} against measured latency")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
    return path


def _print_table(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    head, rows = table_rows(doc)
    table = Table(title=f"sweep of {doc['model']}")
    for col in head:
        table.add_column(col)
    for r in rows:
        table.add_row(*r)
    Console().print(table)
