"""Lowering targets: ONNX (via ONNX Runtime), torch.compile, and self-contained torch.export ``.pt2`` files.

Invariant: every ``lower`` checks its result against eager PyTorch before returning, and raises
:class:`~vitgraph.errors.ParityError` when the maximum absolute error exceeds ``atol``; exporter
failures surface as :class:`LoweringError` naming the op that failed. ``bench`` times the lowered
runners against each other, interleaved.

The submodule ``onnx`` shadows nothing: every module here uses absolute imports, so ``import onnx``
inside the package still means the ONNX package.
"""
from __future__ import annotations

from vitgraph.targets import bench, compile, export, onnx
from vitgraph.targets._common import LoweringError, LoweringReport

__all__ = ["onnx", "compile", "export", "bench", "LoweringError", "LoweringReport"]
