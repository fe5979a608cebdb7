"""Capture: a user's ``nn.Module`` becomes a graph in vitgraph's one dialect.

``models`` resolves what a user names (a timm name, ``file.py:function``, a Hugging Face model, a checkpoint)
and the input size it expects; ``frontend`` is the one entry (``capture_module``: ``torch.export`` by default,
``torch.fx`` for graphs already in the dialect or when ``VITGRAPH_FRONTEND=fx`` asks) plus eager reference runs
and the exactness check; ``export`` captures with ``torch.export`` (non-strict, dynamic batch) and raises the
graph to the torch-level dialect the analyses read; ``aten`` is the table of aten spellings it renames;
``errors`` turns export failures into TraceErrors naming the model's line. May import ``vitgraph.errors`` and
``vitgraph.meta`` only: nothing here knows what a ViT is.
"""
from vitgraph.capture.export import export_module, is_stochastic

__all__ = ["export_module", "is_stochastic"]
