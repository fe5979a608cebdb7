"""ViTs written by other people, in small configs (32 px, random weights): vit-pytorch and Hugging Face.

Each ``build_*`` is also a ``file.py:function`` model for the CLI, e.g.
``vitgraph compile tests/foreign.py:build_vit --input-size 3,32,32 --data none --spec ...``.
vit-pytorch spells attention with einops (``Rearrange`` layers, ``rearrange()``), which torch.fx cannot
trace; Hugging Face's BEiT calls ``int()`` on shapes and Swin iterates over them.
"""
from __future__ import annotations

import torch
from torch import nn


def _seeded() -> None:
    torch.manual_seed(0)


def build_vit() -> nn.Module:
    from vit_pytorch import ViT
    _seeded()
    return ViT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=3, heads=4, mlp_dim=128, dim_head=16)


def build_simple_vit() -> nn.Module:
    from vit_pytorch import SimpleViT
    _seeded()
    return SimpleViT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=3, heads=4, mlp_dim=128, dim_head=16)


def build_cait() -> nn.Module:
    from vit_pytorch.cait import CaiT
    _seeded()
    return CaiT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=3, cls_depth=1, heads=4, mlp_dim=128,
                dim_head=16, dropout=0.1, emb_dropout=0.1)


def build_beit() -> nn.Module:
    from transformers import BeitConfig, BeitForImageClassification
    _seeded()
    cfg = BeitConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=3,
                     num_attention_heads=4, intermediate_size=128, num_labels=10)  # HF's defaults: no relative bias
    return BeitForImageClassification(cfg)


def build_swin() -> nn.Module:
    from transformers import SwinConfig, SwinForImageClassification
    _seeded()
    cfg = SwinConfig(image_size=32, patch_size=2, num_channels=3, embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                     window_size=4, mlp_ratio=2.0, num_labels=10)
    return SwinForImageClassification(cfg)


FOREIGN = {"vit": build_vit, "simple_vit": build_simple_vit, "cait": build_cait, "beit": build_beit,
           "swin": build_swin}
