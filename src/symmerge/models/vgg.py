"""CIFAR-style VGG-11 / VGG-16 with normalisation and a width multiplier.

The five 2x2 max-pools take a 32x32 input to a 1x1 feature map, which a real ``nn.Flatten``
turns into C features for a single ``nn.Linear`` classifier. For larger inputs the map is
(H/32)x(W/32) and the flatten gives C*h*w features, so a symmetry tracer must expand a channel
permutation over the h*w positions of each channel.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from symmerge.models.resnet import NORMS, _check_width, _resolve_shape, _scaled, make_norm

__all__ = ["VGG", "VGG_CONFIGS", "vgg11", "vgg16"]

#: Channel counts per conv layer ("M" = 2x2 max-pool), at width 1.
VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (
        64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
        512, 512, 512, "M", 512, 512, 512, "M",
    ),
}  # fmt: skip


class VGG(nn.Module):
    """``features`` (conv3x3-norm-ReLU blocks and max-pools) -> ``flatten`` -> ``classifier``.

    The classifier is a single ``nn.Linear`` (as in the CIFAR VGGs of REPAIR / Git Re-Basin
    experiments), so the last conv's channels are the only hidden units after the features.
    ``norm="none"`` gives the plain VGG (convs then carry a bias); otherwise convs are bias-free.
    """

    def __init__(
        self,
        config: Sequence[int | str],
        num_classes: int = 10,
        width: float = 1,
        norm: str = "bn",
        input_shape: tuple[int, int, int] = (3, 32, 32),
    ) -> None:
        super().__init__()
        if norm not in (*NORMS, "none"):
            raise ValueError(f"unknown norm {norm!r}; expected one of {(*NORMS, 'none')}")
        c, h, w = input_shape
        n_pools = sum(1 for v in config if v == "M")
        if h < 2**n_pools or w < 2**n_pools:
            raise ValueError(f"VGG needs inputs of at least {2**n_pools}x{2**n_pools}, got {h}x{w}")
        self.input_shape = input_shape
        self.norm = norm
        self.num_classes = num_classes

        widths = iter(_scaled([int(v) for v in config if v != "M"], _check_width(width)))
        layers: list[nn.Module] = []
        c_in = c
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
                continue
            c_out = next(widths)
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none"))
            if norm != "none":
                layers.append(make_norm(norm, c_out))
            layers.append(nn.ReLU())
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c_in * h * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.features(x)))


def _build(
    cfg: str,
    num_classes: int,
    in_channels: int | None,
    width: float,
    norm: str,
    input_shape: Sequence[int] | None,
) -> VGG:
    shape = _resolve_shape(in_channels, input_shape, 32)
    return VGG(VGG_CONFIGS[cfg], num_classes, width, norm, shape)


def vgg11(
    num_classes: int = 10,
    in_channels: int | None = None,
    width: float = 1,
    norm: str = "bn",
    input_shape: Sequence[int] | None = None,
) -> VGG:
    """VGG-11 (8 convs) with BatchNorm by default, channels times ``width``."""
    return _build("vgg11", num_classes, in_channels, width, norm, input_shape)


def vgg16(
    num_classes: int = 10,
    in_channels: int | None = None,
    width: float = 1,
    norm: str = "bn",
    input_shape: Sequence[int] | None = None,
) -> VGG:
    """VGG-16 (13 convs) with BatchNorm by default, channels times ``width``."""
    return _build("vgg16", num_classes, in_channels, width, norm, input_shape)
