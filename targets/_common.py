"""What every lowering target shares: the report, the error, test inputs and the parity check.

Invariant: a target hands back an artefact only after :func:`verify` has run it next to eager
PyTorch on the same inputs and found the largest absolute difference within ``atol``; otherwise
it raises :class:`~vitgraph.errors.ParityError`. Failures of the exporters themselves surface as
:class:`LoweringError` (a :class:`~vitgraph.errors.VitgraphError`) naming the op that broke.
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitgraph.errors import ParityError, VitgraphError, user_frame
from vitgraph.capture.frontend import max_abs_diff

__all__ = ["LoweringReport", "LoweringError", "batched_inputs", "check_example_inputs", "model_name", "warn_if_training",
           "verify", "failing_op", "describe_failure", "raised_by", "lowering_error"]


class LoweringError(VitgraphError):
    """An exporter or compiler could not lower the model (the message names the op when it can)."""


@dataclass(frozen=True)
class LoweringReport:
    """Outcome of one lowering: where it went, how far it is from eager, how long it took."""

    target: str                      # "onnx", "compile" or "export"
    path: str | None                 # the artefact on disk (None for torch.compile)
    max_abs_err: float               # worst over the checked batch sizes
    per_batch: Mapping[int, float]   # batch size -> max abs error at that batch
    seconds: float                   # export / compile time, verification excluded


SERVING_BATCH = "serving_batch"  # attribute of a compact graph that runs at one batch size only


def serving_batch(module: nn.Module) -> int | None:
    """The one batch size ``module`` runs at (a per-image token graph: 1), or None for any batch."""
    b = getattr(module, SERVING_BATCH, None)
    return int(b) if isinstance(b, int) and not isinstance(b, bool) else None


def plan_batches(module: nn.Module, example: tuple[torch.Tensor, ...],
                 check_batches: Sequence[int]) -> tuple[tuple[torch.Tensor, ...], bool, Sequence[int]]:
    """(export arguments, whether the batch axis is dynamic, batches to verify). Batch-1 examples are
    doubled for a dynamic axis (a size-1 axis invites torch.export to specialise it to 1); a module with a
    serving batch exports and is checked at that batch only."""
    fixed = serving_batch(module)
    if fixed is not None:
        return batched_inputs(example, fixed, randomise=False), False, (fixed,)
    args = example if example[0].shape[0] != 1 else batched_inputs(example, 2, randomise=False)
    return args, True, check_batches


def model_name(module: nn.Module, name: str | None = None) -> str:
    """The name used in messages: the caller's, else the class name (a traced timm ViT keeps its)."""
    return name or type(module).__name__


def warn_if_training(module: nn.Module, target: str, name: str) -> None:
    """Lowering bakes in the current mode; a module left in training mode usually is a mistake."""
    if module.training:
        warnings.warn(f"{target}: {name} is in training mode, so the lowered model reproduces training "
                      "behaviour (dropout, batch statistics); call .eval() before lowering for inference.",
                      stacklevel=3)


def check_example_inputs(example_inputs: Any, target: str) -> tuple[torch.Tensor, ...]:
    """Validate that the example is a non-empty tuple of tensors sharing a leading batch axis."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise LoweringError(f"{target}: example_inputs must be a non-empty tuple of tensors, "
                            f"got {type(example_inputs).__name__}. Pass e.g. (torch.randn(1, 3, 224, 224),).")
    bad = [type(x).__name__ for x in example_inputs if not isinstance(x, torch.Tensor)]
    if bad:
        raise LoweringError(f"{target}: every example input must be a tensor, got {', '.join(bad)}. "
                            "Bake non-tensor arguments into the module (functools.partial or a wrapper).")
    batches = {x.shape[0] if x.dim() else None for x in example_inputs}
    if None in batches or len(batches) != 1 or 0 in batches:
        shapes = ", ".join(str(tuple(x.shape)) for x in example_inputs)
        raise LoweringError(f"{target}: every example input needs the same non-zero batch size on dim 0 "
                            f"(the axis made dynamic), got shapes {shapes}.")
    return tuple(example_inputs)


def batched_inputs(example_inputs: Sequence[torch.Tensor], batch: int, *, seed: int = 0,
                   randomise: bool = True) -> tuple[torch.Tensor, ...]:
    """Inputs like the example but with ``batch`` rows.

    Floating tensors are redrawn from a normal with the example's mean and std (``randomise``);
    integer and bool tensors (token ids, masks) and non-random requests cycle the example's rows.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x in example_inputs:
        if randomise and x.is_floating_point():
            std, mean = torch.std_mean(x.detach().float()) if x.numel() > 1 else (torch.tensor(1.0), x.float().mean())
            std = std if bool(std > 0) else torch.tensor(1.0)
            fresh = torch.randn((batch, *x.shape[1:]), generator=gen) * std + mean
            out.append(fresh.to(dtype=x.dtype, device=x.device))
        else:
            rows = torch.arange(batch, device=x.device) % x.shape[0]
            out.append(x.detach()[rows].clone())
    return tuple(out)


