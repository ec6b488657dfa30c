"""MuDSC: merging under dual-space constraints (permute and zip variants, alpha search).

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

Zip variant (MuDSC-Zip, ``variant="zip"``): the units of both models are concatenated
(``T = 2n``) and zipped greedily (:func:`~symmerge.solvers.zipit.greedy_zip`, with
``zip_alpha``, ``beta``, ``stop`` and ``width`` as in the ``zip`` method) on

    C_g = alpha * C_w,g(maps) + (1 - alpha) * C_act,g          (T x T)

``C_act`` is the activation correlation the ``zip`` method zips on. ``C_w`` is the Pearson
correlation (across vector entries) of the T units' weight vectors: unit u of model m
concatenates every tensor of its group (running statistics left out) with the group's axis in
front and every other group axis read in the neighbour's current merged units, as the authors'
code does: an input (contracted) axis through ``M_m`` (a merged unit is the mean of its
members), an output axis through ``U_m^T`` (the sum of model m's members). The start is the
``zip`` method's result (every group zipped on ``C_act``; the first sweep reads the neighbours
there); then sweeps in a seeded random order re-zip each group on ``C_g``, a sweep is scored
by the mean over groups of its mean merge value (each taken when its group was zipped), the
best sweep is restored after one that does not beat it and the search stops after
``patience`` of those, or when a sweep changes no cluster. ``alpha=0`` runs no sweep: it is
exactly the ``zip`` method.

``alpha="auto"`` runs every alpha of :data:`ALPHA_GRID` (the paper's {0.1, ..., 0.9}) on the
same statistics and keeps the merged model with the best accuracy on held-out *training*
batches (``select_data=``, or the last quarter of ``data``, at least one batch, which is then
not used for statistics; never test data). Accuracy is the argmax over the whole output
against the labels: for models trained on different class subsets the shared head indexes
the union of their labels, so this is the joint accuracy (``heads="per-task"`` of
:func:`~symmerge.merging.merge` is not used while selecting). A BatchNorm model is reset on
the statistics batches before it is scored. Ties go to the smaller alpha. The result records
``objective["auto/alpha"]``, ``objective["auto/accuracy@A"]`` for every A, and a log line.

.. warning::
    Zip-variant departures from the authors' code: tensors that reach a group left unzipped
    (``stop``) are left out of ``C_w`` (in merged units they keep the models apart, which would
    favour merges within a model); attention heads are paired on activations alone (the
    ``zip`` method's pairing) and only their head dims are re-zipped on ``C_g``; the variant
    always starts from the activation zip, so it needs data even at ``alpha=1`` (the paper's
    weight-only zip); a sweep that changes no cluster ends the search.

Reference: Xu, Yuan, Wang, Wang, Song, Song, "Training-Free Pretrained Model Merging", CVPR 2024
(MuDSC), https://arxiv.org/abs/2403.01753
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
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
from symmerge.methods.zipit import _complete, _plan, _zip_coords
from symmerge.similarity import DEFAULT_IGNORE, mix
from symmerge.solvers.coordinate import Perms, coordinates, solve_coordinate, weight_matching
from symmerge.spec import Member, Segment, SymmetrySpec

__all__ = ["ALPHA_GRID", "VARIANTS", "mudsc"]

#: The matchers Psi: "permute" (one LAP per group, MuDSC-Align) and "zip" (ZipIt!'s greedy zip
#: on the concatenated similarity, merging within a model too, MuDSC-Zip).
VARIANTS = ("permute", "zip")

#: The alphas ``alpha="auto"`` tries (the paper's grid).
ALPHA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@register_method(
    "mudsc",
    paper="Xu et al., MuDSC, CVPR 2024",
    url="https://arxiv.org/abs/2403.01753",
    needs_data=True,
    max_models=2,
    target_width=True,
)
def mudsc(
    spec: SymmetrySpec,
    models: Models,
    *,
    data: Iterable[Any] | None = None,
    lam: float = 0.5,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    alpha: float | str = 0.5,
    variant: str = "permute",
    zip_alpha: float = 0.5,
    beta: float = 1.0,
    stop: int | None = None,
    width: int | Mapping[str, int] | None = None,
    select_data: Iterable[Any] | None = None,
    max_sweeps: int = 100,
    patience: int | None = 5,
    stats: Any = None,
    collect: Callable[..., Any] | None = None,
    device: str | torch.device | None = None,
    backend: str = "scipy",
) -> MergeResult:
    """MuDSC: align model 1 to model 0 on a mix of weight and activation correlations, by
    coordinate descent started from activation matching, then average (or, ``variant="zip"``,
    zip both models' features on that mix).

    Args:
        data: batches to run the models on (tensors or ``(inputs, labels)`` tuples; labelled
            for ``alpha="auto"``).
        lam, weights: model weights of the permute variant (the zip variant averages: lam 0.5).
        alpha: share of the weight space, ``C = alpha C_w + (1 - alpha) C_act``, in [0, 1], or
            ``"auto"``: the best of :data:`ALPHA_GRID` by the merged model's accuracy on
            held-out training batches (module docstring). The paper picks it that way; 0.5 is
            the middle of the grid.
        variant: the matcher, ``"permute"`` (one LAP per group, MuDSC-Align) or ``"zip"``
            (greedy zip of the concatenated units, MuDSC-Zip).
        zip_alpha, beta, stop, width: the zip variant's zip (the ``zip`` method's ``alpha``,
            ``beta``, ``stop`` and ``width``; paper defaults 0.5 and 1).
        select_data: labelled ``(inputs, labels)`` training batches that pick ``alpha="auto"``
            (default: the last quarter of ``data``).
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
    _check_params(alpha, variant, max_sweeps, patience, zip_alpha, beta)
    if variant == "permute" and (stop is not None or width is not None):
        raise ValueError("stop= and width= apply to mudsc's zip variant (variant='zip')")
    if variant == "zip" and (lam != 0.5 or weights is not None):
        raise ValueError(
            "The 'lam' parameter of mudsc must be 0.5 with variant='zip' (a merged feature is "
            f"the mean of its members), and weights= unset. Got lam={lam!r}, weights={weights!r}."
        )
    if select_data is not None and alpha != "auto":
        raise ValueError("select_data= picks alpha='auto'; pass a fixed alpha without it")
    t0 = time.perf_counter()
    sds = _state_dicts(models)
    if len(sds) != 2:
        raise ValueError(f"the 'mudsc' method merges 2 models, got {len(sds)}")
    _check_equal_widths(sds, "mudsc")
    w = _model_weights(2, lam, weights, "mudsc")
    if alpha == "auto":
        kw = dict(lam=lam, seed=seed, weights=weights, variant=variant, zip_alpha=zip_alpha,
                  beta=beta, stop=stop, width=width, max_sweeps=max_sweeps, patience=patience,
                  collect=collect, device=device, backend=backend)  # fmt: skip
        return _auto(spec, models, data, select_data, stats, kw)
    alpha = float(alpha)
    if variant == "zip":
        return _zip_variant(
            spec, models, sds, data=data, seed=seed, alpha=alpha, zip_alpha=zip_alpha, beta=beta,
            stop=stop, width=width, max_sweeps=max_sweeps, patience=patience, stats=stats,
            collect=collect, device=device,
        )  # fmt: skip
    act: dict[str, torch.Tensor] | None = None
    start: Perms | None = None  # alpha 1: weight matching's own start
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


