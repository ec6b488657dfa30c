"""Git Re-Basin recipes: plain averaging, weight matching, activation matching, MergeMany.

Each recipe aligns the models (a GroupMap per group), then builds the merged weights with
:func:`symmerge.groupmap.build_state_dict`. For two models the interpolation weight ``lam`` gives
model weights ``(1 - lam, lam)``; for more models pass ``weights=`` (uniform by default).
Renormalisation (BN reset, REPAIR) is a separate step, not done here.

Weight and activation matching also merge parents of different widths (``specs=``, one traced
spec per model): the widest model fixes the merged widths and unit order, each narrower model's
units are matched to distinct units of it by a rectangular assignment, matched units are
averaged and unmatched ones are the wide model's own (:meth:`GroupMap.partial_permutations`).

Reference: Ainsworth, Hayase, Srinivasa, "Git Re-Basin: Merging Models modulo Permutation
Symmetries", ICLR 2023, https://arxiv.org/abs/2209.04836
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from symmerge.groupmap import GroupMap, build_state_dict, check_specs
from symmerge.methods import MergeResult, register_method
from symmerge.similarity import activation_similarity
from symmerge.solvers.coordinate import (
    Perms,
    coordinates,
    merge_many,
    narrow_identity,
    solve_coordinate,
    solve_product_coordinate,
    weight_matching,
)
from symmerge.solvers.lap import lap_objective
from symmerge.spec import SymmetrySpec

__all__ = ["activation", "mergemany", "naive", "weight"]

_PAPER = "Ainsworth et al., Git Re-Basin, ICLR 2023"
_URL = "https://arxiv.org/abs/2209.04836"

Models = Sequence[nn.Module | Mapping[str, torch.Tensor]]


@register_method("naive", paper="weight averaging (baseline)", url=_URL, max_models=None)
def naive(
    spec: SymmetrySpec,
    models: Models,
    *,
    data: Any = None,
    lam: float = 0.5,
    seed: int = 0,
    weights: Sequence[float] | None = None,
) -> MergeResult:
    """Plain (weighted) average of the weights, without any alignment."""
    t0 = time.perf_counter()
    sds = _state_dicts(models)
    _check_equal_widths(sds, "naive")
    w = _model_weights(len(sds), lam, weights, "naive")
    maps = {g: GroupMap.identity(grp.size, len(sds), w) for g, grp in spec.groups.items()}
    merged = build_state_dict(spec, sds, maps)
    seconds = time.perf_counter() - t0
    return MergeResult(
        merged, maps, other_seconds=seconds, method="naive", timings={"build": seconds}
    )


@register_method("weight", paper=_PAPER, url=_URL, max_models=2, unequal_widths=True)
def weight(
    spec: SymmetrySpec,
    models: Models,
    *,
    data: Any = None,
    lam: float = 0.5,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    kind: str = "inner",
    max_sweeps: int = 100,
    init: Mapping[str, torch.Tensor] | None = None,
    backend: str = "scipy",
    specs: Sequence[SymmetrySpec] | None = None,
) -> MergeResult:
    """Weight matching (data-free): align model 1 to model 0 by coordinate descent, then average.

    Args:
        kind: weight similarity, ``"inner"`` (the paper), ``"corr"`` or ``"cos"``.
        max_sweeps: bound on sweeps over all groups.
        init: warm-start permutations of model 1 (with ``specs``: of the narrower model, as
            :func:`~symmerge.solvers.coordinate.weight_matching` takes them). Without it the
            descent starts from a dependency sweep; ``init=spec.identity_permutations()``
            starts from the identity, as the paper does.
        backend: LAP backend (see :func:`symmerge.solvers.solve_lap`).
        specs: one spec per model when their widths differ; the wider model is then matched
            against (rectangular assignments) and fixes the merged widths and unit order.
    """
    sds = _state_dicts(models)
    if len(sds) != 2:
        raise ValueError(
            f"the 'weight' method merges 2 models, got {len(sds)}; use 'mergemany' for more"
        )
    w = _model_weights(2, lam, weights, "weight")
    if specs is not None:
        specs = check_specs(specs, 2)
        r = _widest(specs)
        res = weight_matching(
            specs[r], sds[r], sds[1 - r], init=init, kind=kind, max_sweeps=max_sweeps,
            seed=seed, backend=backend, spec_b=specs[1 - r],
        )  # fmt: skip
        perms = [res.perms, res.perms]
        perms[r] = specs[r].identity_permutations()
        return _finish(
            "weight", specs, sds, _partial_maps(specs, perms, w), res.objective,
            res.iterations, res.lap_seconds, res.other_seconds, res.log,
        )  # fmt: skip
    _check_equal_widths(sds, "weight")
    res = weight_matching(
        spec, sds[0], sds[1], init=init, kind=kind, max_sweeps=max_sweeps, seed=seed,
        backend=backend,
    )  # fmt: skip
    ident = spec.identity_permutations()
    maps = {g: GroupMap.permutations([ident[g], res.perms[g]], w) for g in spec.groups}
    return _finish(
        "weight", spec, sds, maps, res.objective, res.iterations, res.lap_seconds,
        res.other_seconds, res.log,
    )  # fmt: skip


@register_method(
    "activation", paper=_PAPER, url=_URL, needs_data=True, max_models=None, unequal_widths=True
)
def activation(
    spec: SymmetrySpec,
    models: Models,
    *,
    data: Iterable[Any] | None = None,
    lam: float = 0.5,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    kind: str = "corr",
    stats: Any = None,
    collect: Callable[..., Any] | None = None,
    device: str | torch.device | None = None,
    backend: str = "scipy",
    specs: Sequence[SymmetrySpec] | None = None,
) -> MergeResult:
    """Activation matching: align every model to model 0 by one LAP per group on unit
    similarities measured on data, then average.

    Args:
        data: batches to run the models on (tensors or ``(inputs, labels)`` tuples).
        kind: ``"corr"`` (Pearson, default), ``"inner"``, ``"cov"``, ``"neg_dist"`` or
            ``"neg_sqdist"`` (see :func:`symmerge.similarity.activation_similarity`).
        stats: precomputed statistics of all the models (skips collecting); with ``specs``,
            their units concatenated model-major with each model's own width.
        collect: ``collect(spec, models, batches, device=...)`` returning statistics; default
            :func:`symmerge.stats.collect_statistics`. With ``specs`` it is also passed
            ``specs=``.
        device: where statistics are collected.
        specs: one spec per model when their widths differ: every model is matched to the
            widest one (rectangular assignments), which fixes the merged widths and unit order.
    """
    t0 = time.perf_counter()
    n = len(models)
    w = _model_weights(n, lam, weights, "activation")
    if specs is None:
        _check_equal_widths(_state_dicts(models), "activation")
    else:
        specs = check_specs(specs, n)
    if stats is None:
        if data is None:
            raise ValueError("the 'activation' method needs data= (batches) or stats=")
        if not all(isinstance(m, nn.Module) for m in models):
            raise ValueError(
                "the 'activation' method runs the models on data: pass nn.Modules, not state "
                "dicts (or pass precomputed stats=)"
            )
        collect = collect or _default_collect()
        extra = {} if specs is None else {"specs": specs}
        seen = spec if specs is not None else _with_products(spec, models[0])
        stats = collect(seen, list(models), data, device=device, **extra)
    t_stats = time.perf_counter() - t0
    sds = _state_dicts(models)
    if specs is not None:
        res = _match_unequal(specs, stats, kind, backend, w, sds)
        res.timings["statistics"] = t_stats
        res.other_seconds += t_stats
        return res
    perms: list[dict[str, torch.Tensor]] = [spec.identity_permutations()]
    objective: dict[str, float] = {}
    lap_s = 0.0
    coords = coordinates(spec)
    products = _observed_products(spec, stats, coords)
    for b in range(1, n):
        perms.append({})
        for coord in coords:
            if coord[0] in products:  # a factor of an observed product: with the other
                joint, inner = products[coord[0]]
                if inner in perms[b]:
                    continue
                product = activation_similarity(stats, f"{joint[0]}*{inner}", 0, b, kind=kind,
                                                num_models=n)  # fmt: skip
                sims = {g: _activation_sim(spec, stats, g, b, kind, n, head=False)
                        for g in joint[1:]}  # fmt: skip
                t1 = time.perf_counter()
                perms[b].update(solve_product_coordinate(spec, joint, inner, product, sims,
                                                         backend=backend))  # fmt: skip
                lap_s += time.perf_counter() - t1
                both = perms[b][joint[0]][:, None] * spec.groups[inner].size + perms[b][inner]
                objective[inner] = objective.get(inner, 0.0) + lap_objective(product, both.ravel())
                for g in joint[1:]:
                    objective[g] = objective.get(g, 0.0) + lap_objective(sims[g], perms[b][g])
                continue
            sims = {
                g: _activation_sim(spec, stats, g, b, kind, n, head=len(coord) > 1 and k == 0)
                for k, g in enumerate(coord)
            }
            t1 = time.perf_counter()
            perms[b].update(solve_coordinate(spec, coord, sims, backend=backend))
            lap_s += time.perf_counter() - t1
            for g in coord:
                objective[g] = objective.get(g, 0.0) + lap_objective(sims[g], perms[b][g])
    maps = {g: GroupMap.permutations([p[g] for p in perms], w) for g in spec.groups}
    other = time.perf_counter() - t0 - lap_s
    res = _finish("activation", spec, sds, maps, objective, 0, lap_s, other, [])
    res.timings["statistics"] = t_stats
    return res


@register_method("mergemany", paper=_PAPER, url=_URL, max_models=None)
def mergemany(
    spec: SymmetrySpec,
    models: Models,
    *,
    data: Any = None,
    lam: float = 0.5,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    kind: str = "inner",
    max_rounds: int = 100,
    max_sweeps: int = 100,
    backend: str = "scipy",
) -> MergeResult:
    """MergeMany (data-free, N models): match each model to the mean of the others until no
    alignment changes, then average all models in model 0's unit order.

    Matching always uses the uniform mean of the other models; ``weights`` (or ``lam`` for two
    models) only weigh the final average.
    """
    sds = _state_dicts(models)
    _check_equal_widths(sds, "mergemany")
    w = _model_weights(len(sds), lam, weights, "mergemany")
    res = merge_many(
        spec, sds, max_rounds=max_rounds, max_sweeps=max_sweeps, seed=seed, kind=kind,
        backend=backend,
    )  # fmt: skip
    maps = {g: GroupMap.permutations([p[g] for p in res.model_perms], w) for g in spec.groups}
    return _finish(
        "mergemany", spec, sds, maps, res.objective, res.iterations, res.lap_seconds,
        res.other_seconds, res.log,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------


def _finish(
    name: str,
    spec: SymmetrySpec | Sequence[SymmetrySpec],
    sds: list[dict[str, torch.Tensor]],
    maps: dict[str, GroupMap],
    objective: dict[str, float],
    iterations: int,
    lap_s: float,
    other_s: float,
    log: list[str],
) -> MergeResult:
    t0 = time.perf_counter()
    merged = build_state_dict(spec, sds, maps)
    build = time.perf_counter() - t0
    return MergeResult(
        merged, maps, dict(objective), iterations, lap_s, other_s + build, list(log), name,
        {"match": lap_s + other_s, "build": build},
    )  # fmt: skip


def _state_dicts(models: Models) -> list[dict[str, torch.Tensor]]:
    out = []
    for m in models:
        if isinstance(m, nn.Module):
            out.append({k: v.detach() for k, v in m.state_dict().items()})
        elif isinstance(m, Mapping):
            out.append(dict(m))
        else:
            raise TypeError(f"models must be nn.Modules or state dicts, got {type(m).__name__}")
    if not out:
        raise ValueError("no models to merge")
    return out


def _model_weights(
    n: int, lam: float, weights: Sequence[float] | None, method: str
) -> tuple[float, ...]:
    if weights is not None:
        w = tuple(float(x) for x in weights)
        if len(w) != n:
            raise ValueError(
                f"The 'weights' parameter of {method} needs one weight per model ({n}). "
                f"Got {len(w)} instead."
            )
        return w
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(
            f"The 'lam' parameter of {method} must be a float in [0, 1]. Got {lam!r} instead."
        )
    if n == 2:
        return (1.0 - float(lam), float(lam))
    if lam != 0.5:
        raise ValueError(
            f"The 'lam' parameter of {method} applies to two models; for {n} models pass "
            "weights= instead."
        )
    return tuple([1.0 / n] * n)


def _with_products(spec: SymmetrySpec, model: Any) -> SymmetrySpec:
    """``spec`` with a group ``"first*second"`` for every product of two groups that only the
    product observes (:func:`symmerge.stats.product_sites`), so statistics are collected there."""
    if not isinstance(model, nn.Module):
        return spec
    from symmerge.spec import Group
    from symmerge.stats import product_sites

    extra = {
        f"{a}*{b}": Group(f"{a}*{b}", spec.groups[a].size * spec.groups[b].size, sites=[site])
        for (a, b), site in product_sites(spec, model).items()
    }
    return dataclasses.replace(spec, groups={**spec.groups, **extra}) if extra else spec


def _observed_products(
    spec: SymmetrySpec, stats: Any, coords: Sequence[tuple[str, ...]]
) -> dict[str, tuple[tuple[str, ...], str]]:
    """For the products ``"first*second"`` the statistics hold: each factor -> (the coordinate
    of ``first``, ``second``), solved together (a factor in several products: the first; an
    inner factor that steers groups of its own is left alone)."""
    of_head = {c[0]: c for c in coords}
    out: dict[str, tuple[tuple[str, ...], str]] = {}
    for name in getattr(stats, "groups", None) or []:
        first, star, second = name.partition("*")
        if not star or first not in spec.groups or second not in spec.groups:
            continue
        joint = of_head.get(first)
        if joint is None or of_head.get(second) != (second,) or first in out or second in out:
            continue
        out[first] = out[second] = (joint, second)
    return out


def _activation_sim(
    spec: SymmetrySpec,
    stats: Any,
    group: str,
    b: int,
    kind: str,
    n: int,
    head: bool,
    *,
    a: int = 0,
    sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Model a vs model b (``sizes``: each model's units when widths differ). A head group
    that was not observed scores zero (the groups it steers decide the head permutation); any
    other unobserved group is an error."""
    collected = getattr(stats, "groups", None)
    if group in collected if collected is not None else bool(spec.groups[group].sites):
        return activation_similarity(stats, group, a, b, kind=kind, num_models=n, sizes=sizes)
    if head:
        size = spec.groups[group].size
        return torch.zeros(size, size if sizes is None else sizes[b], dtype=torch.float64)
    if not spec.groups[group].sites:
        from symmerge.stats import unobservable

        raise ValueError(unobservable([spec.groups[group]]))
    raise ValueError(
        f"no activation statistics for group {group!r}; collect statistics of every group"
    )


