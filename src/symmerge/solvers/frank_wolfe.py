"""Frank-Wolfe universe matching of N models (C2M3), cycle-consistent by construction.

Every model i and group g get a map ``P_i^g`` (model units x universe units) and the objective
is weight matching summed over all model pairs, written in the universe:

    F(P) = sum_{i<j} sum_w <U_i(w), U_j(w)> = 1/2 (||sum_i U_i||^2 - sum_i ||U_i||^2)

where ``U_i(w)`` is tensor w of model i with ``P_i^T`` applied along every group axis (the
paper's pairwise form ``<W_i, P_i P_j^T W_j ...>`` is the same number by the cyclic trace).
The P are relaxed to doubly stochastic matrices and F is maximized by Frank-Wolfe: the
gradient of every map, a LAP per map as the linear oracle, and one exact line search shared
by all maps. F restricted to the segment ``(1 - t) P + t Pi`` is a polynomial in t whose
coefficients come from Bernstein-grouped partial products, so the search is exact and the
next iterate's universe tensors are a linear combination of tensors already computed: an
iteration costs about ``2k`` products per tensor with k group axes (gradient and line search
together), O(N) in the number of models rather than O(N^2) pairs.

Reference: Crisostomi et al., "C2M3: Cycle-Consistent Multi-Model Merging", NeurIPS 2024,
arXiv:2405.17897.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from symmerge.similarity import DEFAULT_IGNORE
from symmerge.solvers.coordinate import (
    MatchResult,
    coordinates,
    relative_to_first,
    solve_coordinate,
    weight_matching,
)
from symmerge.spec import Member, SymmetrySpec

__all__ = ["INITS", "frank_wolfe_matching", "universe_objective"]

INITS = ("weight", "sinkhorn", "identity")
Perms = dict[str, torch.Tensor]


@dataclass
class _Piece:
    """One block of one tensor (a choice of segment on every axis), reshaped so that every
    group factor is a dimension of its own; ``factors`` are ``(dim, group)`` in the order
    the maps are applied."""

    key: str
    narrow: tuple[tuple[int, int, int], ...]  # (axis, offset, size)
    shape: tuple[int, ...]
    factors: tuple[tuple[int, str], ...]

    def view(self, w: torch.Tensor) -> torch.Tensor:
        for axis, offset, size in self.narrow:
            w = w.narrow(axis, offset, size)
        return w.reshape(self.shape)


def _pieces(
    spec: SymmetrySpec, state: Mapping[str, torch.Tensor], ignore: Sequence[str]
) -> list[_Piece]:
    by_tensor: dict[str, dict[int, Member]] = {}
    for mem in spec.members():
        by_tensor.setdefault(mem.tensor, {})[mem.axis] = mem
    out = []
    for key, axes in by_tensor.items():
        w = state.get(key)
        if w is None or not w.is_floating_point() or key.endswith(tuple(ignore)):
            continue
        choices = []  # per axis: list of (offset, size, factors or None)
        for axis, size in enumerate(w.shape):
            mem = axes.get(axis)
            if mem is None:
                choices.append([(0, size, None)])
            else:
                choices.append([(s.offset, s.size, s.factors) for s in mem.segments])
        for combo in itertools.product(*choices):
            narrow, shape, factors = [], [], []
            for axis, (offset, size, facs) in enumerate(combo):
                if size != w.shape[axis]:
                    narrow.append((axis, offset, size))
                if facs is None:
                    shape.append(size)
                    continue
                for f in facs:
                    if f.group is not None:
                        factors.append((len(shape), f.group))
                    shape.append(f.size)
            if factors:
                out.append(_Piece(key, tuple(narrow), tuple(shape), tuple(factors)))
    return out


# ---- products along one dimension -------------------------------------------------------


def _to_universe(x: torch.Tensor, p: torch.Tensor, dim: int) -> torch.Tensor:
    """``P^T`` along ``dim``: model units -> universe units (``p``: model x universe)."""
    return torch.movedim(torch.tensordot(x, p, dims=([dim], [0])), -1, dim)


def _to_model(x: torch.Tensor, p: torch.Tensor, dim: int) -> torch.Tensor:
    """``P`` along ``dim``: universe units -> model units (the adjoint of :func:`_to_universe`)."""
    return torch.movedim(torch.tensordot(x, p, dims=([dim], [1])), -1, dim)


def _gather(x: torch.Tensor, perm: torch.Tensor, dim: int) -> torch.Tensor:
    """A hard map as an index: universe unit u is model unit ``perm[u]``."""
    return x.index_select(dim, perm)


def _contract(x: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    """``sum over all other dims of x[.., a, ..] y[.., u, ..]`` -> (a, u)."""
    xf = torch.movedim(x, dim, 0).reshape(x.shape[dim], -1)
    yf = torch.movedim(y, dim, 0).reshape(y.shape[dim], -1)
    return xf @ yf.T


def _dot(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.dot(x.reshape(-1), y.reshape(-1)))


# ---- initial maps -------------------------------------------------------------------------


def _sinkhorn(x: torch.Tensor, tol: float = 1e-8, max_iter: int = 1000) -> torch.Tensor:
    for _ in range(max_iter):
        x = x / x.sum(1, keepdim=True)
        x = x / x.sum(0, keepdim=True)
        if float((x.sum(1) - 1).abs().max()) < tol:
            break
    return x


def _initial_maps(
    spec: SymmetrySpec,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    groups: Sequence[str],
    init: str,
    seed: int,
    backend: str,
    ignore: Sequence[str],
    pool: ThreadPoolExecutor,
) -> tuple[list[dict[str, torch.Tensor]], list[Perms] | None]:
    """Initial soft maps (float64, CPU), and the hard permutations they are when they are."""
    gen = torch.Generator().manual_seed(seed)
    if init == "sinkhorn":
        maps = []
        for _ in state_dicts:
            mp = {}
            for g in groups:
                n = spec.groups[g].size
                noise = torch.rand(n, n, generator=gen, dtype=torch.float64) * (0.01 / n)
                mp[g] = _sinkhorn(torch.full((n, n), 1.0 / n, dtype=torch.float64) + noise)
            maps.append(mp)
        return maps, None
    if init == "identity":
        perms = [spec.identity_permutations() for _ in state_dicts]
    else:
        # independent matchings: their LAPs (no GIL) overlap the others' products
        perms = [spec.identity_permutations()] + list(
            pool.map(
                lambda k: weight_matching(
                    spec, state_dicts[0], state_dicts[k], seed=seed + k, backend=backend,
                    ignore=ignore,
                ).perms,
                range(1, len(state_dicts)),
            )
        )  # fmt: skip
    return [{g: _one_hot(p[g]) for g in groups} for p in perms], perms


def _one_hot(perm: torch.Tensor) -> torch.Tensor:
    """The matrix of a universe -> model permutation: ``P[perm[u], u] = 1``."""
    n = perm.numel()
    out = torch.zeros(n, n, dtype=torch.float64)
    out[perm.cpu(), torch.arange(n)] = 1.0
    return out


# ---- the line search polynomial ------------------------------------------------------------


def _bernstein(k: int, m: int) -> np.polynomial.Polynomial:
    """``(1 - t)^(k - m) t^m``."""
    P = np.polynomial.Polynomial
    return P([1.0, -1.0]) ** (k - m) * P([0.0, 1.0]) ** m


def _maximize_on_unit_interval(poly: np.polynomial.Polynomial) -> float:
    candidates = [0.0, 1.0]
    for r in poly.deriv().roots():
        if abs(r.imag) < 1e-12 and 0.0 < r.real < 1.0:
            candidates.append(float(r.real))
    return max(candidates, key=lambda t: float(poly(t)))


# ---- the solver ------------------------------------------------------------------------------


def frank_wolfe_matching(
    spec: SymmetrySpec,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    *,
    max_iter: int = 200,
    tol: float = 1e-4,
    patience: int = 5,
    init: str = "weight",
    seed: int = 0,
    backend: str = "scipy",
    ignore: Sequence[str] = DEFAULT_IGNORE,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int, float, float], None] | None = None,
) -> MatchResult:
    """Maps of N models to one universe maximizing summed pairwise weight matching (C2M3).

    Args:
        spec: symmetry of the (common) architecture.
        state_dicts: the N >= 2 models' weights.
        max_iter: Frank-Wolfe iterations at most (the paper's merger: 200).
        tol, patience: stop when F grew by less than ``tol * |F|`` in ``patience`` consecutive
            iterations, or when the line search stays at t = 0 (a stationary point). The
            paper stops on an absolute gain below 1e-6; the relative default stops sooner
            (the report's n-models settings run it beside the paper's own code).
        init: ``"weight"`` (default: every model weight-matched to model 0, so the search
            starts from the pairwise-to-reference solution and can only improve on it),
            ``"sinkhorn"`` (the paper's merger: the barycenter plus U(0, 0.01/n) noise, made
            doubly stochastic) or ``"identity"`` (every model in its own order). The best
            hard solution seen (the init, when it is hard, or the rounded end point) is kept.
        seed: seeds the init (the noise of ``sinkhorn``, the group order of ``weight``).
        backend: LAP backend (:func:`symmerge.solvers.lap.solve_lap`).
        ignore: tensor-name suffixes left out of F (running statistics by default).
        device: where the products run (default: CUDA when available, else the CPU); the LAPs
            always run on the CPU.
        dtype: arithmetic dtype of the products.
        progress: called as ``progress(iteration, F, t)`` after every iteration.

    Returns:
        A :class:`MatchResult` with ``model_perms[i][g]`` the universe -> model i permutation in
        the :meth:`SymmetrySpec.permute_state_dict` convention (so permuting model i by it maps
        it into the universe), re-expressed in model 0's unit order (model 0 gets the identity;
        pairwise maps between models do not change). ``objective["universe"]`` is F at the
        rounded permutations, ``timings`` splits the time into gradient, lap, line_search and
        setup.

    Reference: Crisostomi et al., "C2M3", NeurIPS 2024, arXiv:2405.17897.
    """
    t_start = time.perf_counter()
    n_models = len(state_dicts)
    if n_models < 2:
        raise ValueError(f"frank_wolfe_matching needs at least 2 models, got {n_models}")
    if init not in INITS:
        raise ValueError(
            f"The 'init' parameter of frank_wolfe_matching must be one of {INITS}. "
            f"Got {init!r} instead."
        )
    if max_iter < 0 or patience < 1:
        raise ValueError("max_iter must be >= 0 and patience >= 1")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pieces = _pieces(spec, state_dicts[0], ignore)
    soft_groups = sorted({g for pc in pieces for _, g in pc.factors})
    coords = coordinates(spec)
    workers = max(1, min(os.cpu_count() or 1, torch.get_num_threads()))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # the LAPs of the oracle (and the weight-matching start) are independent and scipy
        # releases the GIL, so they run side by side
        maps, start = _initial_maps(
            spec, state_dicts, soft_groups, init, seed, backend, ignore, pool
        )
        return _frank_wolfe(
            spec, state_dicts, maps, start, pieces, soft_groups, coords, pool,
            max_iter=max_iter, tol=tol, patience=patience, backend=backend, ignore=ignore,
            device=dev, dtype=dtype, progress=progress, t_start=t_start,
        )  # fmt: skip


def _frank_wolfe(
    spec: SymmetrySpec,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    maps: list[dict[str, torch.Tensor]],
    start: list[Perms] | None,
    pieces: list[_Piece],
    soft_groups: list[str],
    coords: Sequence[Sequence[str]],
    pool: ThreadPoolExecutor,
    *,
    max_iter: int,
    tol: float,
    patience: int,
    backend: str,
    ignore: Sequence[str],
    device: torch.device,
    dtype: torch.dtype,
    progress: Callable[[int, float, float], None] | None,
    t_start: float,
) -> MatchResult:
    dev, n_models = device, len(state_dicts)
    maps = [{g: p.to(dev, dtype) for g, p in mp.items()} for mp in maps]
    weights = [[pc.view(sd[pc.key]).to(dev, dtype).contiguous() for pc in pieces]
               for sd in state_dicts]  # fmt: skip
    # prefixes[i][p][j]: piece p of model i with its first j maps applied
    prefixes = [[_apply_all(w, pc, mp) for w, pc in zip(ws, pieces, strict=True)]
                for ws, mp in zip(weights, maps, strict=True)]  # fmt: skip
    res = MatchResult({})
    timings = {"setup": time.perf_counter() - t_start, "gradient": 0.0, "lap": 0.0,
               "line_search": 0.0}  # fmt: skip
    value = _objective(prefixes, pieces)
    stalled = 0
    for it in range(1, max_iter + 1):
        t0 = time.perf_counter()
        grads = _gradients(prefixes, pieces, maps, soft_groups)
        t1 = time.perf_counter()
        vertices = _round_all(spec, coords, grads, backend, pool, oracle=True)
        t2 = time.perf_counter()
        step, new_value, nodes = _line_search(prefixes, pieces, maps, vertices)
        if step > 0.0:
            _move(prefixes, maps, vertices, nodes, step)
        t3 = time.perf_counter()
        timings["gradient"] += t1 - t0
        timings["lap"] += t2 - t1
        timings["line_search"] += t3 - t2
        gain, value = new_value - value, max(value, new_value)
        res.iterations = it
        res.log.append(f"iteration {it}: F = {value:.6g}, step {step:.4g}")
        if progress is not None:
            progress(it, value, step)
        stalled = stalled + 1 if gain <= tol * max(1.0, abs(value)) else 0
        if step == 0.0 or stalled >= patience:
            res.converged = True
            break
    t0 = time.perf_counter()
    perms = _round_all(spec, coords, maps, backend, pool)
    timings["lap"] += time.perf_counter() - t0
    final = universe_objective(spec, state_dicts, perms, ignore=ignore)
    if start is not None:
        first = universe_objective(spec, state_dicts, start, ignore=ignore)
        if first > final:
            res.log.append(f"rounded end point F = {final:.6g} < init {first:.6g}: kept the init")
            perms, final = start, first
    res.objective = {"universe": final}
    res.model_perms = relative_to_first(perms)
    res.perms = res.model_perms[1] if n_models == 2 else {}
    res.lap_seconds = timings["lap"]
    res.other_seconds = time.perf_counter() - t_start - res.lap_seconds
    res.timings = timings
    return res


def _apply_all(w: torch.Tensor, pc: _Piece, maps: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    out = [w]
    for dim, g in pc.factors:
        out.append(_to_universe(out[-1], maps[g], dim))
    return out


def _pair_sum(us: Sequence[torch.Tensor]) -> float:
    """``sum_{i<j} <u_i, u_j> = (||sum_i u_i||^2 - sum_i ||u_i||^2) / 2``: one piece's share
    of F."""
    s = torch.stack(list(us)).sum(0)
    return 0.5 * (_dot(s, s) - sum(_dot(u, u) for u in us))


def _objective(prefixes: list[list[list[torch.Tensor]]], pieces: list[_Piece]) -> float:
    return float(sum(_pair_sum([pre[p][-1] for pre in prefixes]) for p in range(len(pieces))))


def _gradients(
    prefixes: list[list[list[torch.Tensor]]],
    pieces: list[_Piece],
    maps: list[dict[str, torch.Tensor]],
    groups: Sequence[str],
) -> list[dict[str, torch.Tensor]]:
    """dF/dP_i^g (model x universe) for every model and group: F's gradient with respect to
    U_i is ``S - U_i`` (S the sum over models), pulled back through the maps applied after
    each factor."""
    grads: list[dict[str, torch.Tensor]] = [{} for _ in prefixes]
    for p, pc in enumerate(pieces):
        s = torch.stack([pre[p][-1] for pre in prefixes]).sum(0)
        for i, pre in enumerate(prefixes):
            adj = s - pre[p][-1]
            for j in range(len(pc.factors) - 1, -1, -1):
                dim, g = pc.factors[j]
                c = _contract(pre[p][j], adj, dim)
                grads[i][g] = c if g not in grads[i] else grads[i][g] + c
                if j:
                    adj = _to_model(adj, maps[i][g], dim)
    for gi, mp in zip(grads, maps, strict=True):
        for g in groups:
            gi.setdefault(g, torch.zeros_like(mp[g]))
    return grads


def _round_all(
    spec: SymmetrySpec,
    coords: Sequence[Sequence[str]],
    mats: Sequence[Mapping[str, torch.Tensor]],
    backend: str,
    pool: ThreadPoolExecutor,
    oracle: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Per model and coordinate, the permutation Pi (``Pi[perm[u], u] = 1``) maximizing
    <Pi, mat>: the linear oracle on gradients (``oracle=True``: only groups with a map, on
    their device) or the final rounding of the soft maps (every group of the spec).

    Blocked groups keep their blocks and attention heads share one head permutation; groups
    without a map (no tensor of their own) follow from the groups they steer, or stay put.
    The LAPs are independent and scipy releases the GIL, so they run on ``pool``."""
    tasks = []
    for i, mp in enumerate(mats):
        for coord in coords:
            sims = {g: mp[g].T for g in coord if g in mp}
            if not sims:
                continue
            for g in coord[1:] if len(coord) > 1 else coord:
                if g not in sims:
                    n = spec.groups[g].size
                    sims[g] = torch.zeros(n, n, dtype=torch.float64)
            tasks.append((i, coord, sims))
    solved = pool.map(lambda t: solve_coordinate(spec, t[1], t[2], backend=backend), tasks)
    out: list[dict[str, torch.Tensor]] = [{} for _ in mats]
    for (i, _, _), perms in zip(tasks, solved, strict=True):
        out[i].update(perms)
    for i, mp in enumerate(mats):
        if oracle:
            out[i] = {g: p.to(mp[g].device) for g, p in out[i].items() if g in mp}
        else:
            for g in spec.groups:
                out[i].setdefault(g, torch.arange(spec.groups[g].size))
    return out


