"""ZipIt!: merge features within and across models by a greedy zip on their correlations.

For every group, the correlation of the concatenated features of the N models (measured on
``data``) is zipped greedily (:func:`symmerge.solvers.zipit.greedy_zip`): the most correlated
pair of features is averaged into one, again and again, until the group has ``width``
features. Unlike a permutation, two features of one model may be merged (up to a budget set
by ``beta``), which is what lets models trained on different tasks share a network.

Partial zip: ``stop`` zips only the first ``stop`` groups in input-to-output order
(:func:`group_order`); every later group keeps all N models' units side by side, each model's
units reading the zipped features through their own unmerge, as in the paper's ZipIt!_{k/L}.
With ``stop=0`` the result is the ensemble (logits averaged); with
``merge(..., heads="per-task")`` every model keeps its own head, so a partial zip is a
multi-head model. Renormalise BN models afterwards (``renorm="reset-bn"``), as the paper does,
or REPAIR them (``renorm="repair"``: goals through the zip's merge matrices).

Units that never fire on ``data`` have correlation 0 with every unit, so the greedy zip may
merge two already merged features before it pairs them (even a model with a permuted copy of
itself is then not recovered exactly); observing every module output (``collect=`` with
:func:`~symmerge.stats.collect_statistics` and ``sites="all"``) adds the pre-activations.

Reference: Stoica et al., "ZipIt! Merging Models from Different Tasks without Training",
ICLR 2024, https://arxiv.org/abs/2305.03053
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from symmerge.groupmap import GroupMap
from symmerge.methods import MergeResult, register_method
from symmerge.methods.rebasin import (
    Models,
    _check_equal_widths,
    _default_collect,
    _finish,
    _state_dicts,
)
from symmerge.solvers.coordinate import coordinates, solve_coordinate
from symmerge.solvers.zipit import ZipResult, zip_labels, zip_map
from symmerge.spec import SymmetrySpec

__all__ = ["group_order", "legal_stops", "zipit"]


@register_method(
    "zip",
    paper="Stoica et al., ZipIt!, ICLR 2024",
    url="https://arxiv.org/abs/2305.03053",
    needs_data=True,
    target_width=True,
)
def zipit(
    spec: SymmetrySpec,
    models: Models,
    *,
    data: Iterable[Any] | None = None,
    lam: float = 0.5,
    seed: int = 0,
    alpha: float = 0.5,
    beta: float = 1.0,
    stop: int | None = None,
    width: int | Mapping[str, int] | None = None,
    stats: Any = None,
    collect: Callable[..., Any] | None = None,
    device: str | torch.device | None = None,
) -> MergeResult:
    """ZipIt!: greedy zip of every group's features (within and across models), then average.

    Args:
        data: batches to measure the features on (tensors or ``(inputs, labels)`` tuples).
        lam: must be 0.5: a merged feature is the plain mean of its members.
        alpha: in [0, 1]; a merged feature's correlation to the others becomes
            ``alpha * min`` of its parts' (0: it is never merged again). Paper default 0.5.
        beta: in [0, 1]; each model may spend ``beta * floor(merges / N)`` merges within
            itself (0: only across models, a permutation for two models). Paper default 1.
        stop: number of groups zipped, input to output (:func:`group_order`); later groups
            keep every model's units side by side. Default: all groups. Legal values are
            :func:`legal_stops` (attention heads are zipped with their head dims).
        width: merged width of the zipped groups without blocks: an int for all of them or
            ``{group: int}``, each in ``[n, N * n]`` (default ``n``, model 0's width; ``N * n``
            merges nothing). Blocked groups (GroupNorm groups, heads) keep ``n``.
        stats: precomputed statistics of all the models (skips collecting).
        collect: ``collect(spec, models, batches, groups=..., device=...)`` returning
            statistics; default :func:`symmerge.stats.collect_statistics`.
        device: where statistics are collected.

    Example:
        >>> merged, res = merge([a, b], "zip", data=batches, stop=2)  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    sds = _state_dicts(models)
    _check_equal_widths(sds, "zip")
    n_models = len(sds)
    _check_params(lam, alpha, beta)
    plan = _plan(spec, models, sds, stop=stop, width=width, data=data, stats=stats,
                 collect=collect, device=device)  # fmt: skip
    t_stats = time.perf_counter() - t0
    maps, found = _zip_coords(spec, coordinates(spec, plan.zipped),
                              lambda g: plan.stats.correlation(g), plan.stats, n_models,
                              plan.targets, alpha, beta)  # fmt: skip
    objective = {g: r.objective for g, r in found.items()}
    stop = len(plan.zipped)
    log = [f"zip: {stop} of {len(plan.order)} groups zipped (stop={stop}), alpha={alpha}, "
           f"beta={beta}"]  # fmt: skip
    res = _finish("zip", spec, sds, _complete(spec, maps, n_models), objective, 0, 0.0,
                  time.perf_counter() - t0, log)  # fmt: skip
    res.timings["statistics"] = t_stats
    return res


