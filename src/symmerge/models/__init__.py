"""Reference model zoo of the merging literature, behind a small name registry.

Models are built from a *zoo name* such as ``"resnet20x4-ln"`` (see :func:`parse_model_name`)
or from an architecture name plus kwargs (:func:`build_model`). :func:`create_model` also
returns a JSON-serialisable config that rebuilds the same architecture, which is what gets
stored next to checkpoints so a merge can re-instantiate both endpoints.

Every model has an ``input_shape`` attribute (C, H, W) so tracers can make example inputs.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from symmerge.models.mlp import MLP
from symmerge.models.resnet import (
    NORMS,
    BasicBlock,
    LayerNorm2d,
    ResNet,
    gn_num_groups,
    make_norm,
    resnet18,
    resnet20,
)
from symmerge.models.vgg import VGG, vgg11, vgg16
from symmerge.models.vit import ViT, vit_tiny

__all__ = [
    "MLP",
    "NORMS",
    "VGG",
    "ViT",
    "ZOO_NAMES",
    "BasicBlock",
    "LayerNorm2d",
    "ResNet",
    "build_model",
    "create_model",
    "format_model_name",
    "gn_num_groups",
    "list_models",
    "make_norm",
    "parse_model_name",
    "register_model",
]

Builder = Callable[..., nn.Module]

_REGISTRY: dict[str, Builder] = {}

#: Names the CLI advertises (any name matching the grammar below also works, e.g. MLPs of
#: other widths and depths such as ``"mlp-w256-d4"``).
ZOO_NAMES: tuple[str, ...] = (
    "mlp",
    "vgg11",
    "vgg16",
    "resnet20x4",
    "resnet20x4-ln",
    "resnet20x4-gn",
    "resnet18",
    "vit-tiny",
)

_GRAMMAR = (
    "mlp | vit-tiny | (vgg11|vgg16|resnet18|resnet20)[x<K>][-bn|-ln|-gn], e.g. 'resnet20x4-ln' "
    "(x<K>: width multiplier, default 1, e.g. x4 or x0.5; norm default bn); an MLP may add "
    "[-w<W>][-d<D>], e.g. 'mlp-w256-d4' (W: hidden units >= 1, default 512; D: hidden layers "
    ">= 1, default 3)"
)
_CONV_RE = re.compile(r"^(vgg11|vgg16|resnet18|resnet20)(?:x(\d+(?:\.\d+)?))?(?:-(bn|ln|gn))?$")
_MLP_RE = re.compile(r"^mlp(?:-w(\d+))?(?:-d(\d+))?$")
#: What a bare ``mlp`` name builds (``format_model_name`` omits these).
_MLP_DEFAULTS = {"width": 512, "depth": 3}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``fn(**kwargs) -> nn.Module`` under ``name``.

    Names are global, so a second registration of the same name is an error rather than a
    silent override that would change what old checkpoint configs rebuild.
    """
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")

    def decorator(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_REGISTRY)


def parse_model_name(name: str) -> tuple[str, dict[str, Any]]:
    """Turn a zoo name into ``(arch, kwargs)``; e.g. ``"resnet20x4-ln"`` ->
    ``("resnet20", {"width": 4, "norm": "ln"})`` and ``"mlp-w256-d4"`` ->
    ``("mlp", {"width": 256, "depth": 4})``. Only what the name states goes in kwargs.

    A bare registered architecture name (including user-registered ones) is also accepted.
    """
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {name!r}; valid: {_GRAMMAR}")
    key = name.strip().lower()
    m = _MLP_RE.match(key)
    if m:
        mlp_kwargs: dict[str, Any] = {}
        for field, value in zip(("width", "depth"), m.groups(), strict=True):
            if value is not None:
                if int(value) < 1:
                    raise ValueError(f"MLP {field} must be >= 1 in {name!r}; valid: {_GRAMMAR}")
                mlp_kwargs[field] = int(value)
        return "mlp", mlp_kwargs
    m = _CONV_RE.match(key)
    if m:
        arch, width, norm = m.groups()
        kwargs: dict[str, Any] = {}
        if width is not None:
            value = float(width)
            if value <= 0:
                raise ValueError(f"width multiplier must be > 0 in {name!r}; valid: {_GRAMMAR}")
            kwargs["width"] = int(value) if value.is_integer() else value
        if norm is not None:
            kwargs["norm"] = norm
        return arch, kwargs
    if name in _REGISTRY:
        return name, {}
    raise ValueError(f"unknown model name {name!r}; valid: {_GRAMMAR}")


