"""Coordinate descent over groups: Git Re-Basin weight matching and MergeMany.

Weight matching maximizes ``sum_params <W_A, P(W_B)>`` over one permutation per group. With
all other groups fixed the objective is linear in one group's permutation, so each step is a
LAP on that group's weight similarity (:class:`symmerge.similarity.WeightSimilarity`). The
search starts from one sweep in dependency order (:func:`dependency_sweep`) rather than the
identity, so that a permuted copy is recovered exactly. Groups are then visited in a random
order each sweep; the search stops after a sweep in which no group improved, or after
``max_sweeps``. MuDSC runs the same loop on a dual-space similarity (weight
similarity mixed with a fixed activation similarity) and keeps the best sweep (``patience``).

MergeMany (Git Re-Basin, N models) repeatedly matches each model to the weighted mean of the
others (aligned), until a round changes nothing, and returns permutations expressed in model
0's unit order.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from symmerge.similarity import DEFAULT_IGNORE, WeightSimilarity, mix
from symmerge.solvers.lap import lap_objective, solve_kronecker, solve_lap, solve_shared_blocks
from symmerge.spec import SymmetrySpec

__all__ = [
    "MatchResult",
    "coordinate_descent",
    "coordinates",
    "dependency_sweep",
    "merge_many",
    "narrow_identity",
    "relative_to_first",
    "solve_coordinate",
    "weight_matching",
]

Perms = dict[str, torch.Tensor]


@dataclass
class MatchResult:
    """Permutations found by a matcher, with how the search went.

    ``perms`` maps group -> index vector for one model (two-model matching) and
    ``model_perms`` holds one such dict per model (MergeMany). ``lap_seconds`` counts only the
    assignment solves; ``other_seconds`` everything else the matcher did; ``timings`` a finer
    split where the matcher keeps one.
    """

    perms: Perms
    objective: dict[str, float] = field(default_factory=dict)
    iterations: int = 0
    lap_seconds: float = 0.0
    other_seconds: float = 0.0
    converged: bool = False
    log: list[str] = field(default_factory=list)
    model_perms: list[Perms] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def coordinates(spec: SymmetrySpec, groups: Sequence[str] | None = None) -> list[tuple[str, ...]]:
    """The units of coordinate descent: each group alone, except that a head group
    (``Group.block_group``) is solved together with every group whose blocks it moves.

    A joint coordinate is ``(head, steered_1, steered_2, ...)``.
    """
    names = list(spec.groups) if groups is None else list(groups)
    steered: dict[str, list[str]] = {}
    for g in spec.groups:
        head = spec.groups[g].block_group
        if head:
            steered.setdefault(head, []).append(g)
    out: list[tuple[str, ...]] = []
    done: set[str] = set()
    for g in names:
        head = spec.groups[g].block_group or (g if g in steered else None)
        if head is None:
            out.append((g,))
        elif head not in done:
            done.add(head)
            out.append((head, *steered[head]))
    return out


def solve_coordinate(
    spec: SymmetrySpec,
    coordinate: Sequence[str],
    sims: Mapping[str, torch.Tensor],
    *,
    backend: str = "scipy",
) -> dict[str, torch.Tensor]:
    """Best permutations of one coordinate given its similarity matrices (``sims[g]``, rows:
    reference units, columns: units to permute). Blocked groups keep their blocks; a head
    coordinate shares one block permutation (see :func:`solve_shared_blocks`)."""
    if len(coordinate) == 1:
        g = coordinate[0]
        return {g: solve_lap(sims[g], blocks=spec.groups[g].blocks, backend=backend)}
    head, steered = coordinate[0], coordinate[1:]
    blocks = spec.groups[head].size
    block_perm, perms = solve_shared_blocks(
        [sims[g] for g in steered], blocks, block_similarity=sims.get(head), backend=backend
    )
    return {head: block_perm, **dict(zip(steered, perms, strict=True))}


def solve_product_coordinate(
    spec: SymmetrySpec,
    coordinate: Sequence[str],
    inner: str,
    product: torch.Tensor,
    sims: Mapping[str, torch.Tensor],
    *,
    max_iter: int = 50,
    backend: str = "scipy",
) -> dict[str, torch.Tensor]:
    """Permutations of a coordinate whose head also is the outer factor of a product axis
    ``(head, inner)`` observed as a whole (``product``: its similarity; a grouped conv's
    channels, groups x channels per group), and of ``inner``, shared by every block.

    Starts from :func:`symmerge.solvers.lap.solve_kronecker` on the product alone, then
    alternates: the head (with the groups it steers, ``sims``) given ``inner``, each block
    pair scored by the product's units under ``inner``; then ``inner`` given the head.
    """
    head = coordinate[0]
    blocks, width = spec.groups[head].size, spec.groups[inner].size
    p, q = solve_kronecker(product, blocks, backend=backend)
    if len(coordinate) == 1:  # nothing steered: the product alone decides
        return {head: p, inner: q}
    pairs = product.double().cpu().reshape(blocks, width, blocks, width)
    out: dict[str, torch.Tensor] = {}
    for _ in range(max_iter):
        score = pairs[:, torch.arange(width), :, q].sum(0)  # (blocks, blocks) under q
        out = solve_coordinate(spec, coordinate, {**sims, head: score}, backend=backend)
        p_new = out[head]
        q_new = solve_lap(pairs[torch.arange(blocks), :, p_new, :].sum(0), backend=backend)
        done = torch.equal(p_new, p) and torch.equal(q_new, q)
        p, q = p_new, q_new
        if done:
            break
    return {**out, head: p, inner: q}


def coordinate_descent(
    coordinates: Sequence[Sequence[str]],
    similarity: Callable[[str, Mapping[str, torch.Tensor]], torch.Tensor],
    solve: Callable[[Sequence[str], Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]],
    init: Mapping[str, torch.Tensor],
    *,
    max_sweeps: int = 100,
    seed: int = 0,
    rtol: float = 1e-10,
    patience: int | None = None,
    log: Callable[[str], None] | None = None,
) -> MatchResult:
    """Maximize a sum of per-group linear objectives, one coordinate at a time.

    Args:
        coordinates: tuples of group names optimized together (usually one group each; see
            :func:`coordinates`).
        similarity: ``(group, perms) -> C`` given the current permutations of all groups; the
            objective of the group is ``sum_i C[i, perm[i]]``.
        solve: ``(coordinate, {group: C}) -> {group: perm}`` maximizing the coordinate's
            objective (e.g. :func:`solve_coordinate`).
        init: starting permutation of every group.
        max_sweeps: upper bound on sweeps over all coordinates.
        seed: seeds the random visiting order.
        rtol: a new solution is taken only when it beats the current one by more than
            ``rtol * max(1, |current|)``, so round-off cannot make the search cycle.
        patience: ``None`` (Git Re-Basin): run until a sweep improves no coordinate. An int
            (MuDSC): also score every sweep by the total ``sum_g sum_i C_g[i, perm_g[i]]``
            over all groups, go back to the best sweep after one that does not beat it, and
            stop after ``patience`` such sweeps in a row; the best sweep is returned. (A step
            improves its own coordinate but can lower its neighbours' objectives, so the total
            need not rise; while it does, both rules take the same path.)
        log: called with each sweep's line of ``result.log`` as it happens (progress on
            long runs).

    Returns:
        A :class:`MatchResult` whose ``iterations`` is the number of sweeps run.
    """
    started = time.perf_counter()
    perms: Perms = {g: torch.as_tensor(p, dtype=torch.long).clone() for g, p in init.items()}
    gen = torch.Generator().manual_seed(seed)
    res = MatchResult(perms)
    lap_s = other_s = 0.0
    solved: dict[int, dict[str, bytes]] = {}  # coordinate -> digests of its last matrices
    best: tuple[float, Perms, dict[str, float]] | None = None
    if patience is not None:
        best, strikes = _scored(coordinates, similarity, perms), 0
    for sweep in range(1, max_sweeps + 1):
        improved = 0
        for i in torch.randperm(len(coordinates), generator=gen).tolist():
            coord = coordinates[i]
            t0 = time.perf_counter()
            sims = {g: similarity(g, perms).to("cpu", torch.float64) for g in coord}
            old = {g: lap_objective(sims[g], perms[g]) for g in coord}
            digests = {g: _digest(sims[g]) for g in coord}
            if solved.get(i) == digests:
                # same matrices as at the last solve, whose optimum is the current solution
                res.objective.update(old)
                other_s += time.perf_counter() - t0
                continue
            solved[i] = digests
            t1 = time.perf_counter()
            new_perms = solve(coord, sims)
            t2 = time.perf_counter()
            new = {g: lap_objective(sims[g], new_perms[g]) for g in coord}
            before, after = sum(old.values()), sum(new.values())
            if after > before + rtol * max(1.0, abs(before)):
                perms.update(
                    {g: torch.as_tensor(p, dtype=torch.long) for g, p in new_perms.items()}
                )
                res.objective.update(new)
                improved += 1
            else:
                res.objective.update(old)
            lap_s += t2 - t1
            other_s += (t1 - t0) + (time.perf_counter() - t2)
        res.iterations = sweep
        res.log.append(f"sweep {sweep}: {improved} of {len(coordinates)} coordinates improved")
        if log is not None:
            log(f"{res.log[-1]} ({time.perf_counter() - started:.0f} s)")
        if not improved:
            res.converged = True
            break
        if best is not None:
            t0 = time.perf_counter()
            now = _scored(coordinates, similarity, perms)
            if now[0] > best[0] + rtol * max(1.0, abs(best[0])):
                best, strikes = now, 0
            else:  # back to the best sweep (in place: ``res.perms`` is ``perms``)
                strikes += 1
                perms.update(best[1])
                solved.clear()  # the restored solutions are not those optima
                res.log.append(f"sweep {sweep}: total {now[0]:.6g} <= best {best[0]:.6g}")
            other_s += time.perf_counter() - t0
            if strikes >= patience:  # type: ignore[operator]
                break
    if best is not None:
        perms.update(best[1])
        res.objective = dict(best[2])
    res.lap_seconds, res.other_seconds = lap_s, other_s
    return res


def _digest(matrix: torch.Tensor) -> bytes:
    """A fingerprint of a similarity matrix's exact bytes (kept instead of the matrix: a
    model's worth of n x n float64 matrices can exceed the model itself)."""
    data = matrix.detach().contiguous().numpy()
    return hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).digest() + bytes(
        str(tuple(matrix.shape)), "ascii"
    )


