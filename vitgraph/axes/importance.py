"""One-shot importance scores: what to keep when decisions are scored once instead of learned.

* ``magnitude_importance`` — per unit of a coupled group, the L2 norm of every weight slice it owns.
* ``taylor_importance`` — per unit, |dL/d(mask)| summed over calibration batches (first-order Taylor).
* ``influence`` — per block or branch, how much it changes the residual stream (1 - cosine).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.fx as fx
from torch import Tensor, nn

from vitgraph.meta import DepthUnit


class Owned(Protocol):
    """A unit group as the scores see it: how many units, and the weight slices each owns."""

    name: str
    units: int
    weights: tuple[tuple[str, int, tuple[tuple[int, ...], ...]], ...]  # (param, axis, indices per unit)


class Masked(Protocol):
    units: int
    mask: Tensor | None


def magnitude_importance(gm: nn.Module, sites: Sequence[Owned]) -> dict[str, Tensor]:
    """L2 norm of every weight slice a unit owns (its rows in q/k/v or fc1, its columns in proj or fc2)."""
    out = {}
    for s in sites:
        total = torch.zeros(s.units)
        for param, axis, indices in s.weights:
            w = gm.get_parameter(param).detach().float()
            per_index = w.pow(2).sum(dim=[d for d in range(w.dim()) if d != axis])
            total += torch.stack([per_index[list(idx)].sum() for idx in indices])
        out[s.name] = total.sqrt()
    return out


def taylor_importance(gm: fx.GraphModule, gates: Mapping[str, Masked], batches: Iterable[tuple[Tensor, Tensor]],
                      max_batches: int = 8, final_only: bool = False) -> dict[str, Tensor]:
    """First-order Taylor importance of each unit: |dL/d(mask)| summed over calibration batches.
    ``final_only``: the graph returns (final, *aux) and the loss is the final output's."""
    scores = {name: torch.zeros(g.units) for name, g in gates.items()}
    was_training = gm.training
    gm.eval()
    try:
        for i, (x, y) in enumerate(batches):
            if i >= max_batches:
                break
            for gate in gates.values():
                gate.mask = torch.ones(gate.units, requires_grad=True)
            out = gm(x)
            loss = nn.functional.cross_entropy(out[0] if final_only else out, y)
            grads = torch.autograd.grad(loss, [g.mask for g in gates.values()])
            for name, grad in zip(gates, grads):
                scores[name] += grad.abs()
    finally:
        for gate in gates.values():
            gate.mask = None
        gm.train(was_training)
    return scores


@torch.no_grad()
def influence(gm: fx.GraphModule, units: Sequence[DepthUnit], inputs: Sequence[tuple[Tensor, ...]]) -> Tensor:
    """How much each unit changes the residual stream: 1 - cos(stream in, stream out), per token, averaged.

    The one-shot score for ``train.steps: 0`` (no gates to learn): the units that change the
    stream least are skipped first.
    """
    wanted = {u.start for u in units} | {u.end for u in units}
    seen: dict[str, list[Tensor]] = {name: [] for name in wanted}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n.name in wanted:
                seen[n.name].append(out.detach().float())
            return out

    was_training = gm.training
    gm.eval()
    try:
        for x in inputs:
            Recorder(gm).run(*x)
    finally:
        gm.train(was_training)
    scores = []
    for u in units:
        values = []
        for a, b in zip(seen[u.start], seen[u.end]):
            a = a.reshape(b.shape)
            values.append(1.0 - nn.functional.cosine_similarity(a, b, dim=-1).mean())
        scores.append(torch.stack(values).mean())
    return torch.stack(scores)
