"""The digits ViT the accuracy benches start from: the issue's 32 px model trained dense as the demo trains its own.

deit_tiny layout at 32 px with 4-px patches (an 8x8 grid, 64 patches), embed 128, 4 blocks, 4 heads, on
scikit-learn's digits (batch 64, lr 2e-3, 30 warm-up steps, seed 0).
"""
from __future__ import annotations

import timm
import torch

from vitgraph.train.data import Data, load_data
from vitgraph.spec import Train
from vitgraph.train.loop import fit



def trained_digits_vit(dense_steps: int, depth: int = 4, size: int = 32
                       ) -> tuple[torch.nn.Module, Data, tuple[torch.Tensor]]:
    """(the trained model in eval mode, the digits data, example inputs); ``depth`` blocks, ``size`` px."""
    torch.manual_seed(0)
    shape = (1, size, size)
    data = load_data("digits", shape, 64, seed=0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=size, patch_size=4, in_chans=1, num_classes=10,
                              embed_dim=128, depth=depth, num_heads=4)
    fit(model, data.train, Train(steps=dense_steps, batch_size=64, lr=2e-3, warmup_steps=30, seed=0),
        progress=False)
    return model.eval(), data, (torch.randn(2, *shape),)


def trained_demo_vit(seed: int, dense_steps: int) -> tuple[torch.nn.Module, Data]:
    """The demo's own ViT (``vitgraph.cli.demo``: 16 px digits, embed 128, 4 blocks) trained dense as the demo
    trains it, with ``seed`` for the weights, the data order and the split; in eval mode."""
    from vitgraph.cli.demo import INPUT, demo_model

    torch.manual_seed(seed)
    data = load_data("digits", INPUT, 64, seed=seed)
    model = demo_model()
    fit(model, data.train, Train(steps=dense_steps, batch_size=64, lr=2e-3, warmup_steps=30, seed=seed),
        progress=False)
    return model.eval(), data


def demo_spec(steps: int, seed: int) -> dict:
    """The demo's learned spec: WDPruning to 50 % of the FLOPs, 30 % of ``steps`` learning the masks."""
    return {"preset": "wdpruning", "budget": {"flops": 0.5},
            "train": {"steps": steps, "search": 0.3, "batch_size": 64, "lr": 5e-4, "seed": seed}}
