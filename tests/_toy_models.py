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
