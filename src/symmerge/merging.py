"""The front door: ``merge(models, method=..., data=...)``, as ``symmerge merge`` does.

It validates the inputs once (same architecture, finite weights, data when the method needs
it), traces the symmetry, runs the registered method, loads the merged weights into a copy of
the first model and renormalizes (BN reset or REPAIR) on request.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from symmerge.methods import MergeResult, get_method, list_methods
from symmerge.spec import SymmetrySpec, trace

__all__ = ["RENORMS", "BatchNormStatsWarning", "check_compatible", "interpolation", "merge"]

RENORMS = (None, "reset-bn", "repair")
_DATA_METHODS = {"activation", "ste"}


class BatchNormStatsWarning(UserWarning):
    """A merge between the endpoints left BatchNorm running statistics interpolated: they
    rarely fit the merged weights (a merged ResNet may predict one class) until recomputed
    with ``renorm="reset-bn"`` or ``"repair"``."""


def has_bn_statistics(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm layers that use running statistics in eval mode."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())


def _warn_bn_statistics(subject: str) -> None:
    warnings.warn(
        BatchNormStatsWarning(
            f"{subject} interpolated from the inputs' and rarely fit the merged weights; pass "
            "renorm='reset-bn' or 'repair' with data to recompute them"
        ),
        stacklevel=3,  # the caller of merge() / interpolation()
    )


def check_compatible(models: Sequence[nn.Module]) -> None:
    """Raise ValueError unless all models share one architecture and have finite weights."""
    if len(models) < 2:
        raise ValueError(f"merging needs at least 2 models, got {len(models)}")
    ref = models[0].state_dict()
    for k, m in enumerate(models):
        sd = m.state_dict()
        if set(sd) != set(ref):
            missing, extra = sorted(set(ref) - set(sd))[:3], sorted(set(sd) - set(ref))[:3]
            raise ValueError(
                f"model {k} has a different architecture from model 0 "
                f"(missing {missing}, unexpected {extra})"
            )
        for name, t in sd.items():
            if t.shape != ref[name].shape:
                raise ValueError(
                    f"model {k} has a different width from model 0: '{name}' is "
                    f"{tuple(t.shape)} vs {tuple(ref[name].shape)}; this method needs equal "
                    "widths"
                )
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"model {k} has non-finite values (NaN/inf) in '{name}'")


def merge(
    models: Sequence[nn.Module],
    method: str = "weight",
    *,
    data: Iterable[Any] | None = None,
    renorm: str | None = None,
    renorm_data: Iterable[Any] | None = None,
    lam: float = 0.5,
    seed: int = 0,
    spec: SymmetrySpec | None = None,
    example_inputs: Any = None,
    **method_kwargs: Any,
) -> tuple[nn.Module, MergeResult]:
    """Merge ``models`` with a registered method.

    Args:
        models: two or more models of one architecture (model 0 is the reference order).
        method: a name from :func:`symmerge.methods.list_methods`.
        data: batches for data-based methods (``activation``, ``ste``).
        renorm: ``None``, ``"reset-bn"`` or ``"repair"``; uses ``renorm_data`` (or ``data``).
            ``None`` on a BatchNorm model merged between the endpoints warns
            (:class:`BatchNormStatsWarning`): its running statistics stay interpolated.
        lam: interpolation weight of model 1 for two models (0 gives model 0, 1 model 1).
        spec: the symmetry of the architecture (traced from model 0 if None).
        example_inputs: inputs for tracing (default: a batch of 2 of ``model.input_shape``).

    Returns:
        ``(merged model, MergeResult)``; the inputs are not modified.
    """
    if method not in list_methods():
        raise ValueError(f"unknown method {method!r}; registered methods: {list_methods()}")
    if renorm not in RENORMS:
        raise ValueError(
            f"The 'renorm' parameter of merge must be one of {RENORMS}. Got {renorm!r} instead."
        )
    if not (isinstance(lam, (int, float)) and 0.0 <= lam <= 1.0 and math.isfinite(lam)):
        raise ValueError(f"The 'lam' parameter of merge must be a float in [0, 1]. Got {lam!r}.")
    models = list(models)
    check_compatible(models)
    if method in _DATA_METHODS and data is None:
        raise ValueError(f"the '{method}' method needs data (batches of inputs and labels)")
    renorm_data = renorm_data if renorm_data is not None else data
    if renorm and renorm_data is None:
        raise ValueError(f"renorm={renorm!r} needs data (renorm_data= or data=)")
    if spec is None:
        spec = _trace(models[0], example_inputs)
    fn = get_method(method)
    kwargs = dict(method_kwargs)
    if data is not None:
        kwargs["data"] = data
    result = fn(spec, models, lam=lam, seed=seed, **kwargs)
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(result.state_dict)
    if renorm == "reset-bn":
        from symmerge.renorm import reset_bn

        reset_bn(merged, renorm_data)
    elif renorm == "repair":
        from symmerge.renorm import repair

        aligned = _aligned_endpoints(spec, models, result)
        weights = (1 - lam, lam) if len(models) == 2 else None
        repair(merged, aligned, renorm_data, weights=weights, spec=spec)
    elif (len(models) > 2 or 0 < lam < 1) and has_bn_statistics(merged):
        _warn_bn_statistics("the merged model's BatchNorm running statistics are")
    return merged.eval(), result


def interpolation(
    models: Sequence[nn.Module],
    method: str = "weight",
    lambdas: Sequence[float] = tuple(k / 10 for k in range(11)),
    *,
    data: Iterable[Any] | None = None,
    renorm: str | None = None,
    seed: int = 0,
    spec: SymmetrySpec | None = None,
    example_inputs: Any = None,
    **method_kwargs: Any,
) -> Iterator[tuple[float, nn.Module]]:
    """Models along (1-λ)·A + λ·aligned(B): align once (at λ=0.5), then rebuild for each λ.

    Each point is renormalized on ``data`` when ``renorm`` is given (REPAIR with goal weights
    (1-λ, λ)); without it, BatchNorm models warn once (:class:`BatchNormStatsWarning`).
    Yields ``(λ, model)``.
    """
    from symmerge.groupmap import build_state_dict

    models = list(models)
    if len(models) != 2:
        raise ValueError(f"interpolation needs exactly 2 models, got {len(models)}")
    spec = spec if spec is not None else _trace(models[0], example_inputs)
    with warnings.catch_warnings():  # the midpoint is only for the alignment
        warnings.simplefilter("ignore", BatchNormStatsWarning)
        mid, result = merge(models, method, data=data, seed=seed, spec=spec, **method_kwargs)
    del mid
    if renorm is None and any(0 < lam < 1 for lam in lambdas) and has_bn_statistics(models[0]):
        _warn_bn_statistics("at each point, the BatchNorm running statistics are")
    states = [m.state_dict() for m in models]
    for lam in lambdas:
        maps = {g: gm.with_weights([1.0 - lam, lam]) for g, gm in result.maps.items()}
        point = copy.deepcopy(models[0])
        point.load_state_dict(build_state_dict(spec, states, maps, weights=[1.0 - lam, lam]))
        if renorm == "reset-bn":
            from symmerge.renorm import reset_bn

            reset_bn(point, data)
        elif renorm == "repair":
            from symmerge.renorm import repair

            aligned = _aligned_endpoints(spec, models, result)
            repair(point, aligned, data, weights=(1.0 - lam, lam), spec=spec)
        yield lam, point.eval()


def _trace(model: nn.Module, example_inputs: Any) -> SymmetrySpec:
    if example_inputs is None:
        shape = getattr(model, "input_shape", None)
        if shape is None:
            raise ValueError("pass example_inputs= or spec= (the model has no input_shape)")
        example_inputs = (torch.randn(2, *shape),)
    return trace(model, example_inputs)


def _aligned_endpoints(
    spec: SymmetrySpec, models: Sequence[nn.Module], result: MergeResult
) -> list[nn.Module]:
    """The source models permuted into the merged model's unit order (for REPAIR's goals)."""
    try:
        return [spec.permuted(m, result.perms(k)) for k, m in enumerate(models)]
    except ValueError as e:
        raise ValueError(f"REPAIR needs permutation maps; method '{result.method}': {e}") from e
