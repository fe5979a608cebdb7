"""DDP on every axis: two gloo processes run the whole pipeline and must take the same decisions.

Token selectors and attention->conv choices have their own two-process tests beside their axes
(tests/test_tokens.py, tests/test_conv.py); this file covers width (heads, value dims, MLP units,
embedding channels), block gates and exit classifiers through ``vg.compress``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch

import vitgraph as vg
from tests.test_train import ddp_join, free_port

SPECS = {
    "width+blocks": {"preset": "uvc", "budget": {"flops": 0.6},
                     "width": {"head_dim": True, "embed": True}, "depth": {"skip_blocks": True}},
    "width+exits": {"preset": "wdpruning", "budget": {"flops": 0.6}, "depth": {"exits": [2]}},
}


def _worker(rank: int, world: int, port: int, out: str, which: str) -> None:
    from vitgraph.data import load_data

    ddp_join(rank, world, port)
    try:
        data = load_data("digits", (1, 16, 16), batch_size=16)
        torch.manual_seed(100 + rank)  # other weights on every rank: DDP starts them all from rank 0's
        model = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, num_classes=10,
                                  embed_dim=32, depth=3, num_heads=2).eval()
        spec = {**SPECS[which], "train": {"steps": 6, "batch_size": 16}}
        result = vg.compress(model, spec, example_inputs=(torch.randn(2, 1, 16, 16),), data=data,
                             progress=False, latency_targets=())
        decisions = {k: result.report.get(k) for k in ("blocks", "depth", "budget")}
        torch.save({"compact": result.compact.state_dict(), "decisions": decisions},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("which", sorted(SPECS))
def test_ddp_ranks_compress_to_the_same_model(tmp_path: Path, which: str) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), which), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["decisions"] == r1["decisions"]  # kept heads / dims / units / blocks / exit, per block
    assert r0["compact"].keys() == r1["compact"].keys()
    assert [k for k in r0["compact"] if not torch.equal(r0["compact"][k], r1["compact"][k])] == []
    dense_blocks = 3
    blocks = r0["decisions"]["blocks"]
    cut = len(blocks) < dense_blocks or any(b["mlp"]["hidden"] < 128 for b in blocks if b.get("mlp"))
    assert cut, "the run must have taken some decision, or the test compares two dense models"
