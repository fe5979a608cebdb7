"""Capture: a user's ``nn.Module`` becomes a graph in vitgraph's one dialect.

``export.py`` captures with ``torch.export`` (non-strict, dynamic batch) and raises the graph to the
torch-level dialect the analyses read; ``aten.py`` is the table of aten spellings it renames; ``errors.py`` turns export failures into TraceErrors. May
import ``vitgraph.errors`` only.
"""
from vitgraph.capture.export import export_module, is_stochastic

__all__ = ["export_module", "is_stochastic"]
