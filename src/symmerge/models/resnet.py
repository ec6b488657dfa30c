"""ResNet-20 (CIFAR, He et al. 2016) and ResNet-18, with a width multiplier and swappable norms.

Both are one :class:`ResNet` class with different stage layouts, so the symmetry tracer only has
to understand one block type. Residual connections tie the permutation of every block output in
a stage to the stage's input permutation; the 1x1 projection shortcut (option B) is what lets a
stage start a new permutation group.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = [
    "NORMS",
    "BasicBlock",
    "LayerNorm2d",
    "ResNet",
    "gn_num_groups",
    "make_norm",
    "resnet18",
    "resnet20",
]

#: Accepted values of the ``norm`` kwarg of the convolutional models.
NORMS = ("bn", "ln", "gn")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of an NCHW tensor, separately at every spatial position.

    This is the "LN" variant of the merging literature (not ``GroupNorm(1, C)``, which would
    also pool over H and W). It subclasses ``nn.LayerNorm`` so its ``weight``/``bias`` have
    shape (C,) and live at ``<name>.weight``/``<name>.bias`` like a BatchNorm's affine does.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = super().forward(x)
        return x.permute(0, 3, 1, 2)


def gn_num_groups(channels: int) -> int:
    """Number of GroupNorm groups used for ``channels``: the largest divisor of C <= min(32, C//4).

    That gives groups of at least 4 channels (16 channels -> 4 groups, 64 -> 16, 256 -> 32).
    Note that GroupNorm only keeps the function unchanged under permutations that move whole
    groups (and permute freely inside a group), so mergers must respect these blocks.
    """
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}")
    target = max(1, min(32, channels // 4))
    for g in range(target, 0, -1):
        if channels % g == 0:
            return g
    return 1  # pragma: no cover - g == 1 always divides


def make_norm(norm: str, channels: int) -> nn.Module:
    """Build the 2d normalisation layer named by ``norm`` ("bn", "ln", "gn")."""
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "ln":
        return LayerNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(gn_num_groups(channels), channels)
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv is followed by a norm layer with its own shift.
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-norm-relu-conv3x3-norm, plus shortcut, then relu.

    The shortcut is ``nn.Identity`` when shapes match and a 1x1 conv + norm otherwise
    (option B of He et al.).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, norm: str = "bn") -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.norm1 = make_norm(norm, c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(c_out, c_out)
        self.norm2 = make_norm(norm, c_out)
        self.shortcut: nn.Module
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), make_norm(norm, c_out)
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """Generic BasicBlock ResNet: stem -> stages -> global average pool -> flatten -> Linear.

    ``stem="cifar"`` is a 3x3 stride-1 conv with no max-pool (for 32x32 inputs);
    ``stem="imagenet"`` is the 7x7 stride-2 conv followed by a 3x3 stride-2 max-pool.
    """

    def __init__(
        self,
        blocks_per_stage: Sequence[int],
        stage_channels: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        norm: str = "bn",
        stem: str = "cifar",
        input_shape: tuple[int, int, int] = (3, 32, 32),
    ) -> None:
        super().__init__()
        if len(blocks_per_stage) != len(stage_channels) or not blocks_per_stage:
            raise ValueError("blocks_per_stage and stage_channels must be non-empty, same length")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
        self.input_shape = input_shape
        self.norm = norm
        self.num_classes = num_classes

        c0 = stage_channels[0]
        if stem == "cifar":
            self.conv1 = _conv3x3(in_channels, c0)
            self.norm1 = make_norm(norm, c0)
            self.relu = nn.ReLU()
            self.maxpool: nn.Module = nn.Identity()
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, c0, 7, stride=2, padding=3, bias=False)
            self.norm1 = make_norm(norm, c0)
            self.relu = nn.ReLU()
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            raise ValueError(f"unknown stem {stem!r}; expected 'cifar' or 'imagenet'")

        stages: list[nn.Module] = []
        c_in = c0
        for i, (n, c_out) in enumerate(zip(blocks_per_stage, stage_channels, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(c_in, c_out, stride, norm)]
            blocks += [BasicBlock(c_out, c_out, 1, norm) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        # layer1, layer2, ... as in torchvision, so checkpoints read familiarly.
        for i, stage in enumerate(stages, start=1):
            self.add_module(f"layer{i}", stage)
        self.num_stages = len(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.norm1(self.conv1(x))))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.flatten(self.pool(x)))


def _resolve_shape(
    in_channels: int | None, input_shape: Sequence[int] | None, default_hw: int
) -> tuple[int, int, int]:
    """Reconcile the ``in_channels`` and ``input_shape`` kwargs into one (C, H, W)."""
    if input_shape is None:
        c = 3 if in_channels is None else int(in_channels)
        return (c, default_hw, default_hw)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    if in_channels is not None and int(in_channels) != shape[0]:
        raise ValueError(f"in_channels={in_channels} disagrees with input_shape={shape}")
    return shape  # type: ignore[return-value]


def _check_width(width: float) -> float:
    """A positive width multiplier; whole numbers come back as ``int`` (``2.0`` -> ``2``)."""
    if isinstance(width, bool) or not isinstance(width, int | float) or not width > 0:
        raise ValueError(f"width must be a positive number, got {width!r}")
    return int(width) if float(width).is_integer() else float(width)


def _scaled(channels: Sequence[int], width: float) -> tuple[int, ...]:
    """``channels`` times ``width``; a fraction must give whole, non-zero channel counts."""
    out = tuple(c * width for c in channels)
    if any(not float(c).is_integer() or c < 1 for c in out):
        raise ValueError(
            f"width {width} gives fractional or zero channel counts {out} for {tuple(channels)}; "
            "use a multiplier that divides every count (e.g. 0.5 or 0.25)"
        )
    return tuple(int(c) for c in out)


def resnet20(
    num_classes: int = 10,
    in_channels: int | None = None,
    width: float = 1,
    norm: str = "bn",
    input_shape: Sequence[int] | None = None,
) -> ResNet:
    """CIFAR ResNet-20: 3 stages x 3 BasicBlocks with 16/32/64 channels times ``width``."""
    chans = _scaled((16, 32, 64), _check_width(width))
    shape = _resolve_shape(in_channels, input_shape, 32)
    return ResNet((3, 3, 3), chans, num_classes, shape[0], norm, "cifar", shape)


def resnet18(
    num_classes: int = 10,
    in_channels: int | None = None,
    width: float = 1,
    norm: str = "bn",
    stem: str = "cifar",
    input_shape: Sequence[int] | None = None,
) -> ResNet:
    """ResNet-18: 4 stages x 2 BasicBlocks, 64/128/256/512 channels times ``width``.

    Defaults to the CIFAR stem (3x3 conv, no max-pool) and 32x32 inputs; ``stem="imagenet"``
    gives the standard 7x7/max-pool stem and a default input of 224x224.
    """
    chans = _scaled((64, 128, 256, 512), _check_width(width))
    shape = _resolve_shape(in_channels, input_shape, 32 if stem == "cifar" else 224)
    return ResNet((2, 2, 2, 2), chans, num_classes, shape[0], norm, stem, shape)
