"""The modules the token axis puts into the graph (methods.md §3): selectors, key masks, the final tokens.

Tokens are laid out ``[prefix ; content ; packages]``: prefix tokens (class, distillation, registers)
first, then the patch tokens still in play, then one package token per stage that dropped something.

Two ways to run a stage:

* **gathered** (static shapes, what the compact graph runs): the top-K content tokens are gathered,
  the rest folded into a package appended at the end. :class:`TokenSelector` (one-shot, scored by
  attention received) always runs this way; :meth:`LearnedTokenSelector.pack` is the learned one's.
* **masked** (what the learned selector trains with): every token keeps flowing; the selector
  returns keep flags ``alive`` (B, tokens) over all positions, and every later attention masks the
  keys of dead tokens (:class:`KeyMask`; a query always keeps its own key), so a dead token
  influences nothing. With the same decisions the two agree on the prefix outputs and kept tokens.

A module whose state is ``None`` is the identity (the ``open`` mode): the graph is the original.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitgraph.gates.units import gumbel2


def _gather(x: Tensor, index: Tensor) -> Tensor:
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def pack_top_k(x: Tensor, prefix: int, n: int, scores: Tensor, k: int, mean: bool) -> Tensor:
    """``[prefix ; n candidates ; rest]`` -> ``[prefix ; the top-k candidates by score ; rest ; package]``:
    the package is the score-weighted sum of the dropped candidates (divided by their weight with ``mean``)."""
    content = x[:, prefix:prefix + n]
    top = torch.topk(scores, k, dim=1)
    dropped = scores.scatter(1, top.indices, 0.0)
    package = dropped.unsqueeze(1) @ content
    if mean:
        package = package / (dropped.sum(1)[:, None, None] + 1e-6)
    return torch.cat([x[:, :prefix], _gather(content, top.indices), x[:, prefix + n:], package], 1)


class TokenSelector(nn.Module):
    """Keeps the ``keep`` content tokens that receive the most attention; folds the rest into one package.

    Called as ``selector(x, q, k)`` (q and k of the attention before it, (B, H, N, d)) or
    ``selector(x, probs)`` (that attention's probabilities, (B, H, N, N)). A token's score is the
    attention it receives from the ``prefix`` queries, averaged over heads and those queries (over
    every query when there is no prefix token). ``x`` is ``[prefix ; candidates content tokens ;
    packages]``; the output is ``[prefix ; the top-``keep`` ; the packages ; the new package]``, the
    package being the score-weighted mean of the dropped tokens (none when nothing is dropped).
    Only standard ops with static sizes: it traces, exports (TopK + GatherElements) and batches.

    ``head_gate``: ``(gate,)``, the unit gate of the source attention's heads when width prunes them (None:
    every head counts). Its mask, when set, restricts the mean to the kept heads: what the compact graph,
    whose q and k hold only those heads, computes. (A tuple, so the gate is not registered twice.)
    """

    def __init__(self, prefix: int, candidates: int, scale: float | None) -> None:
        super().__init__()
        self.prefix, self.candidates, self.scale = prefix, candidates, scale
        self.keep: int | None = None
        self.head_gate: tuple[nn.Module] | None = None

    def scores(self, a: Tensor, b: Tensor | None = None) -> Tensor:
        p = self.prefix
        if b is None:  # attention probabilities
            probs = a[:, :, :p] if p else a
        else:
            q = a[:, :, :p] if p else a
            probs = torch.softmax((q @ b.transpose(-2, -1)) * self.scale, dim=-1)
        heads = self.head_gate[0].mask if self.head_gate is not None else None
        if heads is None:
            return probs.mean(dim=(1, 2))
        w = heads.detach().to(probs.dtype)
        return (probs.mean(2) * (w / w.sum().clamp_min(1.0))[None, :, None]).sum(1)

    def forward(self, x: Tensor, a: Tensor, b: Tensor | None = None) -> Tensor:
        if self.keep is None or self.keep >= self.candidates:
            return x
        p, end = self.prefix, self.prefix + self.candidates
        s = self.scores(a, b)[:, p:end]
        return pack_top_k(x, p, self.candidates, s, self.keep, mean=True)

    def extra_repr(self) -> str:
        return f"prefix={self.prefix}, candidates={self.candidates}, keep={self.keep}"


class LearnedTokenSelector(nn.Module):
    """SPViT's selector (methods.md §3.1-3.2): per-head token scores weighed by a head-weight net.

    ``mode``: None (open: identity), ``"train"`` (Gumbel keep/drop), ``"eval"`` (keep where the keep
    log-probability wins) or an int K (keep the top-K by keep probability, the static decision).
    Masked call: ``selector(x, alive)`` -> ``(x + [package], alive + [package alive])``, positions
    ``[prefix ; patches ; packages]`` fixed. Gathered (compact) form: :meth:`pack` (``compact`` set).
    """

    def __init__(self, dim: int, heads: int, prefix: int, patches: int, packages: int) -> None:
        super().__init__()
        if dim % heads:
            heads = 1  # the channels do not split into heads: score the token as one head
        d = dim // heads
        self.heads, self.prefix, self.patches, self.packages = heads, prefix, patches, packages
        hidden = max(1, heads // 2)
        self.head_net = nn.Sequential(nn.Linear(heads, hidden), nn.GELU(), nn.Linear(hidden, heads), nn.Sigmoid())
        self.embed = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU())
        h2, h4 = max(1, d // 2), max(1, d // 4)
        self.decide = nn.Sequential(nn.Linear(d, h2), nn.GELU(), nn.Linear(h2, h4), nn.GELU(), nn.Linear(h4, 2))
        self.local = d // 2
        self.mode: str | int | None = None
        self.always_package = False  # dynamic decisions: append the package even when it is empty (static count)
        self.compact: tuple[int, int, int] | None = None  # (candidates, keep, dynamic) for the gathered form
        self.last: Tensor | None = None  # the keep decisions of the last train forward (B, patches)
        # width.embed: the stream's unit gate (a tuple: not registered twice), whose mask (one entry per stream
        # channel) restricts what the scorer reads to the kept channels; ``narrow`` builds the compact form
        self.stream_gate: tuple[nn.Module] | None = None
        self.chunks: nn.ModuleList | None = None
        self.bounds: tuple[tuple[int, int], ...] | None = None  # each head's kept channels in the narrowed stream

    def flops_per_token(self, stream: float = 1.0) -> float:
        """FLOPs of the linears for one content token (what FlopCounterMode counts); ``stream``: the kept
        fraction of the stream's channels, which the first scorer linear reads (narrowed: d x kept columns)."""
        return sum(2 * m.in_features * m.out_features * (1 if i == 0 else self.heads) * (stream if i == 1 else 1)
                   for i, seq in enumerate((self.head_net, self.embed, self.decide))
                   for m in seq if isinstance(m, nn.Linear))

    def narrow(self, channels: list[int]) -> None:
        """The compact scorer over the stream narrowed to ``channels`` (sorted, dense numbering): head i's chunk
        is the kept channels of its slice, contiguous in the narrowed stream, and reads them through its own
        LayerNorm and linear, the shared ones' entries for those channels (a chunk with none kept: the bias)."""
        norm, lin = self.embed[0], self.embed[1]
        d = lin.in_features
        chunks, bounds, start = [], [], 0
        for i in range(self.heads):
            idx = torch.tensor([c - i * d for c in channels if i * d <= c < (i + 1) * d], dtype=torch.long)
            n = idx.numel()
            ln: nn.Module = nn.Identity()
            if n:
                ln = nn.LayerNorm(n, eps=norm.eps, elementwise_affine=norm.weight is not None)
                if norm.weight is not None:
                    ln.weight.data.copy_(norm.weight.data[idx])
                    ln.bias.data.copy_(norm.bias.data[idx])
            part = nn.Linear(max(n, 1), d, bias=lin.bias is not None)  # (a zero-column init warns: set below)
            part.weight, part.in_features = nn.Parameter(lin.weight.data[:, idx].clone()), n
            if lin.bias is not None:
                part.bias.data.copy_(lin.bias.data)
            chunks.append(nn.Sequential(ln, part))
            bounds.append((start, start + n))
            start += n
        self.chunks, self.bounds = nn.ModuleList(chunks), tuple(bounds)

    def _heads(self, content: Tensor) -> tuple[Tensor, Tensor]:
        """Per head: the mean of its channels (B, n, H) and the embedded slice (B, n, H, d), over the kept
        channels of each head's slice when the stream is narrowed (``bounds``) or masked (``stream_gate``)."""
        if self.bounds is not None:
            parts = [content[..., a:z] for a, z in self.bounds]
            means = torch.stack([x.sum(-1) / max(1, z - a) for x, (a, z) in zip(parts, self.bounds)], -1)
            return means, self.embed[2](torch.stack([c(x) for c, x in zip(self.chunks, parts)], 2))
        h = content.reshape(content.shape[0], content.shape[1], self.heads, -1)
        mask = self.stream_gate[0].mask if self.stream_gate is not None else None
        if mask is None:
            return h.mean(-1), self.embed(h)
        m = mask.to(h.dtype).reshape(self.heads, -1)     # what the narrowed graph reads: kept channels only
        k = m.sum(-1, keepdim=True).clamp_min(1.0)
        mean = (h * m).sum(-1, keepdim=True) / k
        norm = self.embed[0]
        dev = (h - mean) * m
        y = dev * torch.rsqrt((dev * dev).sum(-1, keepdim=True) / k + norm.eps)
        y = y * norm.weight + norm.bias if norm.weight is not None else y
        return mean.squeeze(-1), self.embed[2](self.embed[1](y * m))

    def logits(self, content: Tensor, alive: Tensor | None) -> tuple[Tensor, Tensor]:
        """(keep probability pi_keep (B, n), weighted log-probabilities ell (B, n, 2)) of content tokens;
        the global half of the scorer averages over the ``alive`` ones (all when None)."""
        means, e = self._heads(content)                                # (B, n, H), (B, n, H, d)
        w = self.head_net(means)                                       # (B, n, H)
        g = e[..., self.local:]
        if alive is None:
            g = g.mean(1, keepdim=True)
        else:
            a = alive[:, :, None, None]
            g = (g * a).sum(1, keepdim=True) / a.sum(1, keepdim=True).clamp_min(1.0)
        a2 = self.decide(torch.cat([e[..., :self.local], g.expand(-1, e.shape[1], -1, -1)], -1))
        w = w.unsqueeze(-1)
        total = w.sum(2)
        pi = (w * a2.softmax(-1)).sum(2) / total
        ell = (w * a2.log_softmax(-1)).sum(2) / total
        return pi[..., 0], ell

    def forward(self, x: Tensor, alive: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor | None]:
        if self.compact is not None:
            return self.pack(x)
        if self.mode is None:
            return x, alive
        p, s = self.prefix, self.patches
        if alive is None:
            alive = x.new_ones(x.shape[0], x.shape[1])
        keep, ell = self.logits(x[:, p:], alive[:, p:])
        cand = alive[:, p:p + s]
        if self.mode == "train":
            d = gumbel2(ell[:, :s], 1.0, True)[..., 0] * cand
            self.last = d
        elif self.mode == "eval":  # (decision) an image keeps at least its best candidate: no sequence empties
            score = torch.where(cand > 0, keep[:, :s], torch.full_like(cand, -1.0))
            best = torch.zeros_like(cand).scatter(1, score.argmax(1, keepdim=True), 1.0)
            d = torch.maximum((ell[:, :s, 0] > ell[:, :s, 1]).to(x.dtype), best) * cand
        else:  # top-K among the still-kept patches
            score = torch.where(cand > 0, keep[:, :s], torch.full_like(cand, -1.0))
            d = torch.zeros_like(cand).scatter(1, torch.topk(score, int(self.mode), dim=1).indices, 1.0)
        r = cand - d
        package = (keep[:, :s] * r).unsqueeze(1) @ x[:, p:p + s]
        has = (r.detach().sum(1, keepdim=True) > 0).to(x.dtype)
        if self.always_package:
            has = torch.ones_like(has)
        return torch.cat([x, package], 1), torch.cat([alive[:, :p], d, alive[:, p + s:], has], 1)

    def pack(self, x: Tensor) -> Tensor:
        """The gathered form on ``[prefix ; candidates ; packages]``: static top-K of ``candidates``, or
        (``dynamic``, batch 1) every token whose keep log-probability wins, the earlier packages being
        one per stage; the package is the score-weighted sum of the dropped tokens."""
        assert self.compact is not None
        n, k, dynamic = self.compact
        p = self.prefix
        keep, ell = self.logits(x[:, p:], None)
        if dynamic:  # every stage appends a package, so the earlier ones are the last ``packages`` tokens
            torch._assert(x.shape[0] == 1, "a dynamic token graph runs one image at a time (batch 1)")
            end = x.shape[1] - self.packages
            content = x[:, p:end]
            kept = (ell[0, :end - p, 0] > ell[0, :end - p, 1]) | (keep[0, :end - p] == keep[0, :end - p].max())
            package = (keep[:, :end - p] * (~kept).to(x.dtype)).unsqueeze(1) @ content
            return torch.cat([x[:, :p], content[:, kept.nonzero().squeeze(1)], x[:, end:], package], 1)
        if k >= n:
            return x
        return pack_top_k(x, p, n, keep[:, :n], k, mean=False)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, prefix={self.prefix}, patches={self.patches}, mode={self.mode}"