def _line_search(
    prefixes: list[list[list[torch.Tensor]]],
    pieces: list[_Piece],
    maps: list[dict[str, torch.Tensor]],
    vertices: list[dict[str, torch.Tensor]],
) -> tuple[float, float, list[list[list[list[torch.Tensor]]]]]:
    """The best step t in [0, 1] towards the oracle's vertices, F at it, and the grouped
    partial products ``nodes[i][p][j][m]``: the sum over the ways of applying the first j maps
    with m of them the vertex and the rest the current soft map. With those, a tensor along
    the segment is ``sum_m (1 - t)^(j - m) t^m nodes[..][j][m]``."""
    grams: dict[int, torch.Tensor] = {}  # k -> summed Gram of the Bernstein coefficients
    nodes: list[list[list[list[torch.Tensor]]]] = [[] for _ in prefixes]
    for p, pc in enumerate(pieces):
        k = len(pc.factors)
        for i, pre in enumerate(prefixes):
            levels = [[pre[p][0]]]
            for j, (dim, g) in enumerate(pc.factors):
                last = levels[-1]
                level = [pre[p][j + 1]]  # m = 0: the current soft maps only, already known
                for m in range(1, j + 2):
                    hard = _gather(last[m - 1], vertices[i][g], dim)
                    if m <= j:
                        hard = hard + _to_universe(last[m], maps[i][g], dim)
                    level.append(hard)
                levels.append(level)
            nodes[i].append(levels)
        n = len(prefixes)
        flat = torch.stack([x.reshape(-1) for i in range(n) for x in nodes[i][p][k]])
        # inner products of every (model, coefficient) pair; F needs those across models
        inner = (flat @ flat.T).to("cpu", torch.float64).reshape(n, k + 1, n, k + 1)
        gram = inner.sum((0, 2)) - torch.einsum("aiaj->ij", inner)
        grams[k] = grams[k] + gram if k in grams else gram
    poly = np.polynomial.Polynomial([0.0])
    for k, gram in grams.items():
        basis = [_bernstein(k, m) for m in range(k + 1)]
        for m in range(k + 1):
            for q in range(k + 1):
                poly = poly + 0.5 * float(gram[m, q]) * basis[m] * basis[q]
    t = _maximize_on_unit_interval(poly)
    if float(poly(t)) - float(poly(0.0)) <= 1e-12 * max(1.0, abs(float(poly(0.0)))):
        t = 0.0  # no real gain: a tie between vertices, not a step
    return t, float(poly(t)), nodes


