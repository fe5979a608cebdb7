"""vitgraph: a torch.fx graph compiler that recognises, prunes and lowers Vision Transformers."""
from __future__ import annotations

__version__ = "0.1.0"
