"""torch.export target: a self-contained ``.pt2`` (graph + weights) with a dynamic batch axis.

Invariant: :func:`lower` returns only after the saved file, loaded back with ``torch.export.load``,
matched eager PyTorch within ``atol`` at every batch size in ``check_batches``. The file needs
nothing but torch to run: ``torch.export.load(path).module()(x)`` works in a process that never
imported vitgraph or timm.
"""
from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from vitgraph.targets._common import (LoweringError, LoweringReport, batched_inputs, check_example_inputs,
                                     describe_failure, lowering_error, model_name, plan_batches, verify,
                                     warn_if_training)

__all__ = ["lower", "load"]

_HINT = ("Fix: torch.export must trace the model without data-dependent Python branches; the "
         "exportdb (https://pytorch.org/docs/stable/generated/exportdb/index.html) lists rewrites. "
         "A 'Constraints violated (batch)' error means the model ties the batch size to a constant.")


def lower(module: nn.Module, example_inputs: Sequence[torch.Tensor], path: str | os.PathLike, *,
          atol: float = 1e-4, check_batches: Sequence[int] = (1, 3), name: str | None = None) -> LoweringReport:
    """Export ``module`` with a dynamic batch axis to ``path`` (``.pt2``), reload it and verify it."""
    name = model_name(module, name)
    example = check_example_inputs(example_inputs, "export")
    warn_if_training(module, "export", name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args, dynamic, check_batches = plan_batches(module, example, check_batches)
    batch = torch.export.Dim("batch")

    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(module, args,
                                             dynamic_shapes=tuple({0: batch} for _ in args) if dynamic else None)
        torch.export.save(program, path)
    except Exception as exc:  # noqa: BLE001 - re-raised as one readable LoweringError
        raise lowering_error(exc, target="torch.export", name=name, hint=_HINT) from exc
    seconds = time.perf_counter() - start

    loaded = load(path)
    cases = {b: batched_inputs(example, b, seed=b) for b in check_batches}
    per_batch = verify(module, cases, loaded, target="torch.export", name=name, atol=atol, where=f" ({path})")
    return LoweringReport("export", str(path), max(per_batch.values(), default=0.0), per_batch, seconds)


def load(path: str | os.PathLike) -> nn.Module:
    """The runnable module in a ``.pt2`` file (``torch.export.load(path).module()``)."""
    if not Path(path).is_file():
        raise LoweringError(f"export: no .pt2 file at {path}; create one with vitgraph.targets.export.lower().")
    try:
        return torch.export.load(path).module()
    except Exception as exc:  # noqa: BLE001 - a corrupt file or one from an incompatible torch
        raise LoweringError(f"export: cannot load {path}: {describe_failure(exc)}. It is not a .pt2 this torch "
                            f"({torch.__version__}) can load; re-export it with vitgraph.targets.export.lower().") from exc