def _move(
    prefixes: list[list[list[torch.Tensor]]],
    maps: list[dict[str, torch.Tensor]],
    vertices: list[dict[str, torch.Tensor]],
    nodes: list[list[list[list[torch.Tensor]]]],
    t: float,
) -> None:
    """P <- (1 - t) P + t Pi, and every partial product follows from the grouped nodes."""
    for i, mp in enumerate(maps):
        for g, p in mp.items():
            mp[g] = (1.0 - t) * p + t * _one_hot(vertices[i][g]).to(p)
        for p_idx, levels in enumerate(nodes[i]):
            for j in range(1, len(levels)):
                coeffs = [(1.0 - t) ** (j - m) * t**m for m in range(j + 1)]
                prefixes[i][p_idx][j] = sum(c * x for c, x in zip(coeffs, levels[j], strict=True))


def universe_objective(
    spec: SymmetrySpec,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    model_perms: Sequence[Mapping[str, torch.Tensor]],
    *,
    ignore: Sequence[str] = DEFAULT_IGNORE,
) -> float:
    """F for hard maps: sum over model pairs of the inner products of their weights once each
    model is permuted by ``model_perms[i]`` (into the common order), in float64."""
    aligned = [
        spec.permute_state_dict(sd, p) for sd, p in zip(state_dicts, model_perms, strict=True)
    ]
    return float(
        sum(
            _pair_sum([pc.view(a[pc.key]).to(torch.float64) for a in aligned])
            for pc in _pieces(spec, state_dicts[0], ignore)
        )
    )
