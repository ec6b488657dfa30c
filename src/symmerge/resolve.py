"""Turn a model reference from the command line into a model and an example input.

A reference is a zoo name (``resnet20x4-ln``), ``timm:NAME`` (random init; timm is an
optional dependency), or a path to a checkpoint (safetensors + metadata written by
``symmerge train``, or a pickled ``nn.Module``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class ResolvedModel:
    model: nn.Module
    example_inputs: tuple[Any, ...]
    description: str


def example_input(shape: tuple[int, ...], batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *shape), generator=gen)


def resolve_model(
    ref: str, *, input_shape: tuple[int, ...] | None = None, seed: int = 0
) -> ResolvedModel:
    """Build or load the model that ``ref`` names, with a batch of 2 example inputs.

    Raises ValueError with the accepted forms when ``ref`` is none of them.
    """
    torch.manual_seed(seed)
    if ref.startswith("timm:"):
        return _timm_model(ref[5:], input_shape, seed)
    path = Path(ref)
    if path.exists():
        from symmerge.io import load_checkpoint

        model, meta = load_checkpoint(path)
        shape = input_shape or getattr(model, "input_shape", None)
        if shape is None:
            shape = (meta.get("config", {}).get("kwargs", {}) or {}).get("input_shape")
        if shape is None:
            raise ValueError(f"cannot tell the input shape of {ref}; pass --input-shape C,H,W")
        return ResolvedModel(
            model.eval(), (example_input(tuple(shape), seed=seed),), f"checkpoint {ref}"
        )
    from symmerge.models import create_model

    try:
        model, _ = create_model(ref)
    except ValueError as e:
        raise ValueError(
            f"{e}\nA MODEL is a zoo name, timm:NAME or a checkpoint path "
            f"(no file named '{ref}' exists)."
        ) from e
    shape = input_shape or model.input_shape
    return ResolvedModel(model.eval(), (example_input(tuple(shape), seed=seed),), f"zoo {ref}")


def _timm_model(name: str, input_shape: tuple[int, ...] | None, seed: int) -> ResolvedModel:
    try:
        import timm
    except ImportError as e:
        raise ValueError("timm:NAME needs timm: pip install 'symmerge[timm]'") from e
    try:
        model = timm.create_model(name, pretrained=False)
    except RuntimeError as e:
        raise ValueError(f"timm has no model '{name}': {e}") from e
    shape = input_shape or tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    return ResolvedModel(model.eval(), (example_input(tuple(shape), seed=seed),), f"timm {name}")
