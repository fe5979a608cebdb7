"""Time tracing and structure analysis (median of repeated runs) for a few model sizes.

    python bench/trace_time.py vit_base_patch16_224 vit_large_patch16_224
"""
from __future__ import annotations

import statistics
import sys
import time
import warnings

import timm
import torch

from vitgraph.analysis import analyse
from vitgraph.capture.frontend import trace_module


def main(names: list[str], repeats: int = 3) -> None:
    warnings.filterwarnings("ignore")
    for name in names:
        model = timm.create_model(name).eval()
        x = torch.randn(2, *model.pretrained_cfg["input_size"])
        traces, analyses = [], []
        for _ in range(repeats + 1):  # the first run warms caches and is dropped
            t0 = time.perf_counter()
            gm = trace_module(model, (x,))
            t1 = time.perf_counter()
            analyse(gm, (x,))
            traces.append(t1 - t0)
            analyses.append(time.perf_counter() - t1)
        print(f"{name:32s} trace {statistics.median(traces[1:]):6.2f} s   "
              f"analyse {statistics.median(analyses[1:]):6.2f} s   (batch 2, median of {repeats})")


if __name__ == "__main__":
    main(sys.argv[1:] or ["vit_base_patch16_224", "vit_large_patch16_224"])
