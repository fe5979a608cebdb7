"""Time capture and structure analysis (median of repeated runs) for a few model sizes, for both front ends:
``torch.export`` (the default: ``vitgraph.capture.export_module``, raised to the dialect) and ``torch.fx``
symbolic tracing (``VITGRAPH_FRONTEND=fx``), measured alternately in one run.

    python bench/trace_time.py vit_base_patch16_224 deit_base_patch16_224
"""
from __future__ import annotations

import statistics
import sys
import time
import warnings

import timm
import torch

from vitgraph.analysis import analyse
from vitgraph.capture import export_module
from vitgraph.capture.frontend import trace_module

FRONTENDS = {"export": lambda m, x: export_module(m, (x,), name="m"), "fx": lambda m, x: trace_module(m, (x,))}


def main(names: list[str], repeats: int = 3) -> None:
    warnings.filterwarnings("ignore")
    for name in names:
        model = timm.create_model(name).eval()
        x = torch.randn(2, *model.pretrained_cfg["input_size"])
        times: dict[str, dict[str, list[float]]] = {f: {"capture": [], "analyse": []} for f in FRONTENDS}
        for _ in range(repeats + 1):  # the first round warms caches and is dropped
            for frontend, capture in FRONTENDS.items():  # alternating: both see the same machine state
                t0 = time.perf_counter()
                gm = capture(model, x)
                t1 = time.perf_counter()
                analyse(gm, (x,))
                times[frontend]["capture"].append(t1 - t0)
                times[frontend]["analyse"].append(time.perf_counter() - t1)
        for frontend, t in times.items():
            cap, ana = statistics.median(t["capture"][1:]), statistics.median(t["analyse"][1:])
            print(f"{name:28s} {frontend:6s} capture {cap:5.2f} s  analyse {ana:5.2f} s  total {cap + ana:5.2f} s  "
                  f"(batch 2, median of {repeats}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main(sys.argv[1:] or ["vit_base_patch16_224", "vit_large_patch16_224"])
