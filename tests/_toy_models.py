"""Small models shared by the engine tests."""

from __future__ import annotations

import torch
from torch import nn


class Branches(nn.Module):
    """Composite layouts: a concat of two branches (segments) and a flatten (C x H x W)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(9)
        self.mix = nn.Conv2d(9, 6, 1)
        self.head = nn.Linear(6 * 2 * 2, 7)
        self.input_shape = (3, 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        h = nn.functional.max_pool2d(torch.relu(self.mix(h)), 2)
        return self.head(h.flatten(1))


class Attention(nn.Module):
    """One pre-norm attention block: fused qkv split into heads (q/k and v/o head groups)."""

    def __init__(self, dim: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(5, dim)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 4)
        self.input_shape = (6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, n, d = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        att = (q @ k.transpose(-2, -1)).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, n, d))
        return self.head(x.mean(1))


def cifar_noise(
    batches: int = 2, size: int = 8
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, object], torch.Tensor]:
    """Merge batches of CIFAR-shaped noise, their record and a probe batch: what a peer's
    end-to-end test on tiny ResNets hands the peer in place of a report's data."""
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(size, 3, 32, 32, generator=gen), torch.zeros(size, dtype=torch.long))
            for _ in range(batches)]  # fmt: skip
    record: dict[str, object] = {"n": batches * size, "sha256": "tiny"}
    return data, record, torch.randn(4, 3, 32, 32, generator=gen)
