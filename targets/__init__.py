"""Lowering targets: ONNX (via ONNX Runtime), INT8 ONNX (ONNX Runtime's quantizer), torch.compile, and self-contained torch.export ``.pt2`` files,
and ``bench``, which times lowered runners against each other (interleaved medians).

Invariant: every ``lower`` checks its result against eager PyTorch before returning, and raises
:class:`~vitgraph.errors.ParityError` when the maximum absolute error exceeds ``atol``; exporter
failures surface as :class:`LoweringError` naming the op that failed. A target reads any
``GraphModule``, so this room sits right above capture and imports nothing else of vitgraph but the ground
floor: the cost room times with it, the pipeline lowers with it.

The submodule ``onnx`` shadows nothing: every module here uses absolute imports, so ``import onnx``
inside the package still means the ONNX package.
"""
from __future__ import annotations

from vitgraph.targets import bench, compile, export, int8, onnx
from vitgraph.targets._common import LoweringError, LoweringReport

__all__ = ["onnx", "int8", "compile", "export", "bench", "LoweringError", "LoweringReport"]