def _producer_span(spec: SymmetrySpec, keys: Sequence[str], g: str) -> tuple[float, float]:
    """First and last position, in the state dict's key order ``keys``, of the tensors that
    produce group ``g`` (its ``"out"`` members): a residual stream spans its whole stage."""
    pos = {k: i for i, k in enumerate(keys)}
    members = spec.groups[g].members
    out = [m for m in members if m.role == "out"] or members
    found = [pos[t] for m in out for t in (m.tensor, *spec.aliases.get(m.tensor, [])) if t in pos]
    return (min(found), max(found)) if found else (math.inf, -math.inf)


def group_order(spec: SymmetrySpec, keys: Sequence[str]) -> list[str]:
    """The groups from input to output: by the position, in the state dict's key order
    ``keys``, of the first tensor producing the group (its first ``"out"`` member); a head
    group (attention heads) comes just before the head-dim groups it steers."""
    key = {g: _producer_span(spec, keys, g)[0] for g in spec.groups}
    for g, grp in spec.groups.items():
        if grp.block_group:
            key[grp.block_group] = min(key[grp.block_group], key[g])
    index = {g: i for i, g in enumerate(spec.groups)}
    return sorted(spec.groups, key=lambda g: (key[g], index[g]))


def legal_stops(spec: SymmetrySpec, order: Sequence[str], keys: Sequence[str]) -> list[int]:
    """Values of ``stop`` that cut the network at one depth: every tensor producing a zipped
    group comes before every tensor producing a group kept side by side (so a stop never falls
    inside a residual stage, whose stream is produced by every block of the stage), and a
    head group is zipped with its head dims."""
    coord_of = {g: set(c) for c in coordinates(spec) for g in c}
    span = {g: _producer_span(spec, keys, g) for g in order}
    legal = []
    for k in range(len(order) + 1):
        zipped, kept = order[:k], order[k:]
        whole = all(coord_of[g] <= set(zipped) for g in zipped)
        last = max((span[g][1] for g in zipped), default=-math.inf)
        first = min((span[g][0] for g in kept), default=math.inf)
        if whole and last < first:
            legal.append(k)
    return legal


# ---------------------------------------------------------------------------------------


def _check_blocks(spec: SymmetrySpec, models: Models, data: Iterable[Any] | None) -> None:
    """Every model needs model 0's block count in each blocked group (GroupNorm groups,
    attention heads), which equal widths do not show: the other models are traced on a batch
    of 2 of ``model.input_shape`` (else on the first batch of a re-iterable ``data``)."""
    from symmerge.spec import trace
    from symmerge.stats import _first_device, float_dtype, model_inputs, shape_inputs

    blocked = {g: grp.blocks for g, grp in spec.groups.items() if grp.blocks}
    if not blocked or not all(isinstance(m, nn.Module) for m in models):
        return
    for m, model in enumerate(models[1:], 1):
        dev, example = _first_device(model), shape_inputs(model)
        if example is not None:
            args, kwargs = example, {}
        elif data is not None and iter(data) is not data:  # peeking must not consume it
            args, kwargs = model_inputs(next(iter(data)), dev, float_dtype(model))
        else:
            return
        groups = trace(model, args, example_kwargs=kwargs or None).groups
        for g, n in blocked.items():
            got = groups[g].blocks if g in groups else None
            if got != n:
                raise ValueError(
                    f"group {g!r} has {n} blocks (GroupNorm groups or attention heads) in "
                    f"model 0 but {got} in model {m}; the 'zip' method zips blocks pairwise, so "
                    "every model needs the same block counts (GroupNorm num_groups, num_heads)"
                )


def _check_params(lam: float, alpha: float, beta: float) -> None:
    if lam != 0.5:
        raise ValueError(
            "The 'lam' parameter of zip must be 0.5 (a merged feature is the mean of its "
            f"members). Got {lam!r} instead."
        )
    for name, v in (("alpha", alpha), ("beta", beta)):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0
        if not ok:
            raise ValueError(
                f"The '{name}' parameter of zip must be a float in [0, 1]. Got {v!r} instead."
            )


def _widths(
    spec: SymmetrySpec,
    zipped: Sequence[str],
    heads: set[str],
    width: int | Mapping[str, int] | None,
    n_models: int,
    name: str = "zip",
) -> dict[str, int]:
    """Target width of every zipped group (checked against [n, N * n])."""
    if width is None:
        return {}
    if isinstance(width, Mapping):
        unknown = sorted(set(width) - (set(zipped) - heads))
        if unknown:
            raise ValueError(
                f"The 'width' parameter of {name} names groups that are not zipped (or are head "
                f"groups): {unknown}; zipped groups: {[g for g in zipped if g not in heads]}"
            )
        targets = dict(width)
    else:
        targets = {g: width for g in zipped if g not in heads and not spec.groups[g].blocks}
    for g, w in targets.items():
        n = spec.groups[g].size
        if isinstance(w, bool) or not isinstance(w, int) or not n <= w <= n_models * n:
            raise ValueError(
                f"The 'width' parameter of {name} must be an int in [{n}, {n_models * n}] for "
                f"group {g!r} (n={n}, N={n_models}). Got {w!r} instead."
            )
    return targets


