"""Shape propagation: run the graph once on the example inputs and record shapes and small values.

Writes ``SHAPE`` and ``DTYPE`` for tensor nodes and ``VALUE`` for python values (sizes, ints,
tuples of ints) that reshape arguments are built from. No tensor is kept, so memory stays at one
forward pass.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensor,
                                          FakeTensorMode)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitgraph.analysis.ops import op_kind
from vitgraph.errors import AnalysisError
from vitgraph.meta import DTYPE, LEAF_FLOPS, SHAPE, VALUE

# what fake tensors cannot answer: a value read from data, or a shape that depends on it
_DATA_DEPENDENT = (DataDependentOutputException, DynamicOutputShapeException)


def _shape(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(int(d) for d in value.shape)
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return tuple(tuple(int(d) for d in v.shape) if isinstance(v, torch.Tensor) else None for v in value)
    return None


def _small_value(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str, torch.dtype, torch.device)) or value is None:
        return value
    if isinstance(value, torch.Size):
        return tuple(int(d) for d in value)
    if isinstance(value, (tuple, list)) and len(value) <= 16 and all(
            isinstance(v, (int, float, bool)) or v is None for v in value):
        return tuple(value)
    return None


class ShapeRecorder(fx.Interpreter):
    """An fx.Interpreter that writes shapes and small python values into node.meta."""

    def run_node(self, n: fx.Node) -> Any:
        opaque = op_kind(n, self.module) in ("function", "module", "method")
        try:
            if opaque:  # a leaf whose inside the graph cannot see: let FlopCounterMode price it
                with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                    result = super().run_node(n)
                n.meta[LEAF_FLOPS] = counter.get_total_flops()
            else:
                n.meta.pop(LEAF_FLOPS, None)  # (a node that replaced an opaque call may have copied its meta)
                result = super().run_node(n)
        except Exception as exc:  # re-raise naming the node, as torch.fx.passes.shape_prop does
            raise AnalysisError(f"shape propagation failed at node {n.format_node()}: {exc}") from exc
        n.meta[SHAPE] = _shape(result)
        if isinstance(result, torch.Tensor):
            n.meta[DTYPE] = result.dtype
            n.meta.pop(VALUE, None)
        else:
            n.meta[VALUE] = _small_value(result)
        return result


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], *, fake: bool = False) -> Any:
    """Record shapes on every node of ``gm``; returns the graph's output on the example.

    ``fake``: run on fake tensors (shapes without data: no memory for activations, no FLOPs spent), falling
    back to real ones where an op needs data (``.item()``, ``nonzero``). A rewritten graph is re-checked
    after every pass this way; a 1024-px encoder's attention maps are GBs each, so real runs add up.
    """
    with _frozen(gm):  # FlopCounterMode's module tracker hooks tensors that require grad, and fails on some
        try:
            return _propagate(gm, example_inputs, fake)
        finally:
            if fake:
                _purge_fakes(gm)


def _purge_fakes(gm: fx.GraphModule) -> None:
    """Forget fake tensors a module cached during a fake run (timm's LeViT, EfficientViT and TinyViT keep their
    attention biases in a dict in eval mode): a later real run would read them."""
    for module in gm.modules():
        for value in vars(module).values():
            if isinstance(value, dict):
                for key in [k for k, v in value.items() if isinstance(v, FakeTensor)]:
                    del value[key]


@contextlib.contextmanager
def _frozen(gm: fx.GraphModule) -> Iterator[None]:
    params = [p for p in gm.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _propagate(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], fake: bool) -> Any:
    fake_error: AnalysisError | None = None
    if fake:
        try:
            with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode, _quiet_fake_tensors():
                return ShapeRecorder(gm).run(*(mode.from_tensor(x) for x in example_inputs))
        except AnalysisError as exc:  # an op that reads data: real tensors answer it; any other op fake tensors
            if not isinstance(exc.__cause__, _DATA_DEPENDENT):  # cannot run (a custom autograd Function, an
                fake_error = exc  # exotic kernel) decides nothing: a real run says whether the graph runs
    try:
        with torch.no_grad():
            return ShapeRecorder(gm).run(*example_inputs)
    except AnalysisError:
        if fake_error is not None:  # both failed: the fake run's error names the node as it was first met
            raise fake_error from None
        raise


@contextlib.contextmanager
def _quiet_fake_tensors() -> Iterator[None]:
    """FakeTensorMode logs every op it fails on (with a traceback) before raising; the failure is re-raised
    here with the node named, or answered by a real run, so the log is noise."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