def _check_params(
    alpha: Any, variant: Any, max_sweeps: Any, patience: Any, zip_alpha: Any, beta: Any
) -> None:
    """One message shape for every bad parameter (sklearn's)."""
    for name, v, auto in (("alpha", alpha, True), ("zip_alpha", zip_alpha, False),
                          ("beta", beta, False)):  # fmt: skip
        if auto and isinstance(v, str) and v == "auto":
            continue
        real = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not (real and math.isfinite(v) and 0.0 <= v <= 1.0):
            also = " or 'auto'" if auto else ""
            raise ValueError(
                f"The {name!r} parameter of mudsc must be a float in [0, 1]{also}. Got {v!r} "
                "instead."
            )
    if variant not in VARIANTS:
        raise ValueError(
            f"The 'variant' parameter of mudsc must be one of {VARIANTS}. Got {variant!r} instead."
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


# ---------------------------------------------------------------------------------------
# the zip variant
# ---------------------------------------------------------------------------------------


def _zip_variant(
    spec: SymmetrySpec,
    models: Models,
    sds: list[dict[str, torch.Tensor]],
    *,
    data: Iterable[Any] | None,
    seed: int,
    alpha: float,
    zip_alpha: float,
    beta: float,
    stop: int | None,
    width: int | Mapping[str, int] | None,
    max_sweeps: int,
    patience: int | None,
    stats: Any,
    collect: Callable[..., Any] | None,
    device: str | torch.device | None,
) -> MergeResult:
    """MuDSC-Zip (module docstring): the ``zip`` method's activation zip, then sweeps that
    re-zip every group on ``alpha C_w + (1 - alpha) C_act``."""
    t0 = time.perf_counter()
    plan = _plan(spec, models, sds, stop=stop, width=width, data=data, stats=stats,
                 collect=collect, device=device, name="mudsc")  # fmt: skip
    t_stats = time.perf_counter() - t0
    coords = coordinates(spec, plan.zipped)
    act = {g: plan.stats.correlation(g) for c in coords for g in c if g not in plan.heads}

    def zip_on(cs: Sequence[tuple[str, ...]], sim: Callable[[str], torch.Tensor]) -> Any:
        return _zip_coords(spec, cs, sim, plan.stats, 2, plan.targets, zip_alpha, beta)

    layouts: dict[str, dict[int, Member]] = {}
    for mem in spec.members():
        layouts.setdefault(mem.tensor, {})[mem.axis] = mem

    def mixed(g: str, maps: Mapping[str, GroupMap]) -> torch.Tensor:
        return mix(alpha, _weight_corr(spec, layouts, sds, g, maps), act[g])

    maps, found = zip_on(coords, act.__getitem__)
    log = [f"mudsc zip: {len(plan.zipped)} of {len(plan.order)} groups zipped, alpha={alpha}, "
           f"zip_alpha={zip_alpha}, beta={beta}"]  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    best: tuple[float, dict, dict] | None = None
    strikes = sweeps = 0
    for sweep in range(1, max_sweeps + 1 if alpha > 0 and coords else 1):
        changed = 0
        for i in torch.randperm(len(coords), generator=gen).tolist():
            new_maps, new_found = zip_on([coords[i]], functools.partial(mixed, maps=maps))
            changed += sum(not torch.equal(r.labels, found[g].labels) for g, r in new_found.items())
            maps.update(new_maps)
            found.update(new_found)
        sweeps, score = sweep, sum(r.objective for r in found.values()) / len(found)
        log.append(f"sweep {sweep}: {changed} groups changed, mean merge value {score:.6g}")
        if not changed:  # a fixed point: every later sweep would repeat it
            break
        if patience is not None:
            if best is None or score > best[0]:  # the first sweep is always kept (the code's)
                best, strikes = (score, dict(maps), dict(found)), 0
            else:
                strikes += 1
                maps, found = dict(best[1]), dict(best[2])
                log.append(f"sweep {sweep}: {score:.6g} <= best {best[0]:.6g}, restored")
                if strikes >= patience:
                    break
    objective = {g: r.objective for g, r in found.items()}
    out = _finish("mudsc", spec, sds, _complete(spec, maps, 2), objective, sweeps, 0.0,
                  time.perf_counter() - t0, log)  # fmt: skip
    out.timings["statistics"] = t_stats
    return out


def _weight_corr(
    spec: SymmetrySpec,
    layouts: Mapping[str, Mapping[int, Member]],
    sds: Sequence[Mapping[str, torch.Tensor]],
    group: str,
    maps: Mapping[str, GroupMap],
) -> torch.Tensor:
    """``C_w`` ((N n)^2, float64): Pearson correlation across entries of every model's unit
    vectors of ``group`` (:func:`_unit_vectors`), stacked model-major; 0 for constant ones."""
    z = torch.cat([_unit_vectors(spec, layouts, sd, m, group, maps) for m, sd in enumerate(sds)])
    if z.shape[1] == 0:
        return torch.zeros(z.shape[0], z.shape[0], dtype=torch.float64)
    z = z - z.mean(1, keepdim=True)
    norm = z.norm(dim=1)
    return ((z @ z.T) / torch.outer(norm, norm).clamp_min(1e-12)).clamp_(-1.0, 1.0)


def _unit_vectors(
    spec: SymmetrySpec,
    layouts: Mapping[str, Mapping[int, Member]],
    sd: Mapping[str, torch.Tensor],
    m: int,
    group: str,
    maps: Mapping[str, GroupMap],
) -> torch.Tensor:
    """Model m's unit vectors of ``group`` ``(n, L)``: every member tensor (running statistics
    left out) with every other group axis in merged units (input axes ``M_m``, output axes
    ``U_m^T``), ``group``'s factor in front; tensors that reach a group without a map in
    ``maps`` (one left unzipped) are left out."""
    parts = []
    for mem in spec.groups[group].members:
        x = sd[mem.tensor]
        if mem.tensor.endswith(DEFAULT_IGNORE) or not x.is_floating_point():
            continue
        others = [o for a, o in layouts[mem.tensor].items() if a != mem.axis]
        reached = {f.group for o in others for s in o.segments for f in s.factors}
        if not reached - {None, group} <= set(maps):
            continue
        x = x.detach().to("cpu", torch.float64)
        for o in others:
            x = _in_merged_units(x, o, maps, m, group)
        for seg in mem.segments:
            for k, f in enumerate(seg.factors):
                if f.group == group:
                    piece = torch.movedim(_factored(x, mem.axis, seg), mem.axis + k, 0)
                    parts.append(piece.reshape(piece.shape[0], -1))
    if not parts:
        return torch.zeros(spec.groups[group].size, 0, dtype=torch.float64)
    return torch.cat(parts, 1)


def _factored(x: torch.Tensor, axis: int, seg: Segment) -> torch.Tensor:
    """``seg``'s part of ``x``'s ``axis``, that axis split into the segment's factors."""
    piece = x.narrow(axis, seg.offset, seg.size)
    shape = list(piece.shape)
    return piece.reshape(shape[:axis] + [f.size for f in seg.factors] + shape[axis + 1 :])


def _in_merged_units(
    x: torch.Tensor, mem: Member, maps: Mapping[str, GroupMap], m: int, skip: str
) -> torch.Tensor:
    """``x`` with every group factor of axis ``mem.axis`` (but ``skip``) read in merged
    units: ``M_m`` on an input (contracted) axis, ``U_m^T`` on any other."""
    ax, parts = mem.axis, []
    for seg in mem.segments:
        piece = _factored(x, ax, seg)
        for k, f in enumerate(seg.factors):
            gm = maps.get(f.group) if f.group not in (None, skip) else None
            if gm is not None:
                read = gm.merge if mem.role == "in" else gm.unmerge
                piece = read(m, piece, ax + k)
        parts.append(
            piece.reshape(
                list(piece.shape[:ax]) + [-1] + list(piece.shape[ax + len(seg.factors) :])
            )
        )
    return torch.cat(parts, ax)


# ---------------------------------------------------------------------------------------
# alpha="auto"
# ---------------------------------------------------------------------------------------


def _auto(
    spec: SymmetrySpec,
    models: Models,
    data: Iterable[Any] | None,
    select_data: Iterable[Any] | None,
    stats: Any,
    kw: dict[str, Any],
) -> MergeResult:
    """Every alpha of :data:`ALPHA_GRID` on the same statistics; the merged model with the
    best held-out training accuracy wins (the first on ties)."""
    from symmerge.merging import build_model, has_bn_statistics
    from symmerge.renorm import reset_bn

    t0 = time.perf_counter()
    if not all(isinstance(m, nn.Module) for m in models):
        raise ValueError("alpha='auto' scores merged models: pass nn.Modules, not state dicts")
    if select_data is not None:
        held, fit = list(select_data), None if data is None else list(data)
    elif data is None:
        raise ValueError(
            "alpha='auto' needs labelled training batches to pick alpha: pass data= (its last "
            "quarter is held out) or select_data="
        )
    else:
        fit = list(data)
        if len(fit) < 2:
            raise ValueError(
                "alpha='auto' holds out the last quarter of data=, which has "
                f"{len(fit)} batch(es); pass more batches or select_data="
            )
        fit, held = fit[: -max(1, len(fit) // 4)], fit[-max(1, len(fit) // 4) :]
    for b in held:
        if not (isinstance(b, (tuple, list)) and len(b) >= 2 and torch.is_tensor(b[1])):
            raise ValueError(
                "alpha='auto' picks alpha by accuracy: its batches must be labelled "
                f"(inputs, labels) tuples, got {type(b).__name__}"
            )
    if stats is None:
        stats = _collect(spec, models, fit, kw["collect"], kw["device"])
    accuracy: dict[float, float] = {}
    runs: dict[float, MergeResult] = {}
    for a in ALPHA_GRID:
        runs[a] = mudsc(spec, models, stats=stats, alpha=a, **kw)
        model = build_model(models[0], spec, runs[a].maps, runs[a].state_dict,
                            example_inputs=held[0][0][:2])  # fmt: skip
        if has_bn_statistics(model):
            reset_bn(model, fit or held)
        accuracy[a] = _accuracy(model.eval(), held)
    best = max(ALPHA_GRID, key=accuracy.__getitem__)
    out = runs[best]
    n = sum(len(b[1]) for b in held)
    scores = ", ".join(f"{a:g}: {v:.4f}" for a, v in accuracy.items())
    out.log.insert(0, f"alpha=auto: chosen {best:g}; accuracy on {n} held-out training samples "
                      f"{scores}")  # fmt: skip
    out.objective["auto/alpha"] = best
    out.objective.update({f"auto/accuracy@{a:g}": v for a, v in accuracy.items()})
    out.timings["select"] = time.perf_counter() - t0
    out.other_seconds = out.timings["select"] - out.lap_seconds
    return out


def _accuracy(model: nn.Module, batches: Sequence[Any]) -> float:
    """Share of samples whose argmax over the whole output is the label."""
    dev = next(model.parameters()).device
    correct = total = 0
    with torch.no_grad():
        for b in batches:
            pred = model(b[0].to(dev)).argmax(-1).cpu()
            correct += int((pred == b[1].cpu()).sum())
            total += b[1].numel()
    return correct / max(total, 1)
