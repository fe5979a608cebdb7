"""The learnable modules a gated graph is made of, and the estimators they train with.

``units`` holds the unit and block gates (a mask over heads, value dims, MLP units or embedding channels; a
gate over a whole residual branch) and the straight-through / relaxed estimators the methods share
(``ste_step``, ``concrete``, ``gumbel2``, ``topk_hard``, ``ceil_ste``, ...); ``tokens`` the token selectors,
key masks and the package-token head; ``conv`` the attention-or-convolution choice of SPViT-He. Passes insert
and remove these modules, axes drive them, so they sit below both: this room imports torch and
``vitgraph.errors`` / ``vitgraph.meta`` only.
"""
from vitgraph.gates.units import (BlockGate, UnitGate, ceil_ste, clamp_ste, concrete, gumbel2, least_sum, ste_step,
                                  topk_hard, topk_mask)

__all__ = ["UnitGate", "BlockGate", "ste_step", "concrete", "gumbel2", "topk_hard", "topk_mask", "ceil_ste",
           "clamp_ste", "least_sum"]
