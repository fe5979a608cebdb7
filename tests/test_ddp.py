"""DDP on every axis: two gloo processes run the whole pipeline and must take the same decisions.

Token selectors and attention->conv choices have their own two-process tests beside their axes
(tests/test_tokens.py, tests/test_conv.py); this file covers width (heads, value dims, MLP units),
block gates and exit classifiers through ``vg.compress``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch

import vitgraph as vg
from tests.test_train import ddp_rank, free_port

# UVC's width kinds (heads, value dims, MLP units) + block gates + WDPruning's exit classifiers, one run
SPEC = {"preset": "uvc", "budget": {"flops": 0.6}, "width": {"head_dim": True},
        "depth": {"skip_blocks": True, "exits": [2]}, "train": {"steps": 4, "batch_size": 16}}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    with ddp_rank(rank, world, port) as data:
        model = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, num_classes=10,
                                  embed_dim=32, depth=3, num_heads=2).eval()
        result = vg.compress(model, SPEC, example_inputs=(torch.randn(2, 1, 16, 16),), data=data,
                             progress=False, latency_targets=())
        decisions = {k: result.report.get(k) for k in ("blocks", "depth", "budget")}
        torch.save({"compact": result.compact.state_dict(), "decisions": decisions},
                   os.path.join(out, f"rank{rank}.pt"))


def test_ddp_ranks_compress_to_the_same_model(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["decisions"] == r1["decisions"]  # kept heads / dims / units / blocks / exit, per block
    assert r0["compact"].keys() == r1["compact"].keys()
    assert [k for k in r0["compact"] if not torch.equal(r0["compact"][k], r1["compact"][k])] == []
    blocks, depth = r0["decisions"]["blocks"], r0["decisions"]["depth"]
    assert depth["exit"] == 2 and len(blocks) == 2  # cut at the exit: the decisions were taken
    assert r0["decisions"]["budget"]["achieved"] == pytest.approx(0.6, abs=0.03)
