"""Parameters and multiply-accumulates a model actually spends on one forward pass.

A merge budget (PLeaS's ``F(r)/F(0)``, algorithms.md §2 "Budget allocation") is a claim about
compute; :func:`count_compute` measures it by running the model, so the claim can be checked
against what the exported model really does (see :mod:`symmerge.blocksparse`, which rewrites
layers with zero blocks so the zeros are no longer multiplied).

What is counted: every *call* of an ``nn.Linear`` or ``nn.Conv1d/2d/3d`` module (subclasses
included) or of Hugging Face's ``Conv1D`` (GPT-2's linear layers,
:func:`is_transposed_linear`) during one forward of the example inputs, observed by forward
hooks, so shared modules count once per call and modules that are never called count
nothing. A call costs one multiply-accumulate per output element per input it reads:

- Linear: ``out.numel() / out_features`` rows times ``in_features * out_features``;
- ConvNd: output positions times ``out_channels * (in_channels / groups) * kernel numel``.

What is not counted: bias additions, normalisations, activations, pooling, residual adds,
attention's ``q·kᵀ`` and ``attn·v`` products (``F.scaled_dot_product_attention`` and
``nn.MultiheadAttention``, whose projections use their weights without calling the Linear
modules), embeddings, and any computation done through ``torch.nn.functional`` directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Compute", "count_compute", "is_transposed_linear"]

_COUNTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_transposed_linear(module: nn.Module | None) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's projections): a linear layer whose weight is stored
    ``(in, out)``, not ``(out, in)``."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and torch.is_tensor(weight)
        and weight.ndim == 2
        and weight.shape[1] == getattr(module, "nf", None)
    )


@dataclass(frozen=True)
class Compute:
    """Size and per-example compute of a model.

    Attributes:
        params: number of parameter elements (tied parameters counted once).
        macs: multiply-accumulates of the counted layers per example (see the module doc).
        per_module: the same per counted module name (every call of a module summed);
            modules that were not called are absent.
    """

    params: int
    macs: float
    per_module: dict[str, float] = field(default_factory=dict)


def count_compute(
    model: nn.Module, example_inputs: Any, *, batch_size: int | None = None
) -> Compute:
    """Count ``model``'s parameters and its Linear/Conv multiply-accumulates per example.

    Args:
        model: any module; it is run once in eval mode under ``torch.no_grad`` (so batch
            norm statistics are not touched) and its train/eval flags are restored after.
        example_inputs: a tensor, a tuple of positional inputs, or a mapping of keyword
            inputs, on the model's device.
        batch_size: the number of examples in ``example_inputs``; default: the first
            dimension of the first input tensor (pass 1 for an unbatched input).

    Returns:
        A :class:`Compute`. Bias additions are not counted: a Linear layer costs
        ``in_features * out_features`` per row, not ``+ out_features``.
    """
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    if batch_size is None:
        batch_size = _batch_size([*args, *kwargs.values()])
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

    totals: dict[str, int] = {}

    def hook(name: str) -> Any:
        def count(module: nn.Module, _inputs: Any, out: Tensor) -> None:
            if isinstance(module, nn.Linear):
                fan_in = module.in_features
            elif is_transposed_linear(module):
                fan_in = module.weight.shape[0]
            else:
                fan_in = module.in_channels // module.groups * _numel(module.kernel_size)
            totals[name] = totals.get(name, 0) + out.numel() * fan_in

        return count

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if isinstance(module, _COUNTED) or is_transposed_linear(module)
    ]
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    per_module = {name: total / batch_size for name, total in totals.items()}
    params = sum(p.numel() for p in model.parameters())
    return Compute(params=params, macs=sum(totals.values()) / batch_size, per_module=per_module)


def _batch_size(inputs: list[Any]) -> int:
    for x in inputs:
        if torch.is_tensor(x):
            return int(x.shape[0]) if x.dim() else 1
    raise ValueError("no tensor among the example inputs to read the batch size from")


def _numel(size: Any) -> int:
    n = 1
    for s in size if isinstance(size, (tuple, list)) else (size,):
        n *= int(s)
    return n
