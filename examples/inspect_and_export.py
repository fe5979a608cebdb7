"""Trace a timm ViT, print what vitgraph recognised, and lower it to ONNX with a parity check.

    python examples/inspect_and_export.py deit_small_patch16_224
"""
from __future__ import annotations

import sys

import timm
import torch

import vitgraph as vg

name = sys.argv[1] if len(sys.argv) > 1 else "deit_tiny_patch16_224"
model = timm.create_model(name)
g = vg.trace(model, torch.randn(2, *model.pretrained_cfg["input_size"]), name=name)
print(g.summary())
for group in g.structure.groups[:2]:
    print(group)
report = vg.targets.onnx.lower(g.gm, g.example_inputs, f"{name}.onnx")
print(f"wrote {report.path}; ONNX Runtime vs eager max abs error {report.max_abs_err:.2e}")
