"""A small Vision Transformer for 32x32 inputs (``vit-tiny``).

Pre-norm blocks with a fused qkv projection and ``F.scaled_dot_product_attention``, a class
token and learned position embeddings: the layout of timm's ViT, small enough to train on a
CPU. Its symmetry (heads x head dims, one residual-stream group) is found by the tracer like
any other model's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ViT", "vit_tiny"]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape  # head dims come from qkv, not the residual width (resizable)
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Patch embedding (a strided conv), class token, position embeddings, blocks, LN, head."""

    def __init__(
        self,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: float = 2.0,
        patch: int = 4,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        c, h, w = (int(s) for s in input_shape)
        if h % patch or w % patch:
            raise ValueError(f"input {h}x{w} is not divisible by patch size {patch}")
        self.input_shape = (c, h, w)
        self.patch_embed = nn.Conv2d(c, dim, patch, stride=patch)
        tokens = (h // patch) * (w // patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_tiny(
    dim: int = 192,
    depth: int = 6,
    heads: int = 3,
    mlp_ratio: float = 2.0,
    patch: int = 4,
    input_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    in_channels: int | None = None,
) -> ViT:
    """ViT-Tiny-style model for 32x32 images: 6 blocks, width 192, 3 heads of 64 dims."""
    if in_channels is not None:
        input_shape = (in_channels, *tuple(input_shape)[1:])
    return ViT(dim, depth, heads, mlp_ratio, patch, input_shape, num_classes)
