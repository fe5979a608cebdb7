"""Compress your own ViT from Python: one-shot magnitude width pruning to half the FLOPs.

    python examples/compress_width.py

Swap the spec for ``{"preset": "wdpruning", "train": {"steps": 300}}`` and ``data="digits"`` (or
``"imagefolder:PATH"``) to learn the masks and fine-tune with distillation instead.
"""
from __future__ import annotations

import timm
import torch

import vitgraph as vg


def main() -> None:
    model = timm.create_model("deit_small_patch16_224").eval()   # pretrained=True with network access
    x = torch.randn(2, 3, 224, 224)

    g = vg.trace(model, x)                                         # recognise heads, MLPs, blocks
    spec = vg.Spec.from_dict({"budget": {"flops": 0.5},
                              "width": {"method": "magnitude", "heads": True, "mlp": True}})
    gated = vg.instrument(g, spec)                                 # gates at every coupled group
    print("kept per group:", {k: len(v) for k, v in list(gated.decisions()["width"].items())[:4]}, "...")
    compact = vg.materialize(gated)                                # weights sliced, reshapes rewritten

    with torch.no_grad(), gated.using("eval"):
        err = (compact(x) - gated(x)).abs().max().item()
    small = vg.trace(compact, x)
    print(f"FLOPs {g.structure.flops / 1e9:.2f} G -> {small.structure.flops / 1e9:.2f} G, "
          f"params {g.structure.params / 1e6:.1f} M -> {small.structure.params / 1e6:.1f} M, parity {err:.1e}")
    report = vg.targets.onnx.lower(compact, (x[:1],), "deit_small_half.onnx")
    print(f"ONNX Runtime parity {report.max_abs_err:.1e} -> {report.path}")


if __name__ == "__main__":
    main()
