"""PLeaS: partial matching at a compute budget, then layer-wise least squares.

Model B is matched to model A (activation or weight matching); in every group the best matched
pairs are averaged and the rest of both models' units are kept side by side
(:mod:`symmerge.solvers.partial`), so the merged model is between one model's size (every pair
merged: Git Re-Basin) and two (nothing merged: the ensemble). A budget ``B`` in [1, 2] (compute
relative to one model, zero blocks not counted) picks the ratios; then every Linear / Conv2d
layer is refitted by least squares to map the partially merged inputs of the source models to
their partially merged outputs (:mod:`symmerge.refine.lstsq`). Reset BatchNorm statistics
afterwards (``merge(..., renorm="reset-bn")``), as the paper does.

PLeaS-free: pass "public" data (another dataset, converted to the models' input space) as
``data``; matching, least squares and the BN reset then never see the models' own data.

Reference: Nasery, Hayase, Koh, Oh, "PLeaS: Merging Models with Permutations and Least
Squares", CVPR 2025, https://arxiv.org/abs/2407.02447
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from symmerge.methods import MergeResult, register_method
from symmerge.methods.rebasin import (
    Models,
    _check_equal_widths,
    _default_collect,
    _model_weights,
    _state_dicts,
    activation,
    weight,
)
from symmerge.methods.zipit import group_order
from symmerge.similarity import activation_similarity, weight_similarity
from symmerge.solvers.coordinate import coordinates
from symmerge.solvers.partial import (
    ALLOCATORS,
    allocate,
    compute_model,
    partial_maps,
    resolution,
)
from symmerge.spec import SymmetrySpec

__all__ = ["pleas"]

LS_MODES = ("closed", "adam", "none")
MATCHES = ("activation", "weight", "none")


@register_method(
    "pleas",
    paper="Nasery et al., PLeaS, CVPR 2025",
    url="https://arxiv.org/abs/2407.02447",
    needs_data=True,
    max_models=2,
    target_width=True,
)
def pleas(
    spec: SymmetrySpec,
    models: Models,
    *,
    data: Iterable[Any] | None = None,
    lam: float = 0.5,
    seed: int = 0,
    budget: float | None = None,
    ratios: float | Mapping[str, float] | str | Path | None = None,
    allocator: str = "stagewise",
    match: str = "activation",
    kind: str = "neg_sqdist",
    ls: str = "closed",
    ls_inputs: str = "ensemble",
    ridge: float = 1e-4,
    steps: int = 400,
    lr: float = 5e-4,
    stats: Any = None,
    collect: Callable[..., Any] | None = None,
    device: str | torch.device | None = None,
) -> MergeResult:
    """PLeaS: merge the best-matched units of every group at a compute budget between 1x
    and 2x one model, keep the rest of both models, then refit every layer by least squares.

    Args:
        data: batches (inputs, or ``(inputs, labels)``; labels unused) for matching and least
            squares; other ("public") data for PLeaS-free.
        lam: model B's weight in the merged units.
        budget: compute relative to one model, in [1, 2] (default 1, or what ``ratios`` give).
        ratios: the fraction of each coordinate kept separate instead of a budget: one float
            for all, ``{group: r}`` (missing groups 0; a head group sets its head dims), or a
            JSON file of that mapping.
        allocator: how a budget is spread: ``"stagewise"`` (default: the last groups, in
            input-to-output order, kept apart first, as ZipIt!'s partial zips), ``"score"``
            (least similar groups first, per unit of compute: a proxy for the paper's measured
            per-layer sensitivities, below stagewise on CIFAR-10 5+5 and equal on MNIST vs
            Fashion-MNIST in ``benchmarks/results/pleas_budgets_*``) or ``"uniform"``.
        match: ``"activation"`` (default) or ``"weight"`` matching, or ``"none"`` (unit i
            merged with unit i: least squares without permutation, a RegMean-like baseline).
        kind: activation similarity for matching and for choosing the merged pairs
            (``"neg_sqdist"``, minus the mean squared distance, by default; ``"neg_batch_dist"``
            is the paper's: minus the distance per batch, summed over batches).
        ls: ``"closed"`` (normal equations), ``"adam"`` (the official code's optimiser) or
            ``"none"`` (the partial merge alone).
        ls_inputs: ``"ensemble"`` (teacher forcing on the source models, the paper) or
            ``"merged"`` (each layer fitted on the merged model's own inputs, in order).
        ridge: relative ridge of the closed form, toward the partially merged weights (where
            the data leave a direction free the merge keeps it); steps, lr: Adam's.
        stats, collect, device: as for activation matching.
    """
    t0 = time.perf_counter()
    _check_args(ls, match, allocator)
    sds = _state_dicts(models)
    if len(sds) != 2:
        raise ValueError(f"the 'pleas' method merges 2 models, got {len(sds)}")
    _check_equal_widths(sds, "pleas")
    w = _model_weights(2, lam, None, "pleas")
    wants_data = match == "activation" or ls != "none"
    if wants_data and data is None and (stats is None or ls != "none"):
        raise ValueError(
            "the 'pleas' method needs data= (batches) for activation matching and least "
            "squares; PLeaS-free takes any public data converted to the models' inputs"
        )
    if (wants_data or budget is not None) and not all(isinstance(m, nn.Module) for m in models):
        raise ValueError("the 'pleas' method runs the models: pass nn.Modules, not state dicts")
    coords = coordinates(spec)
    fixed = _ratios(spec, coords, ratios)
    if fixed is not None and budget is not None:
        raise ValueError("pass either budget= or ratios=, not both")
    timings: dict[str, float] = {}
    if match == "activation" and stats is None:
        assert data is not None
        extra = {"batch_distances": True} if kind == "neg_batch_dist" else {}
        stats = (collect or _default_collect())(spec, list(models), data, device=device, **extra)
    timings["statistics"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    if match == "activation":
        found = activation(spec, models, stats=stats, lam=lam, kind=kind)
    elif match == "weight":
        found = weight(spec, sds, lam=lam, seed=seed)
    else:  # unit i with unit i: least squares without permutation (RegMean-like)
        found = MergeResult({}, {}, method="none")
    perm = found.perms(1) if found.maps else spec.identity_permutations()
    scores = _pair_scores(spec, sds, perm, stats, kind)
    timings["match"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    compute = None
    if isinstance(models[0], nn.Module):
        compute = compute_model(spec, models[0], _example(models[0], data))
    if fixed is None:
        assert compute is not None
        value = {c[0]: 1.0 - _mean_match(spec, c, sds, perm, stats) for c in coords}
        steps_of = {c[0]: resolution(spec, c) for c in coords}
        order = [g for g in group_order(spec, list(sds[0])) if g in steps_of]
        fixed = allocate(compute, 1.0 if budget is None else float(budget), steps_of,
                         allocator=allocator, scores=value, order=order)  # fmt: skip
    maps = partial_maps(spec, perm, scores, fixed, lam)
    timings["allocate"] = time.perf_counter() - t2
    from symmerge.groupmap import build_state_dict

    t3 = time.perf_counter()
    merged = build_state_dict(spec, sds, maps)
    timings["build"] = time.perf_counter() - t3
    log = []
    if compute is not None:
        reached = compute.budget(fixed)
        want = f" (asked {budget})" if budget is not None else ""
        log.append(f"pleas: compute {reached:.4f}x one model{want}, {compute.macs(fixed):.0f} "
                   f"multiply-adds per example")  # fmt: skip
    loss: dict[str, float] = {}
    if ls != "none":
        from symmerge.refine.lstsq import fit_layers

        assert data is not None
        t4 = time.perf_counter()
        fit = fit_layers(spec, list(models), maps, merged, data, solver=ls, ridge=ridge,
                         inputs_from=ls_inputs, steps=steps, lr=lr, device=device)  # fmt: skip
        merged, loss = fit.state_dict, fit.loss
        timings["lstsq"] = time.perf_counter() - t4
        log.append(f"pleas: least squares ({ls}) on {len(fit.layers)} layers"
                   + (f"; left as merged: {fit.skipped}" if fit.skipped else ""))  # fmt: skip
    total = time.perf_counter() - t0
    objective = {g: float(s.mean()) for g, s in scores.items()}
    res = MergeResult(merged, maps, objective, found.iterations, found.lap_seconds,
                      total - found.lap_seconds, log, "pleas", timings)  # fmt: skip
    res.details = {
        "ratios": fixed,
        "budget": compute.budget(fixed) if compute is not None else None,
        "macs": compute.macs(fixed) if compute is not None else None,
        "macs_one_model": compute.macs({}) if compute is not None else None,
        "ls": ls,
        "ls_loss": loss,
        "match": match,
        "weights": list(w),
    }
    return res


def _check_args(ls: str, match: str, allocator: str) -> None:
    for name, value, options in (("ls", ls, LS_MODES), ("match", match, MATCHES),
                                 ("allocator", allocator, ALLOCATORS)):  # fmt: skip
        if value not in options:
            raise ValueError(
                f"The '{name}' parameter of pleas must be one of {options}. Got {value!r} instead."
            )


def _ratios(
    spec: SymmetrySpec,
    coords: list[tuple[str, ...]],
    ratios: float | Mapping[str, float] | str | Path | None,
) -> dict[str, float] | None:
    """Ratios per coordinate (keyed by its first group) from a float, a mapping or a file."""
    if ratios is None:
        return None
    if isinstance(ratios, (str, Path)):
        path = Path(ratios)
        try:
            ratios = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read ratios from {path}: {exc}") from None
        if not isinstance(ratios, Mapping):
            raise ValueError(f"{path} must hold a JSON object {{group: ratio}}")
    if isinstance(ratios, (int, float)) and not isinstance(ratios, bool):
        ratios = {c[0]: float(ratios) for c in coords}
    if not isinstance(ratios, Mapping):
        raise ValueError(f"ratios must be a float, a {{group: r}} mapping or a file: {ratios!r}")
    key = {g: c[0] for c in coords for g in c}
    unknown = sorted(set(ratios) - set(key))
    if unknown:
        raise ValueError(f"ratios name unknown groups {unknown}; groups: {sorted(key)}")
    out: dict[str, float] = {}
    for g, r in ratios.items():
        ok = isinstance(r, (int, float)) and not isinstance(r, bool) and 0.0 <= r <= 1.0
        if not ok:
            raise ValueError(f"the ratio of group {g!r} must be in [0, 1], got {r!r}")
        c = key[g]
        if c in out and out[c] != float(r):
            raise ValueError(f"groups of one attention ({c!r}) have different ratios: {r}")
        out[c] = float(r)
    return out


def _example(model: nn.Module, data: Iterable[Any] | None) -> tuple[Any, ...]:
    """One example input: the first sample of ``data``, else one of ``model.input_shape``."""
    from symmerge.stats import _first_device, float_dtype, model_inputs, shape_inputs

    dev = _first_device(model)
    if data is not None and iter(data) is not data:
        args, kwargs = model_inputs(next(iter(data)), dev, float_dtype(model))
        if kwargs:
            raise ValueError("pleas measures compute on positional inputs only")
        return tuple(a[:1] if isinstance(a, torch.Tensor) else a for a in args)
    example = shape_inputs(model, 1)
    if example is None:
        raise ValueError("pleas needs re-iterable data= or model.input_shape to count compute")
    return example


def _pair_scores(
    spec: SymmetrySpec,
    sds: list[dict[str, torch.Tensor]],
    perm: Mapping[str, torch.Tensor],
    stats: Any,
    kind: str,
) -> dict[str, torch.Tensor]:
    """Similarity of every matched pair ``(i, perm[g][i])`` in the models' own coordinates
    (after matching, every other group of B permuted by its final permutation)."""
    out = {}
    for g, grp in spec.groups.items():
        idx = torch.as_tensor(perm[g], dtype=torch.long)
        if stats is not None and grp.sites and g in getattr(stats, "groups", [g]):
            sim = activation_similarity(stats, g, kind=kind, num_models=2)
        elif grp.members:
            sim = weight_similarity(spec, g, sds[0], sds[1], perm, kind="inner")
        else:  # a head group: its head dims decide
            out[g] = torch.zeros(grp.size, dtype=torch.float64)
            continue
        out[g] = sim.to(torch.float64)[torch.arange(grp.size), idx]
    return out


def _mean_match(
    spec: SymmetrySpec,
    coord: tuple[str, ...],
    sds: list[dict[str, torch.Tensor]],
    perm: Mapping[str, torch.Tensor],
    stats: Any,
) -> float:
    """Mean matched similarity of a coordinate on a common scale: Pearson correlation of the
    activations when there are statistics, else cosine of the weights."""
    values = []
    for g in coord[1:] if len(coord) > 1 else coord:
        grp = spec.groups[g]
        idx = torch.as_tensor(perm[g], dtype=torch.long)
        if stats is not None and grp.sites and g in getattr(stats, "groups", [g]):
            sim = activation_similarity(stats, g, kind="corr", num_models=2)
        else:
            sim = weight_similarity(spec, g, sds[0], sds[1], perm, kind="cos")
        values.append(float(sim.to(torch.float64)[torch.arange(grp.size), idx].mean()))
    return sum(values) / len(values)
