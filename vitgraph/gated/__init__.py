"""The gated model: a traced graph with the gates of every axis, and its compact rewrite.

``build`` holds ``instrument`` (axes -> instrument passes -> ``GatedModel`` with a ``Cost``), ``materialize``
(the axes' materialize passes -> the compact ``fx.GraphModule``) and ``compile_spec`` (both, one-shot);
``model`` holds ``GatedModel``, the ``nn.Module`` the training loop drives. This room may import the rooms
below it (capture, targets, analysis, gates, passes, axes, cost), never train, report, the pipeline or the
commands: the cost is handed in, so the gated model never asks how it is measured.
"""
from vitgraph.gated.build import builder, compile_spec, instrument, materialize
from vitgraph.gated.model import GatedModel

__all__ = ["GatedModel", "instrument", "materialize", "compile_spec", "builder"]
