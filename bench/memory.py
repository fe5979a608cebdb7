"""Where does memory go? Peak resident memory (RSS) and seconds per pipeline stage of ``vitgraph compile``.

Each model runs in its own process (peak RSS is per process) through the same path as
``vitgraph compile MODEL --spec S --data none --out DIR`` (its default eager latency for the report
included). Every stage of the pipeline is wrapped: before it the kernel's high-water mark is reset
(``/proc/self/clear_refs``), after it ``VmHWM`` is read, so each row is that stage's own peak. Prints one table per model and spec::

    python bench/memory.py                                   # deit_small, vit_large, samvit_base (1024 px)
    python bench/memory.py --models samvit_base_patch16 --specs width
    python bench/memory.py --json memory.json

``--specs width`` is one-shot magnitude width (heads + MLP units) at 0.5 of the FLOPs; ``depth`` is
blocks + width at 0.7. Linux only (reads /proc).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

SPECS = {
    "width": {"budget": {"flops": 0.5}, "width": {"method": "magnitude", "heads": True, "mlp": True}},
    "depth": {"budget": {"flops": 0.7}, "width": {"method": "magnitude", "heads": True, "mlp": True},
              "depth": {"skip_blocks": True}},
}
MODELS = ("deit_small_patch16_224", "vit_large_patch16_224", "samvit_base_patch16")
# each stage: the places its function is looked up from (patched in all), and its label
STAGES = ((("vitgraph.capture.models:load_model",), "load model"),
          (("vitgraph.analysis.graph:trace", "vitgraph.pipeline:trace"), "trace + analyse"),
          (("vitgraph.pipeline:instrument",), "instrument (gates, scores)"),
          (("vitgraph.pipeline:materialize",), "materialize"),
          (("vitgraph.pipeline:_parity",), "parity check"),
          (("vitgraph.pipeline:_achieved",), "FLOPs check"),
          (("vitgraph.pipeline:_latency",), "latency (--targets)"),
          (("vitgraph.pipeline:Result.write",), "write (.pt2 + check, report)"))


def _hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _wrap(owner: Any, attr: str, label: str, rows: list[dict[str, Any]]) -> None:
    inner: Callable[..., Any] = getattr(owner, attr)

    def stage(*args: Any, **kwargs: Any) -> Any:
        _reset_hwm()
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            rows.append({"stage": label, "seconds": round(time.perf_counter() - t0, 2),
                         "peak_mb": round(_hwm_mb())})
            print("row " + json.dumps(rows[-1]), flush=True)  # a run that times out still shows its stages
            _reset_hwm()
    setattr(owner, attr, stage)


def _child(model: str, spec_name: str, extra: list[str]) -> None:
    """Run one compile in this process and print its stage table as JSON on the last line."""
    import importlib

    from vitgraph import cli

    for places, _ in STAGES:  # import first: a module that imports a name binds the unwrapped function
        for place in places:
            importlib.import_module(place.partition(":")[0])
    rows: list[dict[str, Any]] = []
    for places, label in STAGES:
        for place in places:
            module, _, attr = place.partition(":")
            owner: Any = importlib.import_module(module)
            *path, attr = attr.split(".")
            for name in path:
                owner = getattr(owner, name)
            _wrap(owner, attr, label, rows)
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.yaml"
        spec.write_text(json.dumps(SPECS[spec_name]))  # JSON is YAML
        t0 = time.perf_counter()
        code = cli.main(["compile", model, "--spec", str(spec), "--data", "none", "--out", f"{tmp}/out",
                         "--quiet", *extra])
        total = time.perf_counter() - t0
    print(json.dumps({"model": model, "spec": spec_name, "exit": code, "seconds": round(total, 1),
                      "rows": rows}))


def run(model: str, spec: str, args: str, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", model, spec, f"--args={args}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rows = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("row ")]
        return {"model": model, "spec": spec, "exit": f"timeout after {timeout:.0f} s", "rows": rows}
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):  # killed (out of memory: -9) or failed: the stages it finished
        rows = [json.loads(line[4:]) for line in lines if line.startswith("row ")]
        tail = [t for t in (proc.stderr or "").strip().splitlines()[-2:]]
        return {"model": model, "spec": spec, "exit": proc.returncode, "rows": rows, "error": " | ".join(tail)}


def table(result: dict[str, Any]) -> str:
    lines = [f"{result['model']} / {result['spec']}: exit {result['exit']}, {result.get('seconds', '-')} s"
             + (f" ({result['error']})" if result.get("error") else ""),
             "| stage | seconds | peak RSS MB |", "|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['stage']} | {row['seconds']} | {row['peak_mb']} |")
    if result["rows"]:  # (clear_refs resets ru_maxrss too: the process peak is the largest stage's)
        lines.append(f"| **whole compile** | {result.get('seconds', '-')} | {max(r['peak_mb'] for r in result['rows'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--specs", default="width,depth", help="width (0.5), depth (blocks + width at 0.7)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per compile")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--args", default="", help="extra compile arguments, e.g. '--targets eager --batch 2'")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child, args.args.split())
        return
    results = []
    for model in args.models.split(","):
        for spec in args.specs.split(","):
            results.append(run(model, spec, args.args, args.timeout))
            print(table(results[-1]), flush=True)
            print()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
