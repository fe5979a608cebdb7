"""torch.compile target: the module wrapped by ``torch.compile``, checked once against eager.

Invariant: when example inputs are given, the compiled callable is returned only after its first
call on them (which triggers compilation) matched eager PyTorch within ``atol``; otherwise
:class:`~vitgraph.errors.ParityError` is raised, or :class:`~vitgraph.targets.LoweringError` when
Dynamo or the backend fails. The check runs under ``torch.inference_mode()``; call the result
under it too, or Dynamo recompiles for the other grad mode.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from vitgraph.targets._common import (LoweringReport, check_example_inputs, lowering_error, model_name,
                                      verify, warn_if_training)

__all__ = ["lower", "lower_with_report"]

_HINT = ("Fix: make the failing code compilable, or try backend='aot_eager' to tell Dynamo failures "
         "(tracing) from backend ones (inductor needs a working C++ compiler on CPU).")


def lower_with_report(module: nn.Module, example_inputs: Sequence[torch.Tensor], *, atol: float = 1e-4,
                      mode: str | None = None, dynamic: bool | None = None, backend: str = "inductor",
                      name: str | None = None) -> tuple[Callable[..., Any], LoweringReport]:
    """Compile ``module`` and check it on ``example_inputs``; return it with the measured error.

    ``seconds`` in the report is the first call, i.e. Dynamo tracing plus backend compilation.
    """
    name = model_name(module, name)
    example = check_example_inputs(example_inputs, "compile")
    warn_if_training(module, "compile", name)
    compiled = torch.compile(module, mode=mode, dynamic=dynamic, backend=backend)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            compiled(*example)
    except Exception as exc:  # noqa: BLE001 - Dynamo/inductor errors become one LoweringError
        raise lowering_error(exc, target="torch.compile", name=name, hint=_HINT) from exc
    seconds = time.perf_counter() - start

    def call(*xs: torch.Tensor) -> Any:
        with torch.inference_mode():
            return compiled(*xs)

    per_batch = verify(module, {example[0].shape[0]: example}, call, target="torch.compile", name=name,
                       atol=atol, where=f" (backend={backend}, mode={mode})")
    report = LoweringReport("compile", None, max(per_batch.values(), default=0.0), per_batch, seconds)
    return compiled, report


def lower(module: nn.Module, example_inputs: Sequence[torch.Tensor] | None = None, *, atol: float = 1e-4,
          mode: str | None = None, dynamic: bool | None = None, backend: str = "inductor",
          name: str | None = None) -> Callable[..., Any]:
    """``torch.compile(module)``; with ``example_inputs``, compiled and parity-checked right away.

    Without example inputs nothing is checked and compilation happens on the first call.
    The report of the check, if any, is on the result as ``.lowering_report``.
    """
    if example_inputs is None:
        return torch.compile(module, mode=mode, dynamic=dynamic, backend=backend)
    compiled, report = lower_with_report(module, example_inputs, atol=atol, mode=mode, dynamic=dynamic,
                                         backend=backend, name=name)
    compiled.lowering_report = report  # type: ignore[attr-defined]
    return compiled
