"""ONNX target: torch.onnx (dynamo exporter) -> onnxscript optimizer -> one .onnx file, checked in ONNX Runtime.

Invariant: :func:`lower` returns only after the saved file has a symbolic batch axis on every input and
ONNX Runtime reproduces the eager module within ``atol`` at every batch size in ``check_batches``
(fresh random inputs per batch); otherwise it raises :class:`~vitgraph.errors.ParityError` or
:class:`~vitgraph.targets.LoweringError`.

Scaled-dot-product attention is pinned to the math backend while exporting. The fake output layout
of SDPA depends on the backend PyTorch would pick, and the exporter re-runs the graph under different
conditions (e.g. an attention bias that requires grad during capture, but not afterwards): a
``reshape`` decomposed into ``view`` for one layout then fails on the other ("Cannot view a tensor
with shape ..."), as for timm's BEiT and relative-position ViTs (pytorch/pytorch#136543). The ONNX
graph itself does not depend on the backend.

Sessions are created with intra- and inter-op spinning off, so idle ORT threads do not burn the
cores that eager PyTorch or another benchmark runner needs.
"""
from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from vitgraph.targets._common import (LoweringError, LoweringReport, batched_inputs, check_example_inputs,
                                     describe_failure, lowering_error, model_name, plan_batches, raised_by,
                                     verify, warn_if_training)

if TYPE_CHECKING:
    import onnxruntime

__all__ = ["lower", "session", "run", "batch_axes"]

_CAPTURE_HINT = ("torch.export could not capture the model (step 1 of 3): remove data-dependent Python "
                 "branches, see https://pytorch.org/docs/stable/generated/exportdb/index.html; "
                 "vitgraph.targets.export.lower() reports the same failure without ONNX in the way.")
_EXPORT_HINT = ("Fix: make the op exportable (rewrite it with standard tensor ops, or register an ONNX "
                "translation via torch.onnx.export(custom_translation_table=...)); "
                "torch.onnx.export(..., report=True) writes a detailed report.")


def batch_axes(path: str | os.PathLike) -> dict[str, str | int]:
    """Dim 0 of each graph input of an ONNX file: its symbolic name (dynamic) or its fixed size."""
    import onnx as onnx_pkg  # absolute import: the real onnx package, not this module

    model = onnx_pkg.load(os.fspath(path), load_external_data=False)
    axes: dict[str, str | int] = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        axes[value.name] = (dims[0].dim_param or dims[0].dim_value) if len(dims) else 0
    return axes


def lower(module: nn.Module, example_inputs: Sequence[torch.Tensor], path: str | os.PathLike, *,
          atol: float = 1e-4, check_batches: Sequence[int] = (1, 3), optimize: bool = True,
          opset: int | None = None, name: str | None = None) -> LoweringReport:
    """Export ``module`` to a self-contained ONNX file at ``path`` with a dynamic batch axis, then verify it.

    The file holds its weights inline unless they exceed protobuf's 2 GB limit (then ``<path>.data``
    is written beside it). Raises ParityError when ONNX Runtime differs from eager by more than ``atol``.
    """
    name = model_name(module, name)
    example = check_example_inputs(example_inputs, "onnx")
    warn_if_training(module, "onnx", name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args, dynamic, check_batches = plan_batches(module, example, check_batches)
    batch = torch.export.Dim("batch")
    dynamic_shapes = tuple({0: batch} for _ in example) if dynamic else None

    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), sdpa_kernel([SDPBackend.MATH]):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic_shapes,
                                        opset_version=opset, optimize=False, verbose=False)
        if optimize:
            program.optimize()  # onnxscript optimizer: constant folding, dead code, redundant casts
        program.save(path, external_data=False)  # inline unless > 2 GB (then external data anyway)
    except Exception as exc:  # noqa: BLE001 - re-raised as one readable LoweringError
        hint = _CAPTURE_HINT if raised_by(exc, "TorchExportError") else _EXPORT_HINT
        raise lowering_error(exc, target="onnx", name=name, hint=hint) from exc
    seconds = time.perf_counter() - start

    fixed = {k: v for k, v in batch_axes(path).items() if not isinstance(v, str)}
    if fixed and dynamic:
        raise LoweringError(
            f"onnx: the batch axis of {name} was specialised during export (inputs {fixed} have a fixed dim 0 "
            f"in {path}). Some op in the model ties the batch size to a constant; find it with "
            "torch.export.export(module, args, dynamic_shapes=...) which names the guard.")

    sess = session(path)
    cases = {b: batched_inputs(example, b, seed=b) for b in check_batches}
    per_batch = verify(module, cases, lambda *xs: run(sess, *xs), target="onnx", name=name, atol=atol,
                       where=f" ({path})")
    return LoweringReport("onnx", str(path), max(per_batch.values(), default=0.0), per_batch, seconds)


def session(path: str | os.PathLike, threads: int | None = None) -> onnxruntime.InferenceSession:
    """A CPU ONNX Runtime session with thread spinning off; ``threads`` sets the intra-op pool size."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise LoweringError(f"onnx: no ONNX file at {path}; create one with vitgraph.targets.onnx.lower().")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    try:
        return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - e.g. a truncated file or an op ORT lacks
        raise LoweringError(f"onnx: ONNX Runtime cannot load {path}: {describe_failure(exc)}. Re-export it with "
                            "vitgraph.targets.onnx.lower(), or pick an opset this onnxruntime supports.") from exc


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().contiguous().numpy()
    return np.ascontiguousarray(x)


def run(sess: onnxruntime.InferenceSession, *inputs: torch.Tensor | np.ndarray) -> list[np.ndarray]:
    """Run ``sess`` on positional inputs (torch tensors or numpy arrays), returning every output."""
    names = [i.name for i in sess.get_inputs()]
    if len(inputs) != len(names):
        raise LoweringError(f"onnx: the model takes {len(names)} input(s) ({', '.join(names)}), got {len(inputs)}.")
    return sess.run(None, {n: _numpy(x) for n, x in zip(names, inputs)})