def _head_pairing(
    spec: SymmetrySpec, coord: tuple[str, ...], stats: Any, n_models: int
) -> list[torch.Tensor]:
    """Every model's heads paired with model 0's: the shared blocked assignment of activation
    matching on the head-dim groups' cross correlations."""
    head = coord[0]
    corr = {g: stats.correlation(g) for g in coord[1:]}
    pairing = [torch.arange(spec.groups[head].size)]
    for m in range(1, n_models):
        sims = {g: c[stats.units(g, 0), stats.units(g, m)] for g, c in corr.items()}
        pairing.append(solve_coordinate(spec, coord, sims)[head])
    return pairing


# ---------------------------------------------------------------------------------------
# shared with MuDSC's zip variant (symmerge.methods.mudsc)
# ---------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What a zip does: the groups in order, those zipped, head groups, target widths and the
    statistics (``None`` when nothing is zipped)."""

    order: list[str]
    zipped: list[str]
    heads: set[str]
    targets: dict[str, int]
    stats: Any


def _plan(
    spec: SymmetrySpec,
    models: Models,
    sds: Sequence[Mapping[str, torch.Tensor]],
    *,
    stop: int | None,
    width: int | Mapping[str, int] | None,
    data: Iterable[Any] | None,
    stats: Any,
    collect: Callable[..., Any] | None,
    device: str | torch.device | None,
    name: str = "zip",
) -> _Plan:
    """Check ``stop``, ``width`` and the models' block counts, and collect the statistics of
    the zipped groups."""
    _check_blocks(spec, models, data)
    n_models = len(sds)
    order = group_order(spec, list(sds[0]))
    stops = legal_stops(spec, order, list(sds[0]))
    stop = len(order) if stop is None else stop
    if isinstance(stop, bool) or stop not in stops:
        raise ValueError(
            f"The 'stop' parameter of {name} must be one of {stops} (the number of groups "
            f"zipped, in the order {order}). Got {stop!r} instead."
        )
    zipped = order[:stop]
    heads = {g.block_group for g in spec.groups.values() if g.block_group}
    targets = _widths(spec, zipped, heads, width, n_models, name)
    if zipped and stats is None:
        if data is None:
            raise ValueError(f"the '{name}' method needs data= (batches) or stats=")
        if not all(isinstance(m, nn.Module) for m in models):
            raise ValueError(
                f"the '{name}' method runs the models on data: pass nn.Modules, not state "
                "dicts (or pass precomputed stats=)"
            )
        observed = [g for g in zipped if g not in heads]
        stats = (collect or _default_collect())(spec, list(models), data, groups=observed,
                                                device=device)  # fmt: skip
    return _Plan(order, zipped, heads, targets, stats)


def _zip_coords(
    spec: SymmetrySpec,
    coords: Sequence[tuple[str, ...]],
    sim: Callable[[str], torch.Tensor],
    stats: Any,
    n_models: int,
    targets: Mapping[str, int],
    alpha: float,
    beta: float,
) -> tuple[dict[str, GroupMap], dict[str, ZipResult]]:
    """Zip every coordinate on ``sim(group)`` ((N n)^2); a head group is a permutation,
    paired on the activations of its head dims (:func:`_head_pairing`)."""
    weights = [1.0 / n_models] * n_models
    maps: dict[str, GroupMap] = {}
    found: dict[str, ZipResult] = {}
    for coord in coords:
        pairing = None
        if len(coord) > 1:  # attention: one head pairing shared by the head-dim groups
            pairing = _head_pairing(spec, coord, stats, n_models)
            maps[coord[0]] = GroupMap.permutations(pairing, weights)
            coord = coord[1:]
        for g in coord:
            grp = spec.groups[g]
            found[g] = zip_labels(
                sim(g), [grp.size] * n_models, targets.get(g), alpha=alpha, beta=beta,
                blocks=grp.blocks, block_pairing=pairing,
            )  # fmt: skip
            maps[g] = zip_map(found[g].labels, [grp.size] * n_models, weights)
    return maps, found


def _complete(
    spec: SymmetrySpec, maps: Mapping[str, GroupMap], n_models: int
) -> dict[str, GroupMap]:
    """``maps`` with every other group side by side, in the spec's group order."""
    weights = [1.0 / n_models] * n_models
    out = dict(maps)
    for g, grp in spec.groups.items():
        if g not in out:  # as the ensemble: GroupNorm groups keep one model per block
            own = grp.blocks if grp.blocks and grp.block_group is None else None
            blocks = None if own is None else [own] * n_models
            out[g] = GroupMap.side_by_side([grp.size] * n_models, weights, blocks=blocks)
    return {g: out[g] for g in spec.groups}