class KeyMask(nn.Module):
    """Masks the keys of dead tokens in one attention; ``alive`` None (or open) leaves it unchanged.

    ``kind="sdpa"``: called as ``mask(q, k, v, alive, **sdpa_kwargs)`` in place of the attention call;
    ``kind="probs"``: called as ``mask(probs, alive)`` right after an explicit softmax. Weights of dead
    keys are multiplied by 0 and the rest renormalised, so the gradient reaches the keep decisions; a
    query always keeps its own key, so no row is empty.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    @staticmethod
    def allowed(alive: Tensor, n: int) -> Tensor:
        eye = torch.eye(n, dtype=alive.dtype, device=alive.device)
        return (alive[:, None, None, :] + (1 - alive[:, None, None, :]) * eye)  # (B, 1, N, N)

    def forward(self, *args: Tensor | None, **kwargs: object) -> Tensor:
        if self.kind == "probs":
            probs, alive = args
            if alive is None:
                return probs
            w = probs * self.allowed(alive, probs.shape[-1])
            return w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        q, k, v, alive = args
        if alive is None:
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
        scale = kwargs.get("scale") or q.shape[-1] ** -0.5
        logits = (q @ k.transpose(-2, -1)) * scale
        if kwargs.get("attn_mask") is not None:
            logits = logits + kwargs["attn_mask"]
        allowed = self.allowed(alive, k.shape[-2])
        top = logits.masked_fill(allowed == 0, float("-inf")).amax(-1, keepdim=True).detach()
        w = torch.exp(logits - top) * allowed
        probs = w / w.sum(-1, keepdim=True)
        p = kwargs.get("dropout_p") or 0.0
        return F.dropout(probs, float(p), self.training) @ v

    def extra_repr(self) -> str:
        return self.kind


class FinalTokens(nn.Module):
    """The stream after the last block: with a mean-pooling head (``pool_mean``), only prefix and kept
    content tokens may reach the mean (no packages, no dead tokens: gathered when every image keeps the
    same count or there is one image; otherwise dead tokens are replaced by the mean of the live content,
    exact for heads that average before normalising); ``record`` keeps the last stream and
    its keep flags for the token distillation loss. Called as ``final(x, alive)``."""

    def __init__(self, prefix: int, patches: int, pool_mean: bool) -> None:
        super().__init__()
        self.prefix, self.patches, self.pool_mean = prefix, patches, pool_mean
        self.packages: int | None = None   # gathered graphs: packages to drop at the end
        self.kept: int | None = None       # masked graphs with a fixed count: gather the kept tokens
        self.record = False
        self.last: tuple[Tensor, Tensor | None] | None = None

    def forward(self, x: Tensor, alive: Tensor | None = None) -> Tensor:
        if self.record:
            self.last = (x, alive)
        if not self.pool_mean:
            return x
        if self.packages:
            return x[:, :x.shape[1] - self.packages]
        if alive is None:
            return x
        end = self.prefix + self.patches
        flags = alive[:, :end]
        if self.kept is not None:  # every image keeps the same count: gather them (prefix first, in order)
            order = torch.sort(flags, dim=1, descending=True, stable=True).indices[:, :self.prefix + self.kept]
            return _gather(x, order)
        if x.shape[0] == 1:  # one image: gather its live tokens exactly
            return x[:, flags[0].nonzero().squeeze(1)]
        # counts differ per image: dead tokens take the mean of the live content, so a mean over all
        # of them is the mean over the live ones
        d = flags[:, self.prefix:, None]
        content = x[:, self.prefix:end]
        mean = (content * d).sum(1, keepdim=True) / d.sum(1, keepdim=True).clamp_min(1.0)
        return torch.cat([x[:, :self.prefix], content * d + mean * (1 - d)], 1)

    def extra_repr(self) -> str:
        return f"prefix={self.prefix}, patches={self.patches}, pool_mean={self.pool_mean}"