def _default_collect() -> Callable[..., Any]:
    try:
        from symmerge.stats import collect_statistics
    except ImportError as e:
        raise ImportError(
            "activation matching needs symmerge.stats.collect_statistics; pass collect= or "
            "stats= to use another source of statistics"
        ) from e
    return collect_statistics


# ---------------------------------------------------------------------------------------
# parents of different widths
# ---------------------------------------------------------------------------------------


def _check_equal_widths(sds: Sequence[Mapping[str, torch.Tensor]], method: str) -> None:
    """A clear error for parents of different widths (the builder would fail deep inside)."""
    from symmerge.methods import list_methods, method_info

    for m, sd in enumerate(sds[1:], 1):
        for key, t in sd.items():
            ref = sds[0].get(key)
            if ref is None or t.shape == ref.shape:
                continue
            can = [repr(n) for n in list_methods() if method_info(n).unequal_widths]
            fix = (
                f"pass specs= (one traced spec per model) to '{method}', or use merge()"
                if method_info(method).unequal_widths
                else f"the '{method}' method needs equal widths; methods that merge parents of "
                f"different widths: {', '.join(can)}"
            )
            raise ValueError(
                f"model {m} has a different width from model 0 ('{key}' is "
                f"{tuple(t.shape)} vs {tuple(ref.shape)}); {fix}"
            )