def _scored(
    coordinates: Sequence[Sequence[str]],
    similarity: Callable[[str, Mapping[str, torch.Tensor]], torch.Tensor],
    perms: Perms,
) -> tuple[float, Perms, dict[str, float]]:
    """(total objective, a copy of ``perms``, objective per group) of a solution."""
    obj = {g: lap_objective(similarity(g, perms), perms[g]) for c in coordinates for g in c}
    return sum(obj.values()), dict(perms), obj


def weight_matching(
    spec: SymmetrySpec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    *,
    groups: Sequence[str] | None = None,
    init: Mapping[str, torch.Tensor] | None = None,
    kind: str = "inner",
    max_sweeps: int = 100,
    seed: int = 0,
    backend: str = "scipy",
    ignore: Sequence[str] = DEFAULT_IGNORE,
    dtype: torch.dtype = torch.float32,
    spec_b: SymmetrySpec | None = None,
    alpha: float = 1.0,
    mixed_with: Mapping[str, torch.Tensor] | None = None,
    patience: int | None = None,
    cache: bool = True,
    log: Callable[[str], None] | None = None,
) -> MatchResult:
    """Git Re-Basin weight matching: permutations of B that best align its weights to A's.

    ``result.perms[g]`` follows :meth:`SymmetrySpec.permute_state_dict`
    (``new[i] = old[perm[i]]``), so ``spec.permute_state_dict(state_b, result.perms)`` is B in
    A's unit order. Groups with ``blocks`` are solved block to block, and attention heads
    (``block_group``) share one head permutation. ``init`` warm-starts the search; the groups it
    leaves out (all without ``init``) are first solved by :func:`dependency_sweep`.

    A narrower B: pass its own ``spec_b`` (``spec`` is A's; every group at least as wide in A,
    blocked groups with as many blocks). Each step is then a rectangular assignment
    ``(n_A x n_B)``, and ``perms[g]`` has length ``n_A``: the B unit matched to each A unit, or
    -1.

    Dual-space steps (MuDSC): with ``mixed_with`` (a fixed ``(n, n)`` matrix per group, e.g.
    activation correlations), every step solves ``alpha * C_w + (1 - alpha) * mixed_with[g]``
    (float64) instead of the weight similarity ``C_w``; ``alpha=1`` is plain weight matching.
    ``patience`` selects the stopping rule (see :func:`coordinate_descent`). ``cache=False``
    reads the weights from the state dicts at every step and holds none of them (state dicts
    over files, :mod:`symmerge.lazy`); ``log`` receives a line per sweep.

    Reference: Ainsworth, Hayase, Srinivasa, "Git Re-Basin", ICLR 2023, arXiv:2209.04836.
    """
    t0 = time.perf_counter()
    coords = coordinates(spec, groups)
    names = [g for c in coords for g in c]
    sim = WeightSimilarity(
        spec, state_a, state_b, groups=names, kind=kind, ignore=ignore, dtype=dtype,
        spec_b=spec_b, cache=cache,
    )  # fmt: skip
    start = spec.identity_permutations() if spec_b is None else narrow_identity(spec, spec_b)
    start.update({g: torch.as_tensor(p, dtype=torch.long) for g, p in (init or {}).items()})

    def solve(coord: Sequence[str], sims: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return solve_coordinate(spec, coord, sims, backend=backend)

    def similarity(
        g: str, perms: Mapping[str, torch.Tensor], known: Collection[str] | None = None
    ) -> torch.Tensor:
        c = sim(g, perms, known=known)
        return c if mixed_with is None else mix(alpha, c.double(), mixed_with[g])

    setup = time.perf_counter() - t0
    fixed = set(init or {}) | (set(spec.groups) - set(names))  # given, or not searched
    start, first = dependency_sweep(coords, sim.known_share, similarity, solve, start, fixed)
    res = coordinate_descent(
        coords, similarity, solve, start, max_sweeps=max_sweeps, seed=seed, patience=patience,
        log=log,
    )  # fmt: skip
    res.lap_seconds += first[0]
    res.other_seconds += setup + first[1]
    return res


def dependency_sweep(
    coordinates: Sequence[Sequence[str]],
    share: Callable[[str, Collection[str]], float],
    similarity: Callable[..., torch.Tensor],
    solve: Callable[[Sequence[str], Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]],
    start: Mapping[str, torch.Tensor],
    known: Collection[str],
) -> tuple[Perms, tuple[float, float]]:
    """The starting point of weight matching: every coordinate not in ``known`` solved once,
    from only the tensors whose other permuted axes are already solved.

    From the identity, the first sweep of coordinate descent reads every neighbour at an
    arbitrary unit order, which can trap it in a local optimum (a permuted copy of a
    bottleneck MLP or a MobileNet is then not recovered). Here the next coordinate is always
    the one with the largest share of solved weights (``share(group, solved)``; the first
    listed on ties), so the sweep spreads from the input and output layers, whose other axes
    are fixed, and a permuted copy comes out exact. A coordinate with no solved tensor is
    solved from all of them at the current permutations. Returns the permutations and the
    (assignment, other) seconds spent.
    """
    perms = {g: torch.as_tensor(p, dtype=torch.long) for g, p in start.items()}
    solved = set(known)
    todo = [tuple(c) for c in coordinates if not set(c) <= solved]
    lap_s = other_s = 0.0
    while todo:
        t0 = time.perf_counter()
        scores = [sum(share(g, solved | set(c)) for g in c) / len(c) for c in todo]
        coord = todo.pop(max(range(len(todo)), key=scores.__getitem__))
        scope = solved | set(coord) if max(scores) > 0 else None
        sims = {g: similarity(g, perms, scope).to("cpu", torch.float64) for g in coord}
        t1 = time.perf_counter()
        perms.update({g: torch.as_tensor(p, dtype=torch.long)
                      for g, p in solve(coord, sims).items()})  # fmt: skip
        lap_s, other_s = lap_s + time.perf_counter() - t1, other_s + t1 - t0
        solved |= set(coord)
    return perms, (lap_s, other_s)


def narrow_identity(spec: SymmetrySpec, spec_b: SymmetrySpec) -> Perms:
    """B's unit i matched to A's unit i of every group (-1 past B's width, per block for
    blocked groups), after checking that A is at least as wide as B everywhere."""
    if set(spec.groups) != set(spec_b.groups):
        diff = sorted(set(spec.groups) ^ set(spec_b.groups))[:5]
        raise ValueError(f"the two specs have different groups: {diff}")
    out: Perms = {}
    for name, g in spec.groups.items():
        n, n_b, blocks = g.size, spec_b.groups[name].size, g.blocks or 1
        if n_b > n or (g.blocks or None) != (spec_b.groups[name].blocks or None) or n_b % blocks:
            raise ValueError(
                f"group {name!r}: model B ({n_b} units, blocks {spec_b.groups[name].blocks}) "
                f"must be at most as wide as model A ({n} units, blocks {g.blocks}), with as "
                "many blocks; pass the wider model as A"
            )
        w, w_b = n // blocks, n_b // blocks
        unit = torch.arange(w).repeat(blocks)
        block = torch.arange(blocks).repeat_interleave(w)
        out[name] = torch.where(unit < w_b, block * w_b + unit, -1)
    return out


def merge_many(
    spec: SymmetrySpec,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    *,
    weights: Sequence[float] | None = None,
    max_rounds: int = 100,
    max_sweeps: int = 100,
    seed: int = 0,
    kind: str = "inner",
    backend: str = "scipy",
    ignore: Sequence[str] = DEFAULT_IGNORE,
    dtype: torch.dtype = torch.float32,
) -> MatchResult:
    """Git Re-Basin MergeMany: align N models to a common unit order.

    Each round visits the models in a random order and re-matches model i (warm-started) to the
    weighted mean of the other models in their current alignment; the search stops after a
    round in which no permutation changed. The returned ``model_perms`` are then re-expressed in
    model 0's unit order (model 0 gets the identity), which changes nothing in the merged
    function. ``iterations`` counts rounds; ``objective`` is that of the last matching run.
    """
    n = len(state_dicts)
    if n < 2:
        raise ValueError(f"merge_many needs at least 2 models, got {n}")
    w = [1.0 / n] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"need one weight per model ({n}), got {len(w)}")
    gen = torch.Generator().manual_seed(seed)
    perms: list[Perms] = [spec.identity_permutations() for _ in range(n)]
    aligned = [dict(sd) for sd in state_dicts]
    res = MatchResult({})
    keys = sorted(  # only what the similarity reads
        {m.tensor for m in spec.members() if not m.tensor.endswith(tuple(ignore))}
        & {k for k, v in state_dicts[0].items() if v.is_floating_point()}
    )
    for rnd in range(1, max_rounds + 1):
        changed = 0
        for i in torch.randperm(n, generator=gen).tolist():
            t0 = time.perf_counter()
            others = [j for j in range(n) if j != i]
            total = sum(w[j] for j in others)
            target = {
                k: sum(aligned[j][k].to(dtype) * (w[j] / total) for j in others) for k in keys
            }
            res.other_seconds += time.perf_counter() - t0
            sub = weight_matching(
                spec,
                target,
                state_dicts[i],
                init=perms[i] if rnd > 1 else None,  # first round: the dependency sweep
                kind=kind,
                max_sweeps=max_sweeps,
                seed=seed + 1000 * rnd + i,
                backend=backend,
                ignore=ignore,
                dtype=dtype,
            )
            res.lap_seconds += sub.lap_seconds
            res.other_seconds += sub.other_seconds
            t0 = time.perf_counter()
            if any(not torch.equal(sub.perms[g], perms[i][g]) for g in spec.groups):
                changed += 1
                perms[i] = sub.perms
                aligned[i] = spec.permute_state_dict(state_dicts[i], perms[i])
            res.objective = dict(sub.objective)
            res.other_seconds += time.perf_counter() - t0
        res.iterations = rnd
        res.log.append(f"round {rnd}: {changed} of {n} models changed alignment")
        if not changed:
            res.converged = True
            break
    res.model_perms = relative_to_first(perms)
    res.perms = res.model_perms[1] if n == 2 else {}
    return res


def relative_to_first(perms: list[Perms]) -> list[Perms]:
    """Reorder the merged units so that model 0's map is the identity.

    Merged unit i is model m's unit ``perms[m][i]``; with ``inv`` the inverse of model 0's
    permutation, merged unit ``inv[k]`` is model 0's unit k, so ``perms[m][inv]`` is the map
    in model 0's order.
    """
    out = []
    inverse = {g: torch.argsort(p) for g, p in perms[0].items()}
    for p in perms:
        out.append({g: q[inverse[g]] for g, q in p.items()})
    return out
