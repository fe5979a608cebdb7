"""Errors vitgraph raises on purpose.

Every error a user can cause derives from :class:`VitgraphError`; the CLI turns those into a
one-paragraph message and exit code 2. Messages name the problem *and* the fix.
"""
from __future__ import annotations

import re
import traceback

# frames in these folders are ours or the frameworks': a user's model code is anywhere else
_LIBRARY_DIRS = ("/torch/", "/onnxscript/", "/onnxruntime/", "/onnx/", "/vitgraph/", "/targets/", "/passes/")


def user_frame(exc: BaseException) -> str | None:
    """``file:line `source``` of the deepest frame in user code (model code), when there is one.

    An error raised inside an fx-generated forward quotes the original source location in its text;
    that location wins over the traceback.
    """
    match = re.search(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.*)', str(exc))
    if match:
        return f"{match.group(1)}:{match.group(2)} `{match.group(4).strip()}`"
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = frame.filename.replace("\\", "/")
        stdlib = "/lib/python3" in path and "-packages/" not in path
        if not stdlib and not any(p in path for p in _LIBRARY_DIRS):
            return f"{frame.filename}:{frame.lineno} `{(frame.line or '').strip()}`"
    return None


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of an exception raised in code we do not own, for one-line errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class VitgraphError(Exception):
    """Base class: bad input or a check that failed. The CLI exits with code 2 on these."""


class ModelNotFoundError(VitgraphError):
    """A model name or ``path:function`` reference that cannot be resolved."""


class ModelError(VitgraphError):
    """A model that resolves but cannot be used: its builder raises, returns no nn.Module, or it is no ViT."""


class CheckpointError(ModelError):
    """A ``--checkpoint`` (or a compiled model's file) that is missing, unreadable, or does not fit the model."""


class TraceError(VitgraphError):
    """torch.fx could not trace the model; the message names the op, the module and the fix."""


class InputSizeError(VitgraphError):
    """The example input does not fit the model (wrong channels, image size, ...)."""


class AnalysisError(VitgraphError):
    """Structure recognition found something inconsistent in the graph."""


class PreconditionError(VitgraphError):
    """A pass was run on a graph that lacks what it requires (names the pass and the node)."""


class PostconditionError(VitgraphError):
    """A pass produced a graph that breaks what it promised (names the pass and the node)."""


class ParityError(VitgraphError):
    """A lowered model disagrees with eager PyTorch beyond the stated tolerance."""


class SpecError(VitgraphError):
    """A compression spec with an unknown key, a bad value or an impossible budget."""


class DataError(VitgraphError):
    """A data source that cannot be read: unknown name, missing folder, no images in the expected layout."""
