"""Errors vitgraph raises on purpose.

Every error a user can cause derives from :class:`VitgraphError`; the CLI turns those into a
one-paragraph message and exit code 2. Messages name the problem *and* the fix.
"""
from __future__ import annotations


class VitgraphError(Exception):
    """Base class: bad input or a check that failed. The CLI exits with code 2 on these."""


class ModelNotFoundError(VitgraphError):
    """A model name or ``path:function`` reference that cannot be resolved."""


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