def _cpu(out: Any) -> Any:
    """Outputs as CPU tensors, nesting kept (numpy arrays from ONNX Runtime included)."""
    if isinstance(out, torch.Tensor):
        return out.detach().cpu()
    if type(out).__module__ == "numpy" and hasattr(out, "shape"):
        return torch.from_numpy(out)
    if isinstance(out, dict):
        return {k: _cpu(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [_cpu(v) for v in out]
    return out


def verify(module: nn.Module, cases: Mapping[int, tuple[torch.Tensor, ...]], run: Callable[..., Any], *,
           target: str, name: str, atol: float, where: str = "", hint: str = "") -> dict[int, float]:
    """Run eager ``module`` and the lowered ``run`` on each case; raise ParityError beyond ``atol``.

    ``run`` may return any nesting of tensors or numpy arrays; outputs are compared flattened.
    """
    per_batch: dict[int, float] = {}
    for batch, inputs in cases.items():
        with torch.inference_mode():
            reference = _cpu(module(*inputs))
        try:
            with torch.no_grad():  # a reloaded .pt2 holds parameters that require grad: no autograd graph
                lowered = run(*inputs)
        except Exception as exc:  # noqa: BLE001 - the runtime's own error becomes the message
            raise ParityError(
                f"The {target} lowering of {name}{where} fails to run at batch {batch}: "
                f"{describe_failure(exc)}. If it runs at the export batch size, the batch axis was specialised "
                "(a batch-size constant baked into the graph): look for one in the model."
            ) from exc
        per_batch[batch] = max_abs_diff(_cpu(lowered), reference)
    worst = max(per_batch.values(), default=0.0)
    hint = hint or ("make sure the model is in eval mode and deterministic (no dropout, no random ops, "
                    "no value-dependent branches); if the error is float32 rounding on large outputs, "
                    "pass a larger atol.")
    if not worst <= atol:  # also catches NaN
        detail = ", ".join(f"batch {b}: {e:.3g}" for b, e in per_batch.items())
        what = ("its outputs differ from eager in number or shape" if math.isinf(worst)
                else f"max abs error {worst:.3g} exceeds the tolerance atol={atol:g}")
        raise ParityError(f"The {target} lowering of {name}{where} disagrees with eager PyTorch: {what} "
                          f"({detail}). Hint: {hint}")
    return per_batch


_OP_PATTERNS = (
    re.compile(r"OpOverload\(op='([\w.]+)'"),
    re.compile(r"target=torch\.ops\.([\w.]+)"),
    re.compile(r"call_function\[target=([\w.]+)\]"),
    re.compile(r"(aten::\w+)"),
)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def failing_op(exc: BaseException) -> str | None:
    """The torch op an exporter error names (``aten.linalg_eig.default``), innermost first."""
    for err in reversed(_chain(exc)):
        for pattern in _OP_PATTERNS:
            match = pattern.search(str(err))
            if match:
                return match.group(1)
    return None


def _first_line(exc: BaseException) -> str:
    """``Type: first line``, plus the first ``- item`` line (torch puts the specifics there)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = " ".join([lines[0], *[ln[2:] for ln in lines[1:] if ln.startswith("- ")][:1]]) if lines else ""
    return f"{type(exc).__name__}: {text}".rstrip(": .")


def describe_failure(exc: BaseException) -> str:
    """One line: the innermost error, and where in user code it was raised when that is known."""
    chain = _chain(exc)
    root = chain[-1]
    text = _first_line(root)
    where = next((w for w in (user_frame(e) for e in reversed(chain)) if w), None)
    return f"{text} (at {where})" if where else text


def raised_by(exc: BaseException, class_name: str) -> bool:
    """Whether an exception of that class name is in ``exc``'s cause chain (exporter stages)."""
    return any(type(e).__name__ == class_name for e in _chain(exc))


def lowering_error(exc: BaseException, *, target: str, name: str, hint: str) -> LoweringError:
    """Wrap an exporter/compiler exception into a one-paragraph LoweringError."""
    op = failing_op(exc)
    at_op = f" at op {op}" if op else ""
    return LoweringError(f"The {target} lowering of {name} failed{at_op}: {describe_failure(exc)}. {hint}")