def _widest(specs: Sequence[SymmetrySpec]) -> int:
    """The first model at least as wide as every other in every group: the merged model takes
    its widths and unit order (a narrow unit can only be matched to a unit that exists)."""
    for r, sp in enumerate(specs):
        if all(sp.groups[g].size >= o.groups[g].size for o in specs for g in sp.groups):
            return r
    sizes = {g: [sp.groups[g].size for sp in specs] for g in specs[0].groups}
    raise ValueError(
        "no model is at least as wide as the others in every group, so there is no merged "
        f"width to match into; group sizes per model: {sizes}"
    )


def _partial_maps(
    specs: Sequence[SymmetrySpec], perms: Sequence[Perms], w: Sequence[float]
) -> dict[str, GroupMap]:
    """GroupMaps from each model's matching into the widest model's units (-1: unmatched)."""
    return {
        g: GroupMap.partial_permutations(
            [p[g] for p in perms], [sp.groups[g].size for sp in specs], w
        )
        for g in specs[0].groups
    }


def _match_unequal(
    specs: list[SymmetrySpec],
    stats: Any,
    kind: str,
    backend: str,
    w: Sequence[float],
    sds: list[dict[str, torch.Tensor]],
) -> MergeResult:
    """Activation matching of every model into the widest one (rectangular LAPs)."""
    t0 = time.perf_counter()
    n, r = len(specs), _widest(specs)
    perms: list[Perms] = []
    objective: dict[str, float] = {}
    lap_s = 0.0
    for b in range(n):
        if b == r:
            perms.append(specs[r].identity_permutations())
            continue
        narrow_identity(specs[r], specs[b])  # checks: no wider group in b, the same blocks
        perms.append({})
        for coord in coordinates(specs[r]):
            sims = {}
            for k, g in enumerate(coord):
                sizes = [sp.groups[g].size for sp in specs]
                head = len(coord) > 1 and k == 0
                sims[g] = _activation_sim(specs[r], stats, g, b, kind, n, head, a=r, sizes=sizes)
            t1 = time.perf_counter()
            perms[b].update(solve_coordinate(specs[r], coord, sims, backend=backend))
            lap_s += time.perf_counter() - t1
            for g in coord:
                objective[g] = objective.get(g, 0.0) + lap_objective(sims[g], perms[b][g])
    maps = _partial_maps(specs, perms, w)
    other = time.perf_counter() - t0 - lap_s
    return _finish("activation", specs, sds, maps, objective, 0, lap_s, other, [])
