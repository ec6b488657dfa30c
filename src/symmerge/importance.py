"""Neuron importance scores: how much each unit of a group contributes to the true-label logit.

Neuron-interpolation fusion (algorithms.md §5(b)) weighs every parent neuron by an importance
``s_j > 0`` when it groups neurons (weighted K-means, or the pair cost of the one-to-one
variant) and when it averages a group into its target. :func:`neuron_importance` gives, for
every permutation group of a traced model, one score per unit, by a layer attribution method of
`captum <https://captum.ai>`_ (an optional dependency: ``pip install 'symmerge[attribution]'``):

    s_j = (1 / #samples) · Σ_samples Σ_positions |attr_j(x, y)|  +  1e-8

with the target the sample's true label ``y``, over the fusion data in batches of
``batch_size`` (the paper's code, ``utils/neuron_importance.py``). Positions are every axis of
the layer output except the batch and the unit axis (conv pixels, tokens).

Methods:

- ``"conductance"``: ``captum.attr.LayerConductance`` (``n_steps=steps``, zero baseline).
- ``"deeplift"``: ``captum.attr.LayerDeepLift`` (zero baseline).
- ``"ablation"``: ``captum.attr.LayerFeatureAblation`` with one feature per unit (a conv
  channel is ablated, set to 0, at every position at once: a ``layer_mask`` over the unit axis).
  The score is the change of the target logit when the whole unit is removed; the mask gives
  every position of a unit that one value, so it is counted once, not summed over positions
  (which would only scale a group's scores by its number of positions).
- ``"uniform"``: every score 1, without captum or data.

The attributed layer of a group is the module whose output holds the group's units before the
nonlinearity: its Linear / Conv producer (:func:`symmerge.methods.fusion.producer_sites`),
which is what fusion clusters and refits. A unit that nothing downstream reads (zero outgoing
weights) gets ``~1e-8`` from all three methods.

Groups that no module returns whole, or that move in blocks (attention heads, GroupNorm
groups), have no such layer: they raise a ``ValueError`` naming them (pass ``groups=`` to
score the others, or use ``"uniform"``) rather than silently falling back to uniform scores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from symmerge.spec import ActivationSite, SymmetrySpec

__all__ = ["IMPORTANCE_METHODS", "neuron_importance"]

IMPORTANCE_METHODS = ("uniform", "conductance", "deeplift", "ablation")
#: Units ablated in one forward pass (captum's ``perturbations_per_eval``).
ABLATIONS_PER_FORWARD = 32
EPSILON = 1e-8
_INSTALL = "pip install 'symmerge[attribution]'"


def neuron_importance(
    model: nn.Module,
    spec: SymmetrySpec,
    data: Iterable[Any] | None,
    *,
    method: str = "conductance",
    groups: Sequence[str] | None = None,
    steps: int = 10,
    batch_size: int = 50,
    normalize: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, Tensor]:
    """One importance score per unit of every group, from a captum layer attribution to the
    true label (see the module docstring for the formula and the methods).

    Args:
        model: the model ``spec`` was traced from (put in eval mode; modes restored after).
        spec: its symmetry spec (:func:`symmerge.trace`).
        data: batches ``(inputs, labels, ...)``; labels are class indices (the targets).
            Unused with ``method="uniform"``.
        method: ``"conductance"``, ``"deeplift"``, ``"ablation"`` or ``"uniform"``.
        groups: the groups to score; default every group of ``spec``.
        steps: integration steps of conductance.
        batch_size: samples per attribution call (data batches are split to this size).
        normalize: scale each group's scores to sum to 1.
        seed: seeds torch's RNG for the pass (the global RNG state is restored after).
        device: where to run (the model is moved there and back); default the model's.

    Returns:
        ``{group: (size,) float64 CPU tensor}``, positive.

    Raises:
        ImportError: captum is missing (only for attribution methods).
        ValueError: unknown method or groups, groups without an attributable layer, batches
            without labels.

    Example:
        >>> import torch, symmerge
        >>> from symmerge.models import create_model
        >>> model = create_model("mlp", width=8, depth=1)[0]
        >>> spec = symmerge.trace(model, (torch.randn(2, *model.input_shape),))
        >>> data = [(torch.randn(4, *model.input_shape), torch.tensor([0, 1, 2, 3]))]
        >>> scores = neuron_importance(model, spec, data, method="conductance")
        >>> {g: tuple(s.shape) for g, s in scores.items()}
        {'layers.1.out': (8,)}
    """
    if method not in IMPORTANCE_METHODS:
        raise ValueError(
            f"The 'method' parameter of neuron_importance must be one of {IMPORTANCE_METHODS}. "
            f"Got {method!r} instead."
        )
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"The '{name}' parameter of neuron_importance must be an int >= 1. "
                f"Got {value!r} instead."
            )
    names = list(spec.groups) if groups is None else list(groups)
    unknown = [g for g in names if g not in spec.groups]
    if unknown:
        raise ValueError(f"unknown groups {unknown}; the spec has {sorted(spec.groups)}")
    if method == "uniform":
        scores = {g: torch.ones(spec.groups[g].size, dtype=torch.float64) for g in names}
    else:
        attr = _captum(method)
        if data is None:
            raise ValueError(f"importance method={method!r} needs data= (labelled batches)")
        sites = _attributed_sites(spec, names)
        scores = _attribute(model, spec, sites, data, attr, method, steps, batch_size, seed,
                            device)  # fmt: skip
    if normalize:
        scores = {g: s / s.sum() for g, s in scores.items()}
    return scores


def _captum(method: str) -> Any:
    """captum's ``captum.attr`` module, or an ImportError that says how to install it."""
    try:
        import captum  # noqa: F401  (a missing or blocked top-level package fails here)
        import captum.attr as attr
    except ImportError as e:
        raise ImportError(
            f"neuron importance method={method!r} needs captum, an optional dependency: "
            f"{_INSTALL} (or use method='uniform')"
        ) from e
    return attr


