"""Training: the one generic loop every learned method runs (task loss, distillation from the dense graph,
the gated model's penalties and budget term; search then fine-tune; checkpoints; ``torchrun``), its
resumable state, its parameter groups, and the data it reads (digits, ImageFolder, ``none``).

``loop`` (``fit``, ``evaluate``), ``state`` (checkpoints), ``groups`` (optimizer parameter groups), ``data``.
The loop drives any model with the ``Compressible`` hooks, so it imports no gated model, no axis and no
cost: only the ground floor (errors, spec) and torch / timm.
"""
from vitgraph.train.data import Data, load_data
from vitgraph.train.loop import FitResult, evaluate, fit, task_loss

__all__ = ["fit", "evaluate", "task_loss", "FitResult", "Data", "load_data"]
