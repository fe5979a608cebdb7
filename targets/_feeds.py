"""What the INT8 target feeds ONNX Runtime and how it compares two models' logits.

Batches (torch tensors, numpy arrays or ``(inputs, labels)`` pairs) become ORT feeds, cut to a file's fixed
batch where it has one; without data, seeded random images of the model's input shape. Agreement is the
fraction of images whose top-1 class matches; on random images only the decisive ones are judged (a near-tie
flips under any rounding, so it says nothing about the quantization).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitgraph.targets._common import LoweringError

__all__ = ["CHECK_IMAGES", "DECISIVE", "Reader", "agreement", "decisive_agreement", "feeds", "labels",
           "logits", "model_input", "random_feeds"]

CHECK_IMAGES = 64      # random images checked when there is no data
DECISIVE = 4.0         # random inputs: a row is judged when its top-1 margin > this x the median logit error


def feeds(batches: Iterable[Any] | None, name: str, limit: int | None = None, fixed: int | None = None
          ) -> list[dict[str, np.ndarray]]:
    """ORT feeds from batches of torch tensors, numpy arrays or (inputs, labels) pairs, ``limit`` images at most;
    cut into batches of ``fixed`` images for a file whose batch axis is fixed (a serving batch)."""
    out: list[dict[str, np.ndarray]] = []
    seen = 0
    for batch in batches or ():
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
        if limit is not None:
            x = x[: limit - seen]
        step = fixed or len(x)
        for i in range(0, len(x) - step + 1, step) if len(x) else ():
            out.append({name: np.ascontiguousarray(x[i:i + step])})
            seen += step
        if limit is not None and seen >= limit:
            break
    return out


class Reader:
    """A CalibrationDataReader over fixed feeds (ORT's protocol: ``get_next`` until None)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds, self.i = feeds, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        self.i += 1
        return self.feeds[self.i - 1] if self.i <= len(self.feeds) else None

    def rewind(self) -> None:
        self.i = 0


def model_input(path: Path) -> tuple[str, tuple[int, ...], int | None]:
    """The model's single input: its name, its shape after the batch axis and its batch size when fixed."""
    import onnx

    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise LoweringError(f"int8: {path} takes {len(inputs)} inputs; INT8 lowering handles image models with "
                            "one input tensor.")
    batch, *dims = inputs[0].type.tensor_type.shape.dim
    if any(not d.dim_value for d in dims):
        raise LoweringError(f"int8: the input of {path} has a symbolic size beyond the batch axis; export it "
                            "at a fixed image size.")
    return inputs[0].name, tuple(d.dim_value for d in dims), batch.dim_value or None


def random_feeds(path: Path, images: int = CHECK_IMAGES, batch: int = 16, seed: int = 0
                 ) -> list[dict[str, np.ndarray]]:
    """``images`` seeded standard-normal images shaped for the file at ``path``, in batches."""
    name, shape, fixed = model_input(path)
    rng = np.random.default_rng(seed)
    batch = fixed or batch
    return [{name: rng.standard_normal((batch if fixed else min(batch, images - i), *shape), dtype=np.float32)}
            for i in range(0, images, batch)]


def logits(sess: Any, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The first output of ``sess`` on every feed, concatenated along the batch."""
    return np.concatenate([sess.run(None, f)[0] for f in feeds]) if feeds else np.zeros((0, 0), np.float32)


def agreement(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(fraction of rows whose argmax agrees, max abs difference) of two logit arrays."""
    if reference.shape != other.shape or not len(reference):
        raise LoweringError(f"int8: outputs of shape {other.shape} where fp32 gives {reference.shape}")
    agree = float(np.mean(reference.argmax(-1) == other.argmax(-1)))
    return agree, float(np.max(np.abs(reference.astype(np.float64) - other)))


def decisive_agreement(reference: np.ndarray, other: np.ndarray) -> tuple[float, int]:
    """(agreement, images) over the rows where ``reference``'s top-1 leads its runner-up by more than
    :data:`DECISIVE` times the median absolute logit difference: on random inputs most rows are near-ties that
    any rounding flips, and they say nothing about the quantization. No decisive row: (1.0, 0)."""
    top2 = np.sort(reference, axis=-1)[:, -2:]
    noise = float(np.median(np.abs(reference - other)))
    keep = (top2[:, 1] - top2[:, 0]) > DECISIVE * noise
    if not keep.any():
        return 1.0, 0
    return float(np.mean(reference[keep].argmax(-1) == other[keep].argmax(-1))), int(keep.sum())


def labels(data: list[Any]) -> np.ndarray | None:
    """The labels of (inputs, labels) batches, None when batches carry inputs only."""
    if not all(isinstance(b, (tuple, list)) and len(b) > 1 for b in data):
        return None
    return np.concatenate([np.asarray(b[1].cpu() if isinstance(b[1], torch.Tensor) else b[1]) for b in data])
