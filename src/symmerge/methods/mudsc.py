"""MuDSC: merging under dual-space constraints (the permute variant; zip comes later).

Units are matched on a mix of two Pearson correlations of model A's units (rows) with model
B's (columns): ``C_act`` of their activations on data, fixed, and ``C_w`` of their weight
vectors, read in the neighbours' current alignment (as weight matching reads them),

    C_g = alpha * C_w,g(P) + (1 - alpha) * C_act,g

Both lie in [-1, 1], so alpha needs no rescaling. Every group starts from activation matching
(one LAP per group on ``C_act``); then coordinate descent over the groups in a seeded random
order re-solves each group on ``C_g`` (:func:`~symmerge.solvers.coordinate.weight_matching`
with ``mixed_with``), keeps the best sweep by the total objective ``sum_g sum_i C_g[i, P_g[i]]``
and stops after ``patience`` sweeps that do not beat it (or ``max_sweeps``). Groups with
structure (GroupNorm groups, attention heads) are matched in two levels: a LAP inside every
block pair, then a LAP over the block-pair scores, with one head pairing shared by the q/k and
v/o groups of an attention (:func:`~symmerge.solvers.coordinate.solve_coordinate`). The merged
model is the average of A and the aligned B.

Limits: ``alpha=0`` gives activation matching's permutations exactly (every group starts at the
optimum of its fixed objective and a step is taken only when it strictly improves). ``alpha=1``
ignores the activations (no statistics are collected) and starts from the identity, so with
``patience=None`` it is exactly weight matching with ``kind="corr"``.

.. warning::
    Departures from the authors' code: a step keeps its group's permutation unless the LAP
    strictly improves that group's objective (the code always takes the LAP's answer; they
    differ only on ties); sweeps are scored by the *sum* over groups of the matched
    similarities at the sweep's end (the code: the mean over groups of per-group means, each
    taken when its group was solved); the start counts as sweep 0 (the code always keeps its
    first sweep); q/k and v/o share one head pairing (the code pairs their heads separately,
    which the traced symmetry does not allow); ``alpha=1`` starts from the identity. With
    ``patience`` set a sweep that lowers the total is undone, so ``alpha=1`` follows weight
    matching only while its sweep totals keep rising (a step can lower its neighbours'
    objectives); ``patience=None`` is weight matching's rule.

Reference: Xu, Yuan, Wang, Wang, Song, Song, "Training-Free Pretrained Model Merging", CVPR 2024
(MuDSC), https://arxiv.org/abs/2403.01753
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from symmerge.groupmap import GroupMap
from symmerge.methods import MergeResult, register_method
from symmerge.methods.rebasin import (
    Models,
    _activation_sim,
    _check_equal_widths,
    _default_collect,
    _finish,
    _model_weights,
    _state_dicts,
)
from symmerge.solvers.coordinate import Perms, coordinates, solve_coordinate, weight_matching
from symmerge.spec import SymmetrySpec

__all__ = ["VARIANTS", "mudsc"]

#: The matchers Psi that exist. "zip" (ZipIt!'s greedy zip on the concatenated similarity,
#: merging within a model too) will join once the zip solver is in.
VARIANTS = ("permute",)


@register_method(
    "mudsc",
    paper="Xu et al., MuDSC, CVPR 2024",
    url="https://arxiv.org/abs/2403.01753",
    needs_data=True,
    max_models=2,
)
def mudsc(
    spec: SymmetrySpec,
    models: Models,
    *,
    data: Iterable[Any] | None = None,
    lam: float = 0.5,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    alpha: float = 0.5,
    variant: str = "permute",
    max_sweeps: int = 100,
    patience: int | None = 5,
    stats: Any = None,
    collect: Callable[..., Any] | None = None,
    device: str | torch.device | None = None,
    backend: str = "scipy",
) -> MergeResult:
    """MuDSC: align model 1 to model 0 on a mix of weight and activation correlations, by
    coordinate descent started from activation matching, then average.

    Args:
        data: batches to run the models on (tensors or ``(inputs, labels)`` tuples).
        alpha: share of the weight space, ``C = alpha C_w + (1 - alpha) C_act``, in [0, 1].
            The paper picks it per experiment from {0.1, ..., 0.9} by train-set accuracy of the
            merged model; 0.5 is the middle of that grid.
        variant: the matcher; only ``"permute"`` (one LAP per group, MuDSC-Align) so far.
        max_sweeps: bound on sweeps over all groups.
        patience: stop after this many sweeps in a row that do not beat the best sweep (whose
            permutations are restored after each); ``None``: stop when a sweep changes nothing
            (weight matching's rule).
        stats: precomputed statistics of both models (skips collecting).
        collect: ``collect(spec, models, batches, device=...)`` returning statistics; default
            :func:`symmerge.stats.collect_statistics`.
        device: where statistics are collected.
        backend: LAP backend (see :func:`symmerge.solvers.solve_lap`).

    Example:
        >>> import torch, symmerge
        >>> from symmerge.models import create_model
        >>> model = create_model("mlp")[0].eval()
        >>> spec = symmerge.trace(model, torch.randn(2, 1, 28, 28))
        >>> copy = spec.permuted(model, spec.random_permutations(seed=1))
        >>> res = mudsc(spec, [model, copy], data=[torch.randn(64, 1, 28, 28)])
        >>> max(float((res.state_dict[k] - v).abs().max()) for k, v in model.state_dict().items())
        0.0
    """
    _check_params(alpha, variant, max_sweeps, patience)
    t0 = time.perf_counter()
    sds = _state_dicts(models)
    if len(sds) != 2:
        raise ValueError(f"the 'mudsc' method merges 2 models, got {len(sds)}")
    _check_equal_widths(sds, "mudsc")
    w = _model_weights(2, lam, weights, "mudsc")
    act: dict[str, torch.Tensor] | None = None
    start: Perms = spec.identity_permutations()
    t_stats = lap_s = 0.0
    if alpha < 1.0:  # start from activation matching
        if stats is None:
            stats = _collect(spec, models, data, collect, device)
        t_stats = time.perf_counter() - t0
        act, start = {}, {}
        for coord in coordinates(spec):
            for k, g in enumerate(coord):
                act[g] = _activation_sim(
                    spec, stats, g, 1, "corr", 2, head=len(coord) > 1 and k == 0
                )
            t1 = time.perf_counter()
            start.update(solve_coordinate(spec, coord, {g: act[g] for g in coord}, backend=backend))
            lap_s += time.perf_counter() - t1
    setup = time.perf_counter() - t0 - lap_s
    res = weight_matching(
        spec, sds[0], sds[1], init=start, kind="corr", max_sweeps=max_sweeps, seed=seed,
        backend=backend, alpha=alpha, mixed_with=act, patience=patience,
    )  # fmt: skip
    ident = spec.identity_permutations()
    maps = {g: GroupMap.permutations([ident[g], res.perms[g]], w) for g in spec.groups}
    out = _finish(
        "mudsc", spec, sds, maps, res.objective, res.iterations, res.lap_seconds + lap_s,
        res.other_seconds + setup, res.log,
    )  # fmt: skip
    out.timings["statistics"] = t_stats
    return out


def _check_params(alpha: Any, variant: Any, max_sweeps: Any, patience: Any) -> None:
    """One message shape for every bad parameter (sklearn's)."""
    real = isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
    if not (real and math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(
            f"The 'alpha' parameter of mudsc must be a float in [0, 1]. Got {alpha!r} instead."
        )
    if variant not in VARIANTS:
        raise ValueError(
            f"The 'variant' parameter of mudsc must be one of {VARIANTS}. Got {variant!r} "
            "instead (the zip variant needs the ZipIt! solver, not available yet)."
        )
    for name, value, none_ok in (("max_sweeps", max_sweeps, False), ("patience", patience, True)):
        if value is None and none_ok:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            allowed = "an int >= 1" + (" or None" if none_ok else "")
            raise ValueError(
                f"The {name!r} parameter of mudsc must be {allowed}. Got {value!r} instead."
            )


def _collect(
    spec: SymmetrySpec,
    models: Models,
    data: Iterable[Any] | None,
    collect: Callable[..., Any] | None,
    device: str | torch.device | None,
) -> Any:
    if data is None:
        raise ValueError("the 'mudsc' method needs data= (batches) or stats=")
    if not all(isinstance(m, nn.Module) for m in models):
        raise ValueError(
            "the 'mudsc' method runs the models on data: pass nn.Modules, not state dicts "
            "(or pass precomputed stats=)"
        )
    return (collect or _default_collect())(spec, list(models), data, device=device)
