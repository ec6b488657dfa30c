"""Linear assignment: the inner solve of every permutation-based matching method.

``solve_lap(C)`` returns, for every row ``i`` of a similarity (or cost) matrix, the column
``perm[i]`` it is assigned to, maximizing (or minimizing) ``sum_i C[i, perm[i]]``. The default
backend is :func:`scipy.optimize.linear_sum_assignment` (Jonker-Volgenant); ``backend="lapx"``
uses the ``lapx`` package when it is installed. Groups with ``blocks`` (GroupNorm groups, later
attention heads) are solved by an exact two-level assignment: within every pair of blocks, then
between blocks, so units never leave their block.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "BACKENDS",
    "centre_prices",
    "lap_objective",
    "solve_kronecker",
    "solve_lap",
    "solve_shared_blocks",
    "warm_lap",
]

#: Valid values of ``backend``. "auto" picks lapx when importable; results can then depend on
#: what is installed (ties), so the default is scipy.
BACKENDS = ("scipy", "lapx", "auto")

# Blocks of at most this width are solved by enumerating all width! assignments in one
# vectorised step: thousands of tiny scipy calls would cost far more than the arithmetic.
_BRUTE_FORCE_WIDTH = 4


def solve_lap(
    C: torch.Tensor | np.ndarray,
    maximize: bool = True,
    *,
    blocks: int | None = None,
    backend: str = "scipy",
) -> torch.Tensor:
    """Optimal assignment of rows to columns of ``C``.

    Args:
        C: (rows, cols) matrix; any float dtype or device (solved on the CPU in float64).
        maximize: maximize ``sum_i C[i, perm[i]]`` (similarities) or minimize it (costs).
        blocks: if given, rows and columns are split into ``blocks`` equal consecutive blocks
            and every row block must map onto one whole column block (rows >= cols; with
            fewer columns each row block takes all units of its column block).
        backend: ``"scipy"`` (default), ``"lapx"`` or ``"auto"`` (lapx if installed).

    Returns:
        A CPU int64 tensor ``perm`` of length ``rows``: row ``i`` goes to column ``perm[i]``;
        ``-1`` marks the rows left unassigned when ``rows > cols``. For a square ``C`` this is a
        permutation in the convention of :meth:`SymmetrySpec.permute_state_dict` (unit ``i`` of
        the aligned model is unit ``perm[i]`` of the model the columns index).

    Example:
        >>> solve_lap(torch.tensor([[0.0, 1.0], [1.0, 0.0]])).tolist()
        [1, 0]
    """
    cost = _as_numpy(C)
    if backend not in BACKENDS:
        raise ValueError(
            f"The 'backend' parameter of solve_lap must be one of {BACKENDS}. "
            f"Got {backend!r} instead."
        )
    if blocks is not None and blocks > 1:
        return torch.from_numpy(_solve_blocked(cost, int(blocks), maximize, backend))
    return torch.from_numpy(_solve(cost, maximize, backend))


def lap_objective(C: torch.Tensor | np.ndarray, perm: torch.Tensor | np.ndarray) -> float:
    """``sum_i C[i, perm[i]]`` over the assigned rows (``perm[i] >= 0``), in float64."""
    cost = _as_numpy(C)
    p = np.asarray(torch.as_tensor(perm).cpu().numpy(), dtype=np.int64)
    rows = np.nonzero(p >= 0)[0]
    return float(cost[rows, p[rows]].sum())


# ---------------------------------------------------------------------------------------


def _as_numpy(C: torch.Tensor | np.ndarray) -> np.ndarray:
    if torch.is_tensor(C):
        C = C.detach().to("cpu", torch.float64).numpy()
    cost = np.asarray(C, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"solve_lap needs a 2-D matrix, got shape {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("solve_lap got a matrix with NaN or infinite entries")
    return cost


def _solve(cost: np.ndarray, maximize: bool, backend: str) -> np.ndarray:
    rows, cols = cost.shape
    perm = np.full(rows, -1, dtype=np.int64)
    if rows == 0 or cols == 0:
        return perm
    if backend == "lapx" or (backend == "auto" and _has_lapx()):
        r, c = _lapx(cost, maximize)
    else:
        r, c = linear_sum_assignment(cost, maximize=maximize)
    perm[r] = c
    return perm


def _has_lapx() -> bool:
    return importlib.util.find_spec("lap") is not None


def _lapx(cost: np.ndarray, maximize: bool) -> tuple[np.ndarray, np.ndarray]:
    try:
        import lap  # lapx installs the module ``lap``
    except ImportError as e:
        raise ImportError(
            "backend='lapx' needs the lapx package: pip install lapx (or use backend='scipy')"
        ) from e
    work = -cost if maximize else cost
    _, x, _ = lap.lapjv(np.ascontiguousarray(work), extend_cost=work.shape[0] != work.shape[1])
    x = np.asarray(x, dtype=np.int64)
    rows = np.nonzero(x >= 0)[0]
    return rows, x[rows]


def solve_shared_blocks(
    matrices: Sequence[torch.Tensor | np.ndarray],
    blocks: int,
    *,
    block_similarity: torch.Tensor | np.ndarray | None = None,
    maximize: bool = True,
    backend: str = "scipy",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One block assignment shared by several block-structured matrices (rows >= cols).

    Attention heads move as wholes in the q/k and in the v/o groups of one attention, so both
    groups must use the same head permutation while each permutes the dims inside a head its own
    way. Given the block pairing, every (matrix, block pair) is an independent LAP; so the best
    pairing is a LAP on the sum over matrices of the best within-pair scores (plus
    ``block_similarity``, a ``(blocks x blocks)`` similarity of the heads themselves), and
    the result is optimal for the sum of the objectives.

    Returns:
        ``(block_perm, perms)``: block ``p`` of the rows goes to block ``block_perm[p]`` of the
        columns, and ``perms[k]`` is the unit assignment of ``matrices[k]`` (same convention as
        :func:`solve_lap`).
    """
    if backend not in BACKENDS:
        raise ValueError(
            f"The 'backend' parameter of solve_shared_blocks must be one of {BACKENDS}. "
            f"Got {backend!r} instead."
        )
    costs = [_as_numpy(C) for C in matrices]
    score = np.zeros((blocks, blocks))
    if block_similarity is not None:
        score = score + _as_numpy(block_similarity)
        if score.shape != (blocks, blocks):
            raise ValueError(f"block_similarity must be ({blocks}, {blocks}), got {score.shape}")
    inners = []
    for cost in costs:
        inner, s = _block_pairs(cost, blocks, maximize, backend)
        inners.append(inner)
        score = score + s
    block_of = _solve(score, maximize, backend)
    perms = [
        torch.from_numpy(_unblock(inner, block_of, cost.shape[1] // blocks))
        for inner, cost in zip(inners, costs, strict=True)
    ]
    return torch.from_numpy(block_of), perms


def solve_kronecker(
    C: torch.Tensor | np.ndarray,
    blocks: int,
    *,
    max_iter: int = 50,
    backend: str = "scipy",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block and inner permutations ``(p, q)`` of a product axis (``blocks`` x width, row
    major) maximising ``sum_{b,i} C[b*w + i, p[b]*w + q[i]]``: one inner permutation shared by
    every block, as a grouped convolution's channels (groups x channels per group) allow.

    Not a LAP: the blocks are paired first as if each pair could permute its units its own
    way (:func:`solve_lap` with ``blocks``), then ``q`` and ``p`` are improved in turn, each
    an exact LAP given the other, until neither changes (a local optimum).
    """
    cost = _as_numpy(C)
    n = cost.shape[0]
    if cost.shape != (n, n) or n % blocks:
        raise ValueError(f"solve_kronecker needs a square matrix whose size is a multiple of "
                         f"blocks={blocks}; got shape {cost.shape}")  # fmt: skip
    w = n // blocks
    pairs = cost.reshape(blocks, w, blocks, w)
    p = _solve_blocked(cost, blocks, True, backend).reshape(blocks, w)[:, 0] // w
    q = np.full(w, -1)
    for _ in range(max_iter):
        q_new = _solve(pairs[np.arange(blocks), :, p, :].sum(0), True, backend)  # (G, w, w)
        p_new = _solve(pairs[:, np.arange(w), :, q_new].sum(0), True, backend)  # (w, G, G)
        if np.array_equal(q_new, q) and np.array_equal(p_new, p):
            break
        p, q = p_new, q_new
    return torch.from_numpy(p), torch.from_numpy(q)


def _solve_blocked(cost: np.ndarray, blocks: int, maximize: bool, backend: str) -> np.ndarray:
    """Exact LAP restricted to block-to-block maps.

    Once the block pairing is fixed, the units of each pair are assigned independently, so the
    best total is a block-level LAP over the best within-pair scores: solving every pair, then
    the blocks, is optimal (not a heuristic).
    """
    inner, score = _block_pairs(cost, blocks, maximize, backend)
    block_of = _solve(score, maximize, backend)
    return _unblock(inner, block_of, cost.shape[1] // blocks)


def _unblock(inner: np.ndarray, block_of: np.ndarray, width: int) -> np.ndarray:
    """Unit assignment from a block pairing: row block p's units go into column block
    ``block_of[p]`` (``width`` columns per block) as ``inner`` says; -1 stays unassigned."""
    unit = inner[np.arange(len(block_of)), block_of]
    return np.where(unit >= 0, block_of[:, None] * width + unit, -1).reshape(-1)


def _block_pairs(
    cost: np.ndarray, blocks: int, maximize: bool, backend: str
) -> tuple[np.ndarray, np.ndarray]:
    """Best assignment inside every (row block, column block) pair and its score."""
    n, m = cost.shape
    if n < m or n % blocks or m % blocks:
        raise ValueError(
            "a blocked assignment needs rows and columns that are each a multiple of blocks, "
            f"and rows >= columns; got shape {cost.shape} with blocks={blocks}"
        )
    w, v = n // blocks, m // blocks
    pairs = cost.reshape(blocks, w, blocks, v).transpose(0, 2, 1, 3)  # (G, G, w, v)
    if w == v and w <= _BRUTE_FORCE_WIDTH:
        return _all_pairs_brute_force(pairs, maximize)
    inner = np.empty((blocks, blocks, w), dtype=np.int64)
    score = np.empty((blocks, blocks))
    for p in range(blocks):
        for q in range(blocks):
            inner[p, q] = _solve(pairs[p, q], maximize, backend)
            rows = np.nonzero(inner[p, q] >= 0)[0]
            score[p, q] = pairs[p, q][rows, inner[p, q][rows]].sum()
    return inner, score


def _all_pairs_brute_force(pairs: np.ndarray, maximize: bool) -> tuple[np.ndarray, np.ndarray]:
    g, _, w, _ = pairs.shape
    sigmas = np.array(list(itertools.permutations(range(w))), dtype=np.int64)  # (S, w)
    # totals[p, q, s] = sum_i pairs[p, q, i, sigma_s(i)]
    totals = pairs[:, :, np.arange(w)[None, :], sigmas].sum(-1)
    best = totals.argmax(-1) if maximize else totals.argmin(-1)
    score = np.take_along_axis(totals, best[..., None], -1)[..., 0]
    return sigmas[best], score


def warm_lap(
    C: np.ndarray,
    perm: np.ndarray,
    prices: np.ndarray | None = None,
    tol: float = 0.0,
    rtol: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Exact ``max sum_i C[i, p(i)]`` warm-started from a permutation and column prices.

    Column prices ``v`` prove ``p`` optimal when every row's column maximizes its
    ``C[i, j] - v[j]`` (they are optimal LP duals). Rows where that fails by more than ``tol``
    are released and re-assigned by Jonker-Volgenant's augmenting row reduction, then one
    shortest augmenting path per row still free (compiled); both keep the prices dual
    feasible. When ``C`` moved little since ``p`` and ``v`` were optimal, few rows are
    released and the solve costs a small part of a cold one; an STE step re-solves its
    groups this way.

    Args:
        C: (n, n) float64 similarities (not modified).
        perm: (n,) int64 starting permutation (not modified).
        prices: (n,) column prices from the previous solve, or None (zeros: a cold start).
        tol: slack a row may lack and still count as optimal (round-off).
        rtol: more such slack, relative to the similarities' scale: the slack is
            ``tol + rtol * max(1, max |C|)``.

    Returns:
        ``(perm, prices, released)``: an optimal permutation, prices proving it, and how many
        rows were re-assigned (0: ``perm`` was already optimal).
    """
    s = np.ascontiguousarray(C, dtype=np.float64)  # read in place: no copy when it is already
    x = np.array(perm, dtype=np.int64)
    v = np.zeros(len(x)) if prices is None else -np.array(prices, dtype=np.float64)
    if s.ndim != 2 or s.shape != (len(x), len(x)) or len(v) != len(x):
        raise ValueError(f"warm_lap needs a square C matching perm; got {s.shape}, {x.shape}")
    hi, lo = (float(s.max()), float(s.min())) if s.size else (0.0, 0.0)  # NaN, inf propagate
    if not (np.isfinite(hi) and np.isfinite(lo) and np.isfinite(v).all()):
        raise ValueError("warm_lap needs finite similarities and prices (found NaN or inf)")
    tol = float(tol) + float(rtol) * max(1.0, hi, -lo)
    released = _augment_released(s, x, v, tol)
    if released == -2:
        raise ValueError("warm_lap needs perm to be a permutation of 0..n-1")
    return x, -v, released


def centre_prices(
    C: np.ndarray, perm: np.ndarray, prices: np.ndarray, iterations: int = 4
) -> np.ndarray:
    """Prices deep inside the region that proves ``perm`` optimal, so they survive a drift.

    In ``perm``'s order (``ca[i, k] = C[i, perm[k]]``, ``w[k] = prices[perm[k]]``) the slack
    ``S[i, k] = (ca[i, i] - w[i]) - (ca[i, k] - w[k]) >= 0``. With the other prices fixed,
    ``w[k]`` may rise by row ``k``'s smallest slack and drop by column ``k``'s; each iteration
    moves every price halfway to the middle of that interval, all at once (a slack loses at
    most a quarter of itself to each of its two prices, so the prices stay feasible). The
    prices a solve returns leave zero slack on many pairs, which any change of ``C`` breaks;
    centred, they keep proving ``perm`` under small changes (STE's bound certificates use
    this). Returns new prices (``prices`` is not modified); they prove ``perm`` if
    ``prices`` did.
    """
    v = np.array(prices, dtype=np.float64)
    x = np.asarray(perm, dtype=np.int64)
    C = np.asarray(C, dtype=np.float64)
    if not (np.isfinite(C).all() and np.isfinite(v).all()):
        raise ValueError("centre_prices needs finite similarities and prices")
    if len(x) >= 2 and iterations > 0:
        _centre(np.ascontiguousarray(C, dtype=np.float64), x, v, int(iterations))
    return v


def _njit(fn, **options):  # type: ignore[no-untyped-def]
    """numba's compiler when installed (these element-wise loops are far too slow in Python)."""
    try:
        from numba import njit
    except ImportError:  # pragma: no cover - numba is a dependency
        return fn
    return njit(cache=True, nogil=True, **options)(fn)


def _njit_fastmath(fn):  # type: ignore[no-untyped-def]
    return _njit(fn, fastmath=True)


@_njit_fastmath
def _centre(c: np.ndarray, x: np.ndarray, v: np.ndarray, iterations: int) -> None:
    """:func:`centre_prices` in place (``n >= 2``; finite inputs: compiled with fastmath)."""
    n = c.shape[0]
    ca = np.empty((n, n))  # C in perm's order, so the inner loops read contiguous rows
    for i in range(n):
        for k in range(n):
            ca[i, k] = c[i, x[k]]
    w = np.empty(n)
    for k in range(n):
        w[k] = v[x[k]]
    up = np.empty(n)  # row k's smallest slack: how far w[k] may rise
    down = np.empty(n)  # column k's smallest slack: how far w[k] may drop
    row = np.empty(n)
    for _ in range(iterations):
        down[:] = np.inf
        for i in range(n):
            own = ca[i, i] - w[i]
            for k in range(n):
                row[k] = own - ca[i, k] + w[k]
            row[i] = np.inf  # a row's own column is no alternative
            low = np.inf
            for k in range(n):  # branch-free, so the two reductions vectorise
                low = min(low, row[k])
                down[k] = min(down[k], row[k])
            up[i] = low
        for k in range(n):
            w[k] += (up[k] - down[k]) / 4
    for k in range(n):
        v[x[k]] = w[k]


@_njit
def _reduce_rows(
    s: np.ndarray, x: np.ndarray, y: np.ndarray, v: np.ndarray, free: np.ndarray, nfree: int
) -> int:
    """Jonker-Volgenant's augmenting row reduction: cheap O(n) moves for the free rows.

    A free row takes its cheapest column and lowers that column's price until the row's
    second choice is as cheap, so it stays tight and every other row too; a row it displaces
    becomes free (and is tried next when the price fell, else in the next pass). Two passes
    with a work bound; the rows still free are left to the augmenting paths. Returns how many
    are, in ``free[:count]``.
    """
    n = s.shape[0]
    if n < 2:
        return nfree
    budget = 8 * n
    for _ in range(2):
        k = 0
        pending = nfree
        nfree = 0
        while k < pending and budget > 0:
            budget -= 1
            i = free[k]
            k += 1
            u1 = np.inf
            u2 = np.inf
            j1 = -1
            j2 = -1
            for j in range(n):
                h = -s[i, j] - v[j]
                if h < u2:
                    if h >= u1:
                        u2 = h
                        j2 = j
                    else:
                        u2 = u1
                        j2 = j1
                        u1 = h
                        j1 = j
            i0 = y[j1]
            if u1 < u2:
                v[j1] -= u2 - u1
            elif i0 >= 0:  # a tie: take the second column, price unchanged
                j1 = j2
                i0 = y[j2]
            x[i] = j1
            y[j1] = i
            if i0 >= 0:
                x[i0] = -1
                if u1 < u2:
                    k -= 1
                    free[k] = i0
                else:
                    free[nfree] = i0
                    nfree += 1
        while k < pending:  # out of budget: still free
            free[nfree] = free[k]
            nfree += 1
            k += 1
    return nfree


@_njit
def _augment_released(s: np.ndarray, x: np.ndarray, v: np.ndarray, tol: float) -> int:
    """Release rows whose column is not a reduced-cost minimum, then augment each (in place).

    Costs are ``-s`` (minimised), read in place; ``s`` and ``v`` are finite (checked by the
    caller). Returns the number of rows released, or -2 when ``x`` is not a permutation.
    """
    n = s.shape[0]
    y = np.full(n, -1, np.int64)  # column -> row
    for i in range(n):
        if x[i] < 0 or x[i] >= n or y[x[i]] >= 0:
            return -2
        y[x[i]] = i
    free = np.empty(n, np.int64)
    nfree = 0
    for i in range(n):  # release the rows whose column is not the best (largest s + v)
        best = -np.inf
        for j in range(n):
            best = max(best, s[i, j] + v[j])
        if s[i, x[i]] + v[x[i]] < best - tol:
            free[nfree] = i
            nfree += 1
    for k in range(nfree):
        y[x[free[k]]] = -1
        x[free[k]] = -1
    released = nfree
    nfree = _reduce_rows(s, x, y, v, free, nfree)
    d = np.empty(n)
    pred = np.empty(n, np.int64)
    cols = np.empty(n, np.int64)
    for k in range(nfree):
        f = free[k]
        for j in range(n):
            cols[j] = j
            d[j] = -s[f, j] - v[j]
            pred[j] = f
        # cols[:lo]: scanned; cols[lo:hi]: at the current minimum mu, to scan; rest: open
        lo = 0
        hi = 0
        mu = 0.0
        end = -1
        while end < 0:
            if lo == hi:  # next distance level: gather the open columns at the minimum
                mu = d[cols[hi]]
                top = hi
                for t in range(hi, n):
                    j = cols[t]
                    if d[j] <= mu:
                        if d[j] < mu:
                            mu = d[j]
                            top = hi
                        cols[t] = cols[top]
                        cols[top] = j
                        top += 1
                hi = top
                for t in range(lo, hi):
                    if y[cols[t]] < 0:
                        end = cols[t]
                        break
                if end >= 0:
                    break
            j = cols[lo]
            lo += 1
            i = y[j]
            h0 = -s[i, j] - v[j] - mu
            for t in range(hi, n):
                jj = cols[t]
                h = -s[i, jj] - v[jj] - h0
                if h < d[jj]:
                    d[jj] = h
                    pred[jj] = i
                    if h == mu:
                        if y[jj] < 0:
                            end = jj
                            break
                        cols[t] = cols[hi]
                        cols[hi] = jj
                        hi += 1
        for t in range(lo):
            j = cols[t]
            v[j] += d[j] - mu
        j = end
        while True:
            i = pred[j]
            y[j] = i
            nxt = x[i]
            x[i] = j
            if i == f:
                break
            j = nxt
    return released