def _attributed_sites(spec: SymmetrySpec, names: Sequence[str]) -> dict[str, ActivationSite]:
    """Per group, the module output that attribution is computed on: the Linear/Conv output
    that fusion clusters (pre-activation), else the first module output."""
    from symmerge.methods.fusion import producer_sites  # lazy: methods import every method

    found, bad = {}, []
    for g in names:
        group = spec.groups[g]
        sites = [] if group.blocks or group.block_group else producer_sites(group)
        if sites:
            found[g] = sites[0]
        else:
            bad.append(g)
    if bad:
        raise ValueError(
            f"groups {bad[:4]}{' ...' if len(bad) > 4 else ''} have no layer to attribute to "
            "(no module returns their units whole, or they move in blocks: attention heads, "
            "GroupNorm groups); pass groups= without them, or use method='uniform'"
        )
    return found


def _labelled(batch: Any, method: str) -> tuple[Tensor, Tensor]:
    """``(inputs, labels)`` of a batch, or a ValueError saying why attribution cannot use it."""
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and torch.is_tensor(batch[0])):
        got = type(batch).__name__ + (f" of {len(batch)}" if isinstance(batch, (tuple, list))
                                      else "")  # fmt: skip
        raise ValueError(
            f"importance method={method!r} attributes to the true label, so data batches must "
            f"be (inputs, labels) tuples; got a {got}. Pass labelled data, or use "
            "importance='uniform' for unlabelled data"
        )
    x, y = batch[0], torch.as_tensor(batch[1])
    if y.ndim != 1 or y.shape[0] != x.shape[0] or y.is_floating_point() or y.is_complex():
        raise ValueError(
            f"importance method={method!r} needs one integer class label per sample; got "
            f"labels of shape {tuple(y.shape)} and dtype {y.dtype} for {x.shape[0]} inputs"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"importance method={method!r} interpolates or differentiates the inputs, which "
            f"must be floating point; got {x.dtype} (token ids need an embedding-level "
            "attribution; use importance='uniform')"
        )
    return x, y


