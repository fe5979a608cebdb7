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
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

from vitgraph.errors import (AnalysisError, InputSizeError, ModelNotFoundError, ParityError, PostconditionError,
                             PreconditionError, SpecError, TraceError, VitgraphError)
from vitgraph.analysis.graph import VitGraph, trace
from vitgraph.spec import Spec
from vitgraph.meta import AttentionSite, Block, CoupledGroup, MlpSite, Structure, TokenInfo
from vitgraph.capture.models import load_model

__version__ = "0.1.0"

__all__ = [
    "trace", "VitGraph", "load_model", "Structure", "Block", "AttentionSite", "MlpSite", "TokenInfo",
    "CoupledGroup", "VitgraphError", "TraceError", "InputSizeError", "ModelNotFoundError", "AnalysisError",
    "ParityError", "PreconditionError", "PostconditionError", "SpecError", "targets", "Spec", "instrument",
    "materialize", "fit", "compress", "Result", "GatedModel", "Axis",
]

_LAZY = {"instrument": "vitgraph.gated", "materialize": "vitgraph.gated", "GatedModel": "vitgraph.gated",
         "Axis": "vitgraph.axes",
         "fit": "vitgraph.train.loop", "compress": "vitgraph.pipeline", "Result": "vitgraph.pipeline"}


def __getattr__(name: str) -> Any:
    if name in ("targets", "passes"):  # lowering pulls in onnx/onnxruntime: import on first use
        return importlib.import_module(f"vitgraph.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vitgraph' has no attribute {name!r}")


# Modules that moved into the rooms (issue 26): the old import paths keep working, with a DeprecationWarning.
_MOVED = {"graph": "analysis.graph", "frontend": "capture.frontend", "models": "capture.models",
          "budget": "cost.budget", "latency": "cost.latency", "profile": "cost.profile",
          "token_gates": "gates.tokens", "conv_gates": "gates.conv", "train_state": "train.state",
          "train_groups": "train.groups", "data": "train.data", "report_plot": "report.plot",
          "outdir": "report.outdir", "sweep": "cli.sweep", "demo": "cli.demo"}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import vitgraph.graph`` gives ``vitgraph.analysis.graph`` (the same module object)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        old = name.removeprefix("vitgraph.")
        if name.startswith("vitgraph.") and old in _MOVED:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec: Any) -> Any:
        new = f"vitgraph.{_MOVED[spec.name.removeprefix('vitgraph.')]}"
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: Any) -> None:
        pass  # the module it stands for has run already


sys.meta_path.append(_MovedModules())
