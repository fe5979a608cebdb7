"""vitgraph: a torch.fx graph compiler that recognises, prunes and lowers Vision Transformers.

    import vitgraph as vg
    g = vg.trace(model, example_inputs)     # VitGraph: g.structure, g.summary(), g.to_networkx()
    vg.targets.onnx.lower(g.gm, g.example_inputs, "model.onnx")
"""
from __future__ import annotations

import importlib
from typing import Any

from vitgraph.errors import (AnalysisError, InputSizeError, ModelNotFoundError, ParityError, PostconditionError,
                             PreconditionError, SpecError, TraceError, VitgraphError)
from vitgraph.graph import VitGraph, trace
from vitgraph.meta import AttentionSite, Block, CoupledGroup, MlpSite, Structure, TokenInfo
from vitgraph.models import load_model

__version__ = "0.1.0"

__all__ = [
    "trace", "VitGraph", "load_model", "Structure", "Block", "AttentionSite", "MlpSite", "TokenInfo",
    "CoupledGroup", "VitgraphError", "TraceError", "InputSizeError", "ModelNotFoundError", "AnalysisError",
    "ParityError", "PreconditionError", "PostconditionError", "SpecError", "targets",
]


def __getattr__(name: str) -> Any:
    if name in ("targets", "passes"):  # lowering pulls in onnx/onnxruntime: import on first use
        return importlib.import_module(f"vitgraph.{name}")
    raise AttributeError(f"module 'vitgraph' has no attribute {name!r}")
