"""The module the attention->convolution axis puts at each site (methods.md §1.1-1.3).

``AttentionConv`` sits on the output of an attention's projection and is called as
``gate(u, msa, w_v, b_v, w_o, b_o)``: ``u`` the normalised block input, ``msa`` the attention's output,
and the live value / output-projection parameters (the convolutions are derived from them every
forward, so they train with the attention they share weights with). It returns, by ``choice``:
None (open: ``msa``), a fixed decision (``msa`` | ``conv3`` | ``conv1`` | ``skip``), or — while
learning — the nested-gate mix of all three branches with concrete samples of its ``op_logits``.

Tap t = r + 3c for kernel row r and column c (t = 4 the centre).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitgraph.gates.units import concrete, ste_step

CHOICES = ("skip", "conv1", "conv3", "msa")   # by the number of nested gates that are on
ALPHA = 0.01                                   # tap-assignment temperature


class AttentionConv(nn.Module):
    def __init__(self, heads: int, dim: int, prefix: int, grid: tuple[int, int], v_rows: Tensor,
                 o_cols: Tensor) -> None:
        super().__init__()
        self.heads, self.dim, self.prefix, self.grid = heads, dim, prefix, tuple(grid)
        self.register_buffer("v_rows", v_rows.long(), persistent=False)   # (H, d)
        self.register_buffer("o_cols", o_cols.long(), persistent=False)   # (H, d)
        self.op_logits = nn.Parameter(torch.full((3,), 1.5))              # arch: sigmoid 0.82, every site MSA
        self.tap_logits = nn.Parameter(torch.ones(heads, 9))              # weights
        self.bn1 = nn.BatchNorm2d(dim)
        self.bn3 = nn.BatchNorm2d(dim)
        self.choice: str | None = None   # None: open; "learn": sample the gates; else a decision

    # -- derived weights -----------------------------------------------------------------------
    def derived(self, w_v: Tensor, b_v: Tensor | None, w_o: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """K (9, d, C), c (9, d), O (9, C, d): the heads' value and output weights mixed per tap."""
        pi = torch.softmax(self.tap_logits / ALPHA, dim=0)                  # (H, 9), heads -> taps
        wv = w_v[self.v_rows]                                               # (H, d, C)
        bv = b_v[self.v_rows] if b_v is not None else wv.new_zeros(self.heads, self.dim)
        wo = w_o[:, self.o_cols].permute(1, 0, 2)                          # (H, C, d)
        return (torch.einsum("ht,hdc->tdc", pi, wv), torch.einsum("ht,hd->td", pi, bv),
                torch.einsum("ht,hcd->tcd", pi, wo))

    def conv1(self, u: Tensor, k: Tensor, c: Tensor, o: Tensor, b_o: Tensor | None) -> Tensor:
        p = self.prefix
        h = F.linear(u[:, p:], k[4], c[4])                                  # (B, S, d)
        h = F.relu(self.bn1(h.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2))
        return torch.cat([u[:, :p], F.linear(h, o[4], b_o)], 1)

    def conv3(self, u: Tensor, k: Tensor, c: Tensor, o: Tensor, b_o: Tensor | None) -> Tensor:
        p, (gh, gw) = self.prefix, self.grid
        x = u[:, p:].transpose(1, 2).reshape(u.shape[0], -1, gh, gw)       # (B, C, Gh, Gw)
        kernel = k.reshape(3, 3, self.dim, -1).permute(2, 3, 1, 0)          # [c, r, d, C] -> (d, C, r, c)
        h = F.relu(self.bn3(F.conv2d(x, kernel, c.sum(0), padding=1)))      # (B, d, Gh, Gw)
        y = F.linear(h.flatten(2).transpose(1, 2), o.sum(0), b_o)            # (B, S, C)
        return torch.cat([u[:, :p], y], 1)

    # -- gates ---------------------------------------------------------------------------------
    def gates(self) -> tuple[Tensor, Tensor, Tensor]:
        """(g1, g3, gm): nested samples while learning; the gradient into a cheaper gate stops once a
        dearer one is on (methods.md §1.3)."""
        b = concrete(torch.sigmoid(self.op_logits), 1.0)
        g1, g3 = b[0], b[0] * b[1]
        gm = g3 * b[2]
        if bool(g3 > 0):
            g1 = g1.detach()
        if bool(gm > 0):
            g3 = g3.detach()
        return g1, g3, gm

    def decision(self) -> str:
        """The eval decision: how many nested gates are on (each 1[sigmoid > 0.5])."""
        on = 0
        for q in torch.sigmoid(self.op_logits.detach()).tolist():
            if q <= 0.5:
                break
            on += 1
        return CHOICES[on]

    def cost_gates(self) -> Tensor:
        """Deterministic cumulative gates (k1, k3, km) for the budget: forward 1[q > 0.5], backward the
        gradient of sigmoid(q - 0.5) (methods.md §1.4)."""
        q = torch.sigmoid(self.op_logits)
        return torch.cumprod(ste_step(q, torch.sigmoid(q - 0.5)), 0)

    def forward(self, u: Tensor, msa: Tensor, w_v: Tensor, b_v: Tensor | None, w_o: Tensor,
                b_o: Tensor | None) -> Tensor:
        choice = self.choice
        if choice is None or choice == "msa":
            return msa
        if choice == "skip":
            return torch.zeros_like(msa)
        k, c, o = self.derived(w_v, b_v, w_o)
        if choice == "conv3":
            return self.conv3(u, k, c, o, b_o)
        if choice == "conv1":
            return self.conv1(u, k, c, o, b_o)
        g1, g3, gm = self.gates()
        return gm * msa + g3 * (1 - gm) * self.conv3(u, k, c, o, b_o) + g1 * (1 - g3) * self.conv1(u, k, c, o, b_o)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim={self.dim}, grid={self.grid}, choice={self.choice}"
