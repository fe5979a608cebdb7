"""vitgraph: a torch.fx graph compiler that recognises, prunes and lowers Vision Transformers.

    import vitgraph as vg
    g = vg.trace(model, example_inputs)     # VitGraph: g.structure, g.summary(), g.to_networkx()
    spec = vg.Spec.load("spec.yaml")        # validated on load
    gated = vg.instrument(g, spec)          # gates at the recognised sites
    vg.fit(gated, train_data, spec.train, teacher=g.gm, val_data=val_data)
    compact = vg.materialize(gated)         # fx.GraphModule, physically smaller
    vg.targets.onnx.lower(compact, g.example_inputs, "model.onnx")
    result = vg.compress(model, spec, data="digits")   # all of the above in one call
"""
from __future__ import annotations

import importlib
from typing import Any

from vitgraph.errors import (AnalysisError, InputSizeError, ModelNotFoundError, ParityError, PostconditionError,
                             PreconditionError, SpecError, TraceError, VitgraphError)
from vitgraph.graph import VitGraph, trace
from vitgraph.spec import Spec
from vitgraph.meta import AttentionSite, Block, CoupledGroup, MlpSite, Structure, TokenInfo
from vitgraph.models import load_model

__version__ = "0.1.0"

__all__ = [
    "trace", "VitGraph", "load_model", "Structure", "Block", "AttentionSite", "MlpSite", "TokenInfo",
    "CoupledGroup", "VitgraphError", "TraceError", "InputSizeError", "ModelNotFoundError", "AnalysisError",
    "ParityError", "PreconditionError", "PostconditionError", "SpecError", "targets", "Spec", "instrument",
    "materialize", "fit", "compress", "Result", "GatedModel", "Axis",
]

_LAZY = {"instrument": "vitgraph.gated", "materialize": "vitgraph.gated", "GatedModel": "vitgraph.gated",
         "Axis": "vitgraph.axes",
         "fit": "vitgraph.train", "compress": "vitgraph.pipeline", "Result": "vitgraph.pipeline"}


def __getattr__(name: str) -> Any:
    if name in ("targets", "passes"):  # lowering pulls in onnx/onnxruntime: import on first use
        return importlib.import_module(f"vitgraph.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vitgraph' has no attribute {name!r}")
