"""Gate primitives shared by every pass (methods.md §0) and the gate module the graph calls.

Each primitive has one implementation here. Forward values are exact hard decisions where the
method says so; backward rules are the ones the methods specify (straight-through, surrogates).
Ties are broken by index everywhere, so every DDP rank takes the same decision.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _SteStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p: Tensor, surrogate: Tensor) -> Tensor:  # noqa: D102
        return (p > 0.5).to(p.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:  # noqa: D102
        return None, grad


def ste_step(p: Tensor, surrogate: Tensor | None = None) -> Tensor:
    """Forward ``1[p > 0.5]``; backward the gradient of ``surrogate`` (default: p itself)."""
    surrogate = p if surrogate is None else surrogate
    return _SteStep.apply(p.detach(), surrogate)


def concrete(p: Tensor, tau: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """Binary-concrete sample: forward ``1[g > 0]``, backward through ``sigmoid(g)``."""
    u = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype).clamp(1e-6, 1 - 1e-6)
    p = p.clamp(1e-6, 1 - 1e-6)
    g = (u.log() - (1 - u).log() + p.log() - (1 - p).log()) / tau
    soft = torch.sigmoid(g)
    return (g > 0).to(p.dtype) - soft.detach() + soft


def gumbel2(logits: Tensor, tau: float = 1.0, hard: bool = True) -> Tensor:
    """Gumbel-softmax over a trailing axis of size 2; ``hard`` gives a one-hot forward, soft gradient."""
    if logits.shape[-1] != 2:
        raise ValueError(f"gumbel2 expects a trailing axis of size 2, got shape {tuple(logits.shape)}")
    return nn.functional.gumbel_softmax(logits, tau=tau, hard=hard, dim=-1)


class _TopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: Tensor, k: Tensor) -> Tensor:  # noqa: D102
        mask = topk_hard(scores.detach(), int(k.item()))
        ctx.save_for_backward(mask)
        return mask

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D102
        (mask,) = ctx.saved_tensors
        return grad, (mask * grad).sum()  # WDPruning: d t = sum_i mask_i dmask_i, no sigmoid factor


def topk_hard(scores: Tensor, k: int) -> Tensor:
    """1 on the k largest scores, 0 elsewhere; ties go to the lower index (stable on every rank)."""
    n = scores.numel()
    k = max(0, min(int(k), n))
    order = torch.sort(scores.detach().float(), descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=scores.dtype, device=scores.device)
    mask[order[:k]] = 1
    return mask


def topk_mask(scores: Tensor, k: Tensor) -> Tensor:
    """``topk_hard`` whose backward passes the gradient to the scores unchanged and to ``k`` as a sum.

    ``k`` is a (float) tensor carrying the gradient path to whatever produced it (a threshold).
    """
    return _TopK.apply(scores, k)


class _Ceil(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, clip: float) -> Tensor:  # noqa: D102
        ctx.clip = clip
        return torch.ceil(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return (grad.clamp(-ctx.clip, ctx.clip) if ctx.clip else grad), None


def ceil_ste(x: Tensor, clip: float = 0.0) -> Tensor:
    """Forward ``ceil``, backward identity (clipped to ``[-clip, clip]`` when ``clip`` > 0)."""
    return _Ceil.apply(x, clip)


def clamp_ste(x: Tensor, low: float, high: float) -> Tensor:
    """Forward ``clamp``, backward identity: a count held at its bound still learns to leave it."""
    return x + (x.clamp(low, high) - x).detach()


class _LeastSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, k: Tensor) -> Tensor:  # noqa: D102
        ordered = torch.sort(values.detach(), stable=True).values
        kk = max(0, min(int(k.item()), values.numel()))
        ctx.next = ordered[kk] if kk < values.numel() else ordered.new_zeros(())
        return ordered[:kk].sum()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:  # noqa: D102
        return None, grad * ctx.next


def least_sum(values: Tensor, k: Tensor) -> Tensor:
    """Sum of the ``k`` smallest values; its gradient w.r.t. ``k`` is the (k+1)-th smallest value."""
    return _LeastSum.apply(values, k)


class UnitGate(nn.Module):
    """Masks the units of one coupled group where their consumer reads them.

    Called twice in the graph: on the consumer linear's input (each channel times its unit's mask)
    and, with ``branch=True``, on the residual branch it feeds (times 0 when no unit is kept, so a
    layer with every head pruned contributes nothing, exactly as the deleted branch will). With no
    mask set the gate is the identity: the ``open`` mode. ``channel_axis`` is where the consumer's
    input holds its channels: -1 for a Linear, 1 for a pointwise conv on (B, C, H, W). Called with
    ``unit_axis`` it masks a tensor holding one entry per unit along that axis (the logits of each head where a
    talking-heads mix reads them).
    """

    def __init__(self, group: str, units: int, channel_unit: Tensor, min_units: int, channel_axis: int = -1) -> None:
        super().__init__()
        self.group = group
        self.units = units
        self.min_units = min_units
        self.channel_axis = channel_axis
        self.register_buffer("channel_unit", channel_unit.long(), persistent=False)
        self.mask: Tensor | None = None

    def forward(self, x: Tensor, branch: bool = False, eps: float | None = None, weight: Tensor | None = None,
                bias: Tensor | None = None, unit_axis: int | None = None) -> Tensor:
        m = self.mask
        if eps is not None:  # a LayerNorm over the group's channels (the stream): statistics over kept ones
            return self._norm(x, m, eps, weight, bias)
        if m is None:
            return x
        if branch:
            return x * (m.detach().sum() > 0).to(x.dtype)
        if unit_axis is not None:  # one entry per unit along that axis (talking heads: each head's logits)
            view = [self.units if d == unit_axis % x.dim() else 1 for d in range(x.dim())]
            return x * m.reshape(view).to(x.dtype)
        full = torch.cat([m, m.new_ones(1)])[self.channel_unit]  # -1: a channel no unit owns
        if self.channel_axis != -1:  # (C,) -> (C, 1, ..., 1): broadcast over the axes after the channels
            full = full.reshape(full.shape + (1,) * (x.dim() - 1 - self.channel_axis))
        return x * full.to(x.dtype)

    def _norm(self, x: Tensor, m: Tensor | None, eps: float, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """LayerNorm over the last axis as the narrowed graph computes it: mean and variance over the kept
        channels only (all of them with no mask: exactly ``F.layer_norm``). Pruned channels carry garbage
        that every reader masks."""
        if m is None:
            return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
        full = m.to(x.dtype)
        k = full.sum()
        mean = (x * full).sum(-1, keepdim=True) / k
        d = (x - mean) * full
        y = d * torch.rsqrt((d * d).sum(-1, keepdim=True) / k + eps)
        y = y * weight if weight is not None else y
        return y + bias if bias is not None else y

    def extra_repr(self) -> str:
        axis = f", channel_axis={self.channel_axis}" if self.channel_axis != -1 else ""
        return f"{self.group}, units={self.units}, channels={self.channel_unit.numel()}{axis}"


class BlockGate(nn.Module):
    """Keeps or skips a residual block, or one residual branch (methods.md §4.3).

    A block gate is called as ``gate(x_in, x_out)`` on the block's input and output streams and
    computes ``u x_out + (1 - u) x_in``; a branch gate is called as ``gate(branch)`` just before the
    residual add and computes ``u branch``. ``u`` is ``None`` (open: the graph is the original),
    a bool (a hard decision, computed exactly: the skipped value is ``x_in`` or zeros, as in the
    graph with the block deleted) or a tensor (a soft sample while learning).
    """

    def __init__(self, unit: str, kind: str) -> None:
        super().__init__()
        if kind not in ("block", "attn", "mlp"):
            raise ValueError(f"BlockGate kind must be block, attn or mlp, got {kind!r}")
        self.unit = unit
        self.kind = kind
        self.u: Tensor | bool | None = None

    def forward(self, *xs: Tensor) -> Tensor:
        u = self.u
        if self.kind == "block":
            x_in, x_out = xs
            if u is None or u is True:
                return x_out
            x_in = x_in.reshape(x_out.shape)  # (B, H, W, C) in, (B, H*W, C) out in some Swin blocks
            return x_in if u is False else u * x_out + (1 - u) * x_in
        (branch,) = xs
        if u is None or u is True:
            return branch
        return torch.zeros_like(branch) if u is False else u * branch

    def extra_repr(self) -> str:
        return f"{self.unit}, kind={self.kind}"
