"""Compression axes: each is an instrument pass, a materialize pass and one method behind ``Axis``.

``AXES`` lists the built-in axes in the order the spec gives them (and their instrument passes
run): width, conv, exits, tokens, depth. Exits come before the block gates so that an exit after a skipped block
reads the gated stream. ``build_axes`` asks each axis whether the spec wants it on this model;
``vg.instrument(..., axes=[MyAxis])`` adds axes of your own (see docs/architecture.md). An axis states its
decisions as factors a pricer multiplies (``Factors``), never prices itself: it may import analysis, gates,
passes and the ground floor, never cost, the gated model, training or anything above.
"""
from __future__ import annotations

from collections.abc import Sequence

from vitgraph.axes.base import Axis, AxisContext
from vitgraph.axes.conv import ConvAxis
from vitgraph.axes.depth import DepthAxis
from vitgraph.axes.exits import ExitsAxis
from vitgraph.axes.tokens import TokenAxis
from vitgraph.axes.width import WidthAxis
from vitgraph.errors import SpecError

AXES: tuple[type[Axis], ...] = (WidthAxis, ConvAxis, ExitsAxis, TokenAxis, DepthAxis)


def build_axes(ctx: AxisContext, extra: Sequence[type[Axis]] = ()) -> list[Axis]:
    """The axes the spec asks for on ``ctx.graph``, in spec order, then ``extra`` ones."""
    axes = [a for a in (cls.from_spec(ctx) for cls in (*AXES, *extra)) if a is not None]
    names = [a.name for a in axes]
    if len(set(names)) != len(names):
        raise SpecError(f"two axes share a name in {names}: each axis needs its own (Axis.name)")
    if not axes:
        raise SpecError("the spec compresses nothing: set width.heads and/or width.mlp, depth.skip_blocks, "
                        "depth.exits, tokens or attention.to_conv")
    return axes


__all__ = ["AXES", "Axis", "AxisContext", "build_axes"]