def format_model_name(arch: str, kwargs: dict[str, Any] | None = None) -> str:
    """Canonical zoo name for ``(arch, kwargs)``: inverse of :func:`parse_model_name`.

    Defaults (width 1, norm bn; MLP width 512, depth 3) are omitted and other kwargs are
    ignored, so ``format_model_name(*parse_model_name(n)) == n`` for every name in
    :data:`ZOO_NAMES` and every MLP name such as ``"mlp-w256-d4"``.
    """
    kwargs = kwargs or {}
    if arch == "mlp":
        name = arch
        for field, tag in (("width", "w"), ("depth", "d")):
            value = int(kwargs.get(field, _MLP_DEFAULTS[field]))
            if value != _MLP_DEFAULTS[field]:
                name += f"-{tag}{value}"
        return name
    if arch not in ("vgg11", "vgg16", "resnet18", "resnet20"):
        return arch
    name = arch
    width = float(kwargs.get("width", 1))
    if width != 1:
        name += f"x{int(width) if width.is_integer() else width}"
    norm = kwargs.get("norm", "bn")
    if norm != "bn":
        name += f"-{norm}"
    return name


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """Instantiate a registered architecture; unknown names raise ``ValueError``."""
    if arch not in _REGISTRY:
        raise ValueError(
            f"unknown architecture {arch!r}; registered: {list_models()} "
            f"(for zoo names like 'resnet20x4-ln' use create_model)"
        )
    model = _REGISTRY[arch](**kwargs)
    if not hasattr(model, "input_shape"):
        raise TypeError(f"builder for {arch!r} returned a model without an input_shape attribute")
    return model


def _jsonable(value: Any) -> Any:
    """Tuples -> lists (recursively) so the config survives a JSON round trip unchanged."""
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def create_model(name: str, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Build a model from a zoo name and return it with a config that rebuilds it.

    ``overrides`` win over what the name says (``create_model("resnet20x4", width=8)`` has
    width 8). The config is ``{"arch": arch, "kwargs": {...}}`` with every builder kwarg
    resolved, including defaults, so it stays valid if a default changes later.
    """
    arch, kwargs = parse_model_name(name)
    kwargs.update(overrides)
    model = build_model(arch, **kwargs)

    params = inspect.signature(_REGISTRY[arch]).parameters
    resolved: dict[str, Any] = {
        k: p.default
        for k, p in params.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty
    }
    resolved.update(kwargs)
    # Record the shape the model actually uses instead of a None default.
    shape = tuple(int(s) for s in model.input_shape)  # type: ignore[union-attr]
    if "input_shape" in params:
        resolved["input_shape"] = list(shape)
    if "in_channels" in params:
        resolved["in_channels"] = shape[0]
    resolved = _jsonable(resolved)
    try:
        json.dumps(resolved)
    except TypeError as err:
        raise TypeError(f"model kwargs for {name!r} are not JSON-serialisable: {err}") from err
    return model, {"arch": arch, "kwargs": resolved}


@register_model("mlp")
def mlp(
    depth: int = 3,
    width: int = 512,
    input_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    in_channels: int | None = None,
) -> MLP:
    """MLP with ``depth`` hidden ReLU layers of ``width`` units (784-512-512-512-10 default)."""
    return MLP(depth, width, input_shape, num_classes, in_channels)


register_model("vgg11")(vgg11)
register_model("vgg16")(vgg16)
register_model("resnet20")(resnet20)
register_model("resnet18")(resnet18)
register_model("vit-tiny")(vit_tiny)
