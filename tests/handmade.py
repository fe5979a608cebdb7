"""A ViT written by hand, the way a user might: explicit softmax and three separate q/k/v Linears.

Used by the tests and as a `file.py:function` model for the CLI (``tests/handmade.py:handmade_vit``).
"""
from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    """``style`` picks how the products are spelled: "matmul" (q @ k^T), "einsum", or "bmm" on (B*H, N, d)."""

    def __init__(self, dim: int, heads: int, style: str = "matmul") -> None:
        super().__init__()
        self.heads, self.scale, self.style = heads, (dim // heads) ** -0.5, style
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.to_q(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
        k = self.to_k(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
        v = self.to_v(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
        if self.style == "einsum":
            attn = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) * self.scale, dim=-1)
            out = torch.einsum("bhij,bhjd->bhid", attn, v)
        elif self.style == "bmm":
            q, k, v = (t.reshape(b * self.heads, n, c // self.heads) for t in (q, k, v))
            attn = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * self.scale, dim=-1)
            out = torch.bmm(attn, v).view(b, self.heads, n, c // self.heads)
        else:
            attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
            out = attn @ v
        return self.out(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, style: str = "matmul") -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, style)
        self.ff = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ff(self.ln2(x))


class HandmadeViT(nn.Module):
    def __init__(self, image: int = 32, patch: int = 8, dim: int = 48, depth: int = 3, heads: int = 4,
                 hidden: int = 96, classes: int = 10, style: str = "matmul") -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, style) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.embed(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def handmade_vit(**kwargs: int | str) -> nn.Module:
    torch.manual_seed(0)
    return HandmadeViT(**kwargs)
