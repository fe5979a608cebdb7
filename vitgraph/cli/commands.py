"""The ``vitgraph`` command line. Exit 0 on success, 2 on bad input with a one-paragraph error."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from vitgraph import __version__
from vitgraph.cli.common import load_graph, model_args, parse_targets
from vitgraph.errors import SpecError, VitgraphError, first_line
from vitgraph.cost.profile import SAMPLES
from vitgraph.spec import LATENCY_TARGETS


def cmd_inspect(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    g = load_graph(args, args.model)
    seconds = time.perf_counter() - t0
    if args.dot:
        from vitgraph.analysis.summary import write_dot
        written = write_dot(g, args.dot)
        if not args.json:
            print("wrote " + ", ".join(map(str, written)))
    if args.json:
        print(g.to_json(indent=2))
    else:
        print(g.summary())
        print(f"traced and analysed in {seconds:.2f} s; trace max abs error {g.trace_error:.2e}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vitgraph import targets

    if args.target == "onnx-int8":
        return _export_int8(args)
    if args.data != "none":
        raise SpecError(f"export --data feeds INT8 calibration and checks; --target {args.target} takes none. "
                        "Drop --data, or use --target onnx-int8.")
    g = load_graph(args, args.model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.target == "onnx":
        rep = targets.onnx.lower(g.gm, g.example_inputs, out, atol=args.atol)
    elif args.target == "pt2":
        rep = targets.export.lower(g.gm, g.example_inputs, out, atol=args.atol)
    else:
        _, rep = targets.compile.lower_with_report(g.gm, g.example_inputs, atol=args.atol)
    per = ", ".join(f"batch {b}: {e:.2e}" for b, e in getattr(rep, "per_batch", {}).items())
    where = f" -> {out}" if args.target != "compile" else ""
    print(f"{args.target}{where}: max abs error vs eager {rep.max_abs_err:.2e} ({per}), tolerance {args.atol:g}")
    return 0


def int8_options(args: argparse.Namespace) -> Any:
    """``--int8-mode``, ``--calibration``, ``--int8-tolerance`` as an Int8Config (SpecError when bad)."""
    from vitgraph.targets.int8 import Int8Config

    mode = None if args.int8_mode == "auto" else args.int8_mode
    if mode is not None and mode not in ("dynamic", "static"):
        raise SpecError(f"--int8-mode {args.int8_mode}: unknown quantization mode; choose auto (static with "
                        "--data, dynamic without), dynamic (int8 weights, no data) or static (QDQ, calibrated on "
                        "--data digits or imagefolder:PATH)")
    return Int8Config(mode=mode, method=args.calibration, tolerance=args.int8_tolerance)


def _export_int8(args: argparse.Namespace) -> int:
    from vitgraph.pipeline import int8_batches, int8_config
    from vitgraph.targets.int8 import lower_int8
    from vitgraph.train.data import check_source, load_data

    check_source(args.data)
    config = int8_config(int8_options(args), args.data != "none")  # static without data fails before the build
    g = load_graph(args, args.model)
    dataset = load_data(args.data, tuple(g.input_size), 64)
    calibration, evaluation = int8_batches(dataset) or (None, None)
    out = Path(args.out)
    rep = lower_int8(g.gm, g.example_inputs, out, data_batches=evaluation, calibration=calibration, config=config,
                     name=g.name)
    print(int8_summary(rep.to_dict(), out))
    return 0


def int8_summary(r: dict[str, Any], out: Path | str) -> str:
    """Two lines on an INT8 file: mode, what stayed fp32, agreement, top-1, latency and size against fp32."""
    calib = f" ({r['calibration']} calibration)" if r["calibration"] else ""
    top1 = r["top1"]
    acc = (f"; top-1 fp32 {100 * top1['fp32']:.2f} % -> int8 {100 * top1['int8']:.2f} %"
           if top1.get("fp32") is not None else "")
    lat, size = r["latency_ms"], r["bytes"]
    return (f"onnx-int8 -> {out}: {r['mode']}{calib}, plan {r['plan']}, fp32 ops {', '.join(r['fp32_ops']) or 'none'}\n"
            f"  top-1 agreement with fp32 {100 * r['agreement']:.1f} % on {r['checked_on']} (tolerance "
            f"{100 * r['tolerance']:.1f} %), max abs logit error {r['max_abs_err']:.3g}{acc}\n"
            f"  ORT batch 1: {lat['fp32']:.2f} ms -> {lat['int8']:.2f} ms; file {size['fp32'] / 1e6:.2f} MB -> "
            f"{size['int8'] / 1e6:.2f} MB")


def cmd_bench(args: argparse.Namespace) -> int:
    from vitgraph.targets import bench

    batches = [int(b) for b in args.batch_sizes.split(",")]
    target_names = parse_targets(args.targets)
    rows = []
    for ref in args.models:
        g = load_graph(args, ref)
        for b in batches:
            timings = bench.measure(bench.runners(g.gm, g.example_inputs, batch=b, targets=target_names,
                                                  name=ref.replace("/", "_").replace(":", "_")),
                                    repeats=args.repeats)
            for t, tm in timings.items():
                rows.append({"model": ref, "batch": b, "target": t, "median_ms": tm.median_ms,
                             "p25_ms": tm.p25_ms, "p75_ms": tm.p75_ms, "n": tm.n,
                             "flops": g.structure.flops})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="latency (median of interleaved runs)")
    for col in ("model", "batch", "target", "median ms", "p25-p75 ms", "img/s"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], str(r["batch"]), r["target"], f"{r['median_ms']:.2f}",
                      f"{r['p25_ms']:.2f}-{r['p75_ms']:.2f}", f"{1000 * r['batch'] / r['median_ms']:.1f}")
    Console().print(table)
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    import dataclasses

    from vitgraph.train.data import check_source
    from vitgraph.report.outdir import Output
    from vitgraph.pipeline import compress
    from vitgraph.spec import Spec

    spec = Spec.load(args.spec)
    check_source(args.data)  # a bad --data fails here, before the model is built and traced
    if (args.steps is not None and args.steps < 0) or (args.batch_size is not None and args.batch_size < 1):
        raise SpecError(f"--steps must be >= 0 and --batch-size >= 1 (they override train.steps and "
                        f"train.batch_size), got --steps {args.steps} --batch-size {args.batch_size}")
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size)) if v is not None}
    if overrides:
        spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, **overrides))
    Output.at(args.out).check(resume=args.resume, spec=spec)  # path and checkpoint errors before the work
    targets = parse_targets(args.targets)
    quantize = None
    if args.quantize is not None:
        from vitgraph.pipeline import int8_config

        int8_config(args.quantize, False)  # the name: int8 is the one
        quantize = int8_config(int8_options(args), args.data != "none")  # static without --data fails here
    g = load_graph(args, args.model)
    result = compress(g, spec, data=args.data, out_dir=args.out, resume=args.resume, progress=not args.quiet,
                      latency_targets=targets, quantize=quantize)
    if not result.files:  # a non-zero torchrun rank: rank 0 reports and writes
        return 0
    print(_compile_summary(result.report))
    if "int8" in result.report:
        print(int8_summary(result.report["int8"], Path(args.out) / "model.int8.onnx"))
    print("wrote " + ", ".join(sorted(Path(p).name for p in result.files.values())) + f" to {args.out}")
    return 0


def _compile_summary(report: dict[str, Any]) -> str:
    d, c = report["dense"], report["compressed"]

    def top1(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    budget = report["budget"]
    target = f"target {budget['flops']}" if budget.get("flops") is not None else "no FLOPs target"
    lines = [f"{report['model']}: {report['method']} -> {budget['achieved']:.3f} of the dense FLOPs "
             f"({target}), parity {report['parity']['max_abs_err']:.1e}",
             f"  FLOPs  {d['flops'] / 1e9:8.3f} G -> {c['flops'] / 1e9:8.3f} G",
             f"  params {d['params'] / 1e6:8.2f} M -> {c['params'] / 1e6:8.2f} M",
             f"  top-1  {top1(d['top1']):>8} -> {top1(c['top1']):>8}"]
    depth = report.get("depth") or {}
    if depth.get("removed_blocks") or depth.get("skipped_branches") or depth.get("exit"):
        blocks = depth["blocks"]
        gone = depth["removed_blocks"] + depth["skipped_branches"]
        lines.append(f"  blocks {blocks['dense']:8d}   -> {blocks['compressed']:8d}     removed: {', '.join(gone)}"
                     + (f"; cut after block {depth['exit']}" if depth.get("exit") else ""))
    lat = budget.get("latency")
    if lat:
        verdict = "within" if lat["within"] else "OUTSIDE"
        of = "dense" if lat.get("reference", lat["runtime"]) == lat["runtime"] else f"dense on {lat['reference']}"
        lines.append(f"  latency {lat['runtime']} batch {lat['batch']}: measured {lat['measured']:.3f} of {of} "
                     f"({lat['dense_ms']:.2f} -> {lat['compressed_ms']:.2f} ms), predicted {lat['predicted']:.3f}, "
                     f"{verdict} the target {lat['target']} +- {lat['tolerance']}"
                     + (f" after {len(lat['rounds'])} measured rounds" if lat["adjusted"] else ""))
    for t, v in report["latency_ms"].items():
        lines.append(f"  {t} batch {v['batch']}: {v['dense']:.2f} ms -> {v['compressed']:.2f} ms "
                     f"({v['dense'] / v['compressed']:.2f}x)")
    return "\n".join(lines)


def cmd_profile(args: argparse.Namespace) -> int:
    from vitgraph.cost.profile import cache_path, profile, reference

    if args.batch_size < 1 or args.samples < 3 or args.repeats < 1:
        raise VitgraphError(f"profile needs --batch-size >= 1, --samples >= 3 and --repeats >= 1; got "
                            f"{args.batch_size}, {args.samples}, {args.repeats}")
    if args.out and Path(args.out).is_dir():
        raise VitgraphError(f"--out {args.out} is a folder; name the table's JSON file, e.g. {args.out}/table.json")
    g = load_graph(args, args.model)
    from vitgraph.gated import builder

    table = profile(g, args.target, args.batch_size, builder(g), samples=args.samples, repeats=args.repeats,
                    progress=not args.quiet)
    path = table.save(args.out or cache_path(g, args.target, args.batch_size))
    errors = sorted(table.errors())
    of = "dense fp32 onnx" if reference(args.target) != args.target else "dense"
    print(f"{g.name} on {args.target}, batch {args.batch_size}: {of} {table.dense_ms:.2f} ms; "
          f"{len(table.samples)} configurations (the dense one included) fitted with median error "
          f"{100 * errors[len(errors) // 2]:.1f} % (max {100 * errors[-1]:.1f} %)")
    for s in table.samples:
        print(f"  {s['label']:32s} measured {s['ratio']:.3f} of {of}")
    if of != "dense" and table.dense_ratio() >= 0.9:
        print(f"note: quantized, the dense {g.name} runs at {table.dense_ratio():.2f} of fp32: its matrix products "
              f"are too small at batch {args.batch_size} for INT8 to pay, so a latency budget on {args.target} is "
              f"reached by pruning alone")
    print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vitgraph.cli.demo import run_demo

    return run_demo(Path(args.out))


def int8_args(p: argparse.ArgumentParser) -> None:
    from vitgraph.targets.int8 import DEFAULT_TOLERANCE

    p.add_argument("--calibration", choices=("minmax", "percentile", "entropy"), default="minmax",
                   help="INT8 static calibration method (default minmax)")
    p.add_argument("--int8-mode", default="auto", help="auto (static with --data, else dynamic) | dynamic | static")
    p.add_argument("--int8-tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"least top-1 agreement of INT8 with fp32, a fraction (default {DEFAULT_TOLERANCE})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitgraph", description="Recognise, compress and lower Vision Transformers.")
    p.add_argument("--debug", action="store_true",
                   help="show tracebacks, and check cost model == FlopCounterMode after every pass")
    p.add_argument("--version", action="version", version=f"vitgraph {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="show the recognised structure of a model")
    s.add_argument("model", help="timm name, file.py:function or module.path:function")
    s.add_argument("--json", action="store_true", help="print the structure as JSON")
    s.add_argument("--dot", help="write a Graphviz drawing of the blocks (and an SVG when `dot` exists)")
    model_args(s)
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("export", help="lower a model and verify parity")
    s.add_argument("model")
    s.add_argument("--target", choices=("onnx", "onnx-int8", "compile", "pt2"), required=True)
    s.add_argument("--out", required=True, help="output file (.onnx or .pt2)")
    s.add_argument("--atol", type=float, default=1e-4, help="max abs error allowed vs eager (default 1e-4)")
    s.add_argument("--data", default="none", help="onnx-int8: calibration and check data, digits | "
                   "imagefolder:PATH | none (dynamic INT8, agreement checked on random inputs)")
    int8_args(s)
    model_args(s)
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("bench", help="latency table: eager, torch.compile, ONNX Runtime (fp32, onnx-int8)")
    s.add_argument("models", nargs="+")
    s.add_argument("--batch-sizes", "--batch-list", dest="batch_sizes", default="1,16")
    s.add_argument("--targets", default="eager,onnx")
    s.add_argument("--repeats", type=int, default=20)
    s.add_argument("--json", action="store_true")
    model_args(s)
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("compile", help="compress a model with a spec (width/depth/token passes)")
    s.add_argument("model")
    s.add_argument("--spec", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--data", default="none", help="digits | imagefolder:PATH | none (one-shot, default)")
    s.add_argument("--steps", type=int, help="override train.steps")
    s.add_argument("--batch-size", type=int, help="override train.batch_size")
    s.add_argument("--resume", action="store_true",
                   help="continue the run checkpointed in OUT.partial/train (killed) or OUT/train")
    s.add_argument("--targets", default="eager", help="latency measured for the report: eager,compile,onnx,onnx-int8")
    s.add_argument("--quantize", help="int8: also write model.int8.onnx (static QDQ with --data, dynamic without) "
                   "and report.json['int8']")
    int8_args(s)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    model_args(s)
    s.set_defaults(func=cmd_compile)

    s = sub.add_parser("profile", help="measure a latency table of a model's compact configurations (budget.latency)")
    s.add_argument("model")
    s.add_argument("--target", choices=LATENCY_TARGETS, default="onnx",
                   help="onnx-int8: dynamic INT8, its ratios to the dense fp32 ONNX model")
    s.add_argument("--batch-size", dest="batch_size", type=int, default=1, help="batch size to measure at")
    s.add_argument("--out", help="table file (default: the cache budget.latency reads)")
    s.add_argument("--samples", type=int, default=SAMPLES, help=f"compact configurations measured (default {SAMPLES})")
    s.add_argument("--repeats", type=int, default=10, help="interleaved rounds per measurement")
    s.add_argument("--quiet", action="store_true")
    model_args(s)
    s.set_defaults(func=cmd_profile)

    from vitgraph.cli.sweep import register as register_sweep
    register_sweep(sub)

    s = sub.add_parser("demo", help="the end-to-end example job")
    s.add_argument("--out", default="vitgraph-demo")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `bench --batch 1,16` (the documented form) means batch sizes; elsewhere --batch is the example batch
    if argv[:1] == ["bench"] or (len(argv) > 1 and argv[0] == "--debug" and argv[1] == "bench"):
        argv = ["--batch-sizes" if a == "--batch" else a for a in argv]
    elif "profile" in argv[:2]:  # `profile --batch N` (the documented form) is the measured batch size
        argv = ["--batch-size" if a == "--batch" else a for a in argv]
    args = build_parser().parse_args(argv)
    if not args.debug:
        warnings.filterwarnings("ignore")
    else:
        from vitgraph.passes.manager import DEBUG_ENV
        os.environ[DEBUG_ENV] = "1"
    try:
        return args.func(args)
    except VitgraphError as exc:
        if args.debug:
            raise
        print(f"vitgraph {args.command}: error: {_paragraph(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: bad input raises VitgraphError where it is read
        if args.debug:
            raise
        print(f"vitgraph {args.command}: internal error in {args.command}: {_paragraph(first_line(exc))}; this is "
              "a vitgraph bug, rerun with --debug for the traceback and report it", file=sys.stderr)
        return 1


def _paragraph(text: str) -> str:
    """A message on one line: the CLI's errors are one paragraph, whatever a wrapped library said."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
