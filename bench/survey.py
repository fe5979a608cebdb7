"""Which timm models does ``vg.compress`` take? A survey over every timm family with attention.

Each model (random weights, ``pretrained=False``, at its default input size: ``pretrained_cfg["input_size"]``)
goes through three one-shot specs: ``width`` (heads + MLP units by magnitude, 0.5 of the dense FLOPs),
``depth`` (whole blocks + width, 0.7) and ``tokens`` (attention-scored token dropping, 0.6; only where the
trace finds a token-prunable block, else ``n/a`` with the analysis's reason). A run that lands is checked
beyond what ``compress`` checks itself (gated vs compact parity): the saved ``model.pt2``, reloaded, matches
the compact module on a fresh input; the report's compressed FLOPs match ``FlopCounterMode`` on the compact
module within 1 %; the achieved FLOPs fraction is within +-0.03 of the budget. Each outcome is

* ``landed``  -- achieved fraction, seconds, peak RSS of the process;
* ``refused`` -- a ``VitgraphError`` with a message that names why (type and message kept);
* ``failed``  -- anything else: another exception, a check that does not hold, a crash, a timeout, a
  ``ParityError`` / ``PostconditionError`` (vitgraph's own checks catching itself), an error while saving.

Every model runs in its own process (captured once, then each spec) with a timeout per spec, and appends one
JSON line per spec to ``--out``; a rerun skips what is there (resumable). The markdown table goes to ``--table`` (default bench/survey.md)::

    python bench/survey.py --list                                   # the model list (family order)
    python bench/survey.py --out /tmp/survey.jsonl                  # everything (hours on a CPU)
    python bench/survey.py --out /tmp/survey.jsonl --models deit_tiny_patch16_224,levit_128s --specs width
    python bench/survey.py --out /tmp/survey.jsonl --limit 10 --timeout 300
    python bench/survey.py --out /tmp/survey.jsonl --jobs 2 --threads 1         # two children at a time
    python bench/survey.py --out /tmp/survey.jsonl --table-only     # rewrite bench/survey.md from the jsonl
    python bench/survey.py --out /tmp/survey.jsonl --table-only --before bench/survey.jsonl --compare F.md
    python bench/survey.py --out /tmp/foreign.jsonl --table bench/foreign.md \
        --models tests/foreign.py:build_vit,tests/foreign.py:build_beit  # ViTs written elsewhere (file.py:fn)

The model list is ``survey_models.FAMILIES``: per timm family with attention (in timm 1.0.x), its smallest variants at
a default input of at most 256 px (naflexvit, which has none smaller, at 384), plus variants that exercise
different code paths (distilled heads, registers, rope, relative positions, parallel blocks, hybrids). Names
the installed timm lacks are skipped (``--list`` says which).
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the survey's own modules, run as a script from anywhere

from survey_models import FAMILIES, SPECS, survey_models  # noqa: E402
from survey_run import run_child, run_model  # noqa: E402
from survey_table import cell, compare, read_rows, table  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/vitgraph-survey.jsonl", help="jsonl file, appended to (resumable)")
    parser.add_argument("--table", default=str(Path(__file__).with_name("survey.md")), help="markdown table")
    parser.add_argument("--models", help="comma-separated timm names (default: the whole list)")
    parser.add_argument("--limit", type=int, help="only the first N models of the list")
    parser.add_argument("--specs", default="width,depth,tokens", help="comma list of " + ",".join(SPECS))
    parser.add_argument("--timeout", type=float, default=600, help="seconds per (model, spec)")
    parser.add_argument("--threads", type=int, help="torch threads in each child (default: torch's)")
    parser.add_argument("--jobs", type=int, default=1, help="children at a time (e.g. --jobs 2 --threads 1)")
    parser.add_argument("--table-only", action="store_true", help="rewrite the table from --out, run nothing")
    parser.add_argument("--before", help="an earlier survey's jsonl: write a before/after table to --compare")
    parser.add_argument("--compare", default=str(Path(__file__).with_name("survey_compare.md")),
                        help="where the before/after table goes (with --before)")
    parser.add_argument("--list", action="store_true", help="print the model list and exit")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    return parser


def _child(model: str, specs: str, result_path: str, threads: int | None) -> None:
    if threads:
        import torch
        torch.set_num_threads(threads)
    with open(result_path, "a") as f:
        def write(row: dict) -> None:
            f.write(json.dumps(row) + "\n")
            f.flush()
        run_model(model, specs.split(","), write)


def _run(models: list[str], specs: list[str], out: Path, args: argparse.Namespace) -> None:
    done = read_rows(out)
    todo = [(m, [s for s in specs if (m, s) not in done]) for m in models]
    todo = [(m, s) for m, s in todo if s]
    print(f"{sum(len(s) for _, s in todo)} runs to do on {len(todo)} models "
          f"({len(models) * len(specs) - sum(len(s) for _, s in todo)} already in {out})", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # threads only wait on the child processes
        runs = pool.map(lambda job: run_child(__file__, *job, args.timeout, args.threads), todo)
        for i, ((m, _), rows) in enumerate(zip(todo, runs), 1):
            with out.open("a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
            for row in rows:
                print(f"[{i}/{len(todo)}] {m} / {row['spec']}: {cell(row)}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.child:
        return _child(*args.child, args.threads)
    specs = [s for s in args.specs.split(",") if s]
    unknown = [s for s in specs if s not in SPECS]
    if unknown:
        _parser().error(f"unknown spec(s) {unknown}; choose from {','.join(SPECS)}")
    models, missing = survey_models(check=not args.table_only)
    if args.list:
        for family, members in FAMILIES:
            print(f"{family}: {', '.join(m for m in members if m in models)}")
        print(f"{len(models)} models in {len(FAMILIES)} families"
              + (f"; not in this timm: {', '.join(missing)}" if missing else ""))
        return
    models = [m for m in args.models.split(",") if m] if args.models else models
    models = models[: args.limit] if args.limit is not None else models
    out = Path(args.out)
    if not args.table_only:
        _run(models, specs, out, args)
    rows = read_rows(out)
    foreign = [m for m in models if ":" in m]  # file.py:function models: a table of their own (--table)
    text = table(rows, foreign or survey_models(check=False)[0], list(SPECS))  # all columns, whatever ran
    Path(args.table).write_text(text)
    print(text.rsplit("\n\n", 1)[-1].strip())
    print(f"table: {args.table}")
    if args.before:
        Path(args.compare).write_text(compare(read_rows(Path(args.before)), rows, list(SPECS)))
        print(f"before/after: {args.compare}")


if __name__ == "__main__":
    main()