def _attribute(
    model: nn.Module,
    spec: SymmetrySpec,
    sites: dict[str, ActivationSite],
    data: Iterable[Any],
    attr: Any,
    method: str,
    steps: int,
    batch_size: int,
    seed: int,
    device: str | torch.device | None,
) -> dict[str, Tensor]:
    """Σ over samples of the per-unit |attribution| / #samples + ε, per group."""
    from symmerge.stats import _eval_on

    dev = None if device is None else torch.device(device)
    totals = {g: torch.zeros(spec.groups[g].size, dtype=torch.float64) for g in sites}
    count = 0
    with _eval_on([model], dev) as dev, _seeded(seed, dev), torch.enable_grad():
        layers = {g: model.get_submodule(s.module) for g, s in sites.items()}
        shapes: dict[str, tuple[int, ...]] = {}
        for batch in data:
            x, y = _labelled(batch, method)
            for xs, ys in zip(x.split(batch_size), y.split(batch_size), strict=True):
                xs = xs.detach().to(dev).requires_grad_(True)  # DeepLift hooks need grads
                ys = ys.to(dev)
                if not shapes:
                    shapes = _output_shapes(model, layers, sites, spec, xs)
                for g, site in sites.items():
                    a = _one(attr, method, model, layers[g], xs, ys, steps, site, shapes[g])
                    totals[g] += _per_unit(a.detach(), site.dim, method == "ablation")
                count += xs.shape[0]
    if count == 0:
        raise ValueError(f"importance method={method!r} got data without any sample")
    return {g: t / count + EPSILON for g, t in totals.items()}


def _one(
    attr: Any,
    method: str,
    model: nn.Module,
    layer: nn.Module,
    x: Tensor,
    y: Tensor,
    steps: int,
    site: ActivationSite,
    shape: tuple[int, ...],
) -> Tensor:
    """One captum attribution of ``layer``'s output for the batch ``x`` (targets ``y``)."""
    if method == "conductance":
        return attr.LayerConductance(model, layer).attribute(x, target=y, n_steps=steps)
    if method == "deeplift":
        return attr.LayerDeepLift(model, layer).attribute(x, target=y)
    dim = site.dim % len(shape)
    mask_shape = [1] * len(shape)
    mask_shape[dim] = shape[dim]
    mask = torch.arange(shape[dim], device=x.device).view(mask_shape)

    def picked(inputs: Tensor) -> Tensor:  # the true label's logit of every (repeated) sample
        labels = y.repeat(inputs.shape[0] // y.shape[0])
        return model(inputs).gather(1, labels[:, None])[:, 0]

    with torch.no_grad():
        # Several units ablated per forward (the batch repeated): one forward per unit made
        # ablation the slowest step of a fusion by two orders of magnitude. The label is
        # picked inside the forward (captum's layer ablation does not repeat tensor targets).
        return attr.LayerFeatureAblation(picked, layer).attribute(
            x, layer_mask=mask, perturbations_per_eval=ABLATIONS_PER_FORWARD
        )


def _per_unit(a: Tensor, dim: int, once: bool) -> Tensor:
    """``Σ_samples Σ_positions |a|`` per unit (float64, CPU); ``once``: a unit's positions
    hold one value (whole-unit ablation), taken once."""
    dim = dim % a.ndim
    rows = a.abs().movedim(dim, -1).reshape(a.shape[0], -1, a.shape[dim])
    per_sample = rows[:, 0] if once else rows.sum(1, dtype=torch.float64)
    return per_sample.sum(0, dtype=torch.float64).cpu()


def _output_shapes(
    model: nn.Module,
    layers: dict[str, nn.Module],
    sites: dict[str, ActivationSite],
    spec: SymmetrySpec,
    x: Tensor,
) -> dict[str, tuple[int, ...]]:
    """Each attributed layer's output shape on ``x``, checked to hold the group's units."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for g, layer in layers.items():

        def hook(_: nn.Module, __: Any, out: Any, g: str = g) -> None:
            shapes.setdefault(g, tuple(out.shape) if torch.is_tensor(out) else ())

        handles.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    for g, site in sites.items():
        shape, n = shapes.get(g, ()), spec.groups[g].size
        on_units = len(shape) >= 2 and -len(shape) <= site.dim < len(shape)
        if not on_units or site.dim % len(shape) == 0 or shape[site.dim] != n:
            raise ValueError(
                f"module '{site.module}' (site '{site.node}' of group {g!r}) returned "
                f"{shape or 'no tensor'}, not a batch of the group's {n} units on axis "
                f"{site.dim}; is this the model the spec was traced from?"
            )
    return shapes


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's RNG seeded inside the block, the caller's state restored after."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield
