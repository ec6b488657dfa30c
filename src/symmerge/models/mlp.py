"""Plain multi-layer perceptron, the MNIST workhorse of weight-matching papers."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """Flatten -> (Linear -> ReLU) x depth -> Linear.

    Built only from ``nn.Flatten``/``nn.Linear``/``nn.ReLU`` inside one ``nn.Sequential`` so a
    symmetry tracer sees the simplest possible graph: every hidden layer is one permutation group.
    The defaults give the 784-512-512-512-10 network used in Git Re-Basin and related papers.
    """

    def __init__(
        self,
        depth: int = 3,
        width: int = 512,
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        in_channels: int | None = None,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
        if in_channels is not None:
            # in_channels is the convnet-style spelling; it overrides C so both work.
            shape = (int(in_channels), shape[1], shape[2])
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        if width < 1 or num_classes < 1:
            raise ValueError("width and num_classes must be positive")
        self.input_shape: tuple[int, int, int] = shape  # type: ignore[assignment]
        self.depth = depth
        self.width = width
        self.num_classes = num_classes

        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = math.prod(shape)
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), nn.ReLU()]
            fan_in = width
        layers.append(nn.Linear(fan_in, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
