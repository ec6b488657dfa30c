"""Grouping for neuron-interpolation fusion: weighted K-means (KF) and Hungarian pairing (HF).

Every parent neuron j of a level has an output vector ``z_j`` over the fusion samples (rows
of ``z``, all parents concatenated, parent-major) and an importance ``s_j > 0``. With neuron
j assigned to fused neuron ``k_j``, the level objective splits exactly (Theorem 1)::

    J(F) = sum_j s_j ||F_{k_j} - z_j||^2
         = sum_k S_k ||F_k - T_k||^2        (approximation: fit the fused level to T)
         + sum_j s_j ||T_{k_j} - z_j||^2    (grouping: depends on the clusters only)

    S_k = sum_{j: k_j = k} s_j,   T_k = sum_{j: k_j = k} s_j z_j / S_k

because the cross term vanishes when ``T_k`` is the weighted mean (:func:`decomposition`).
The grouping error is the weighted K-means cost, hence two solvers:

- **KF** (:func:`weighted_kmeans`): Lloyd iterations with importance-weighted centroids, for
  any number of parents and any fused width ``k``.
- **HF** (:func:`hungarian_pairs`): two parents of equal width grouped one to one. A pair
  ``{a, b}`` costs ``s_a s_b / (s_a + s_b) ||z_a - z_b||^2`` (:func:`pair_costs`, Thm 2a), so
  the best pairing is a linear assignment; :func:`pair_clusters` turns it into KF labels.

The Lloyd iterations run on the Gram matrix ``G = x x^T`` of the clustered vectors ``x``
(``z``, or its normalised copy): after one ``units x units x samples`` product (float64),
every step costs O(units^2) whatever the number of samples (float32 on ``z``'s device; the
returned targets and cost are float64). Memory is
O(units^2 + units * samples).

.. warning::
    Departures from the paper's code (``alf.py:_k_means_v2``, ``hf_kf.py``): restarts and the
    early stop compare the *squared* cost ``sum_j s_j ||x_j - c_{k_j}||^2`` (the grouping
    error above), not ``sum_j s_j ||x_j - c_{k_j}||``; HF uses the exact cost of Thm 2a,
    not the code's non-squared ``s_a ||t - z_a|| + s_b ||t - z_b||``; a sample whose vector
    is all zeros stays zero under ``normalize`` instead of becoming NaN.

Reference: "Model Fusion via Neuron Interpolation", arXiv 2507.00037 (algorithms.md §5(b)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from symmerge.solvers.lap import BACKENDS, solve_lap

__all__ = [
    "INITS",
    "KMeansResult",
    "decomposition",
    "from_labels",
    "hungarian_pairs",
    "pair_clusters",
    "pair_costs",
    "weighted_kmeans",
]

#: Valid values of ``init``: farthest-point (the linear variant) or parent 1's neurons (the
#: gradient variant).
INITS = ("farthest", "first")

# Early stop: the cost must drop by ``tol`` (relative) over this many iterations.
_PATIENCE = 3


@dataclass(frozen=True)
class KMeansResult:
    """A grouping of units into ``k`` clusters, with its targets.

    Attributes:
        labels: (units,) int64 in ``[0, k)``, the cluster (fused neuron) of every unit; no
            cluster is empty.
        centroids: (k, samples) float64, the targets ``T_k``: importance-weighted means of
            the *raw* ``z`` rows of every cluster (also under ``normalize``).
        weights: (k,) float64, the cluster weights ``S_k`` (sums of importances).
        cost: the grouping error ``sum_j s_j ||T_{k_j} - z_j||^2`` on the raw ``z``.
        iterations: Lloyd iterations of the kept restart (0 for given labels).
    """

    labels: torch.Tensor
    centroids: torch.Tensor
    weights: torch.Tensor
    cost: float
    iterations: int

    @property
    def k(self) -> int:
        """Number of clusters."""
        return int(self.centroids.shape[0])


def weighted_kmeans(
    z: torch.Tensor | np.ndarray,
    weights: torch.Tensor | np.ndarray,
    k: int,
    *,
    init: str = "farthest",
    restarts: int = 10,
    max_iter: int = 100,
    tol: float = 0.05,
    normalize: bool = False,
    sizes: Sequence[int] | None = None,
    seed: int = 0,
) -> KMeansResult:
    """Group the rows of ``z`` into ``k`` clusters minimising the weighted K-means cost.

    Minimises ``sum_j s_j ||x_j - c_{k_j}||^2`` over labels, with ``c_k`` the
    importance-weighted mean of cluster k, by Lloyd iterations from ``restarts`` starts;
    keeps the start of lowest cost. Every iteration recomputes the centroids, then moves
    every unit to its nearest centroid (squared L2; a tie keeps the current cluster). A
    cluster left empty is re-seeded with the unit farthest from its centroid among the
    clusters of two or more units, so a singleton is never emptied. A start stops when no
    label changes, when its cost has not dropped by at least ``tol`` (relative) over the
    last 3 iterations, or after ``max_iter`` iterations.

    Args:
        z: (units, samples) neuron output vectors, parents concatenated parent-major.
        weights: (units,) importance scores, positive and finite.
        k: number of clusters (the fused width), in ``[1, units]``.
        init: ``"farthest"``: a random first unit (from the seeded generator), then
            repeatedly the unit farthest from all chosen ones; ``"first"``: the first ``k``
            units (parent 1's neurons), deterministic, so ``restarts`` is ignored (one run).
        restarts: starts of ``init="farthest"``, at least 1 (the paper: 10 linear, 1 gradient).
        max_iter: most Lloyd iterations per start, at least 1.
        tol: relative cost drop over 3 iterations below which a start stops early, in
            ``[0, 1)`` (the paper: 0.05 linear, 0 gradient).
        normalize: cluster per-sample normalised vectors (the code's
            ``normalize_acts_for_kmeans``): every sample column of every parent's block of
            rows is divided by its L2 norm over that parent's units (no centring), so each
            sample weighs the same for every parent. The returned centroids and cost still
            use the raw ``z``.
        sizes: units of every parent (rows of ``z``, parent-major) for ``normalize``; default
            one block of all units.
        seed: seed of the ``torch.Generator`` drawing the farthest-point first units.

    Returns:
        :class:`KMeansResult`, on ``z``'s device. Deterministic given ``seed``.

    Raises:
        ValueError: bad shapes or parameters, or non-positive / non-finite weights.

    Example:
        >>> z = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.1, 0.0], [10.1, 0.0]])
        >>> weighted_kmeans(z, torch.ones(4), 2, init="first").labels.tolist()
        [0, 1, 0, 1]
    """
    x, s = _check_points(z, weights, "weighted_kmeans")
    units = x.shape[0]
    _check_int("k", k, 1, units, "weighted_kmeans")
    if init not in INITS:
        raise ValueError(
            f"The 'init' parameter of weighted_kmeans must be one of {INITS}. Got {init!r} instead."
        )
    _check_int("restarts", restarts, 1, None, "weighted_kmeans")
    _check_int("max_iter", max_iter, 1, None, "weighted_kmeans")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 <= tol < 1.0:
        raise ValueError(
            f"The 'tol' parameter of weighted_kmeans must be a float in [0, 1). Got {tol!r} "
            "instead."
        )
    raw = x
    if normalize:
        x = _normalize(x, _check_sizes(sizes, units))
    elif sizes is not None:
        _check_sizes(sizes, units)
    # The starts and Lloyd steps read a float32 Gram matrix (half the time and memory
    # traffic of float64; only the ranking of distances depends on it); the returned
    # targets and cost are recomputed from ``x`` in float64.
    x32 = x.float()
    gram32 = x32 @ x32.T
    sq32, s32 = gram32.diagonal().clone(), s.float()
    gen = torch.Generator().manual_seed(int(seed))
    best: tuple[float, torch.Tensor, int] | None = None
    for _ in range(1 if init == "first" else restarts):
        if init == "first":
            idx = torch.arange(k, device=x.device)
        else:
            idx = _farthest_point(gram32, sq32, k, gen)
        d2 = (sq32[:, None] + sq32[idx][None, :] - 2.0 * gram32[idx].T).clamp_min(0.0)
        labels, iters, cost = _lloyd(gram32, sq32, s32, d2, k, max_iter, tol)
        if best is None or cost < best[0]:
            best = (cost, labels, iters)
    assert best is not None
    res = _stats(raw, s, best[1], k)
    return KMeansResult(best[1], res[0], res[1], res[2], best[2])


def from_labels(
    z: torch.Tensor | np.ndarray,
    weights: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    k: int | None = None,
) -> KMeansResult:
    """The targets, cluster weights and grouping error of given labels (HF, or a fixed map).

    ``k`` defaults to ``labels.max() + 1``; every cluster must hold a unit. ``iterations`` is 0.
    """
    x, s = _check_points(z, weights, "from_labels")
    lab = _check_labels(labels, x.shape[0], k, "from_labels", x.device)
    k = int(lab.max()) + 1 if k is None else int(k)
    empty = torch.nonzero(torch.bincount(lab, minlength=k) == 0).flatten().tolist()
    if empty:
        raise ValueError(f"from_labels needs every cluster non-empty; clusters {empty} are empty")
    t, w, cost = _stats(x, s, lab, k)
    return KMeansResult(lab, t, w, cost, 0)


def decomposition(
    z: torch.Tensor | np.ndarray,
    weights: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    targets: torch.Tensor | np.ndarray,
) -> tuple[float, float, float]:
    """The three terms of Theorem 1 for fused outputs ``targets`` (F, (k, samples)).

    Returns ``(total, approximation, grouping)``, in float64:
    ``total = sum_j s_j ||F_{k_j} - z_j||^2``, ``approximation = sum_k S_k ||F_k - T_k||^2``,
    ``grouping = sum_j s_j ||T_{k_j} - z_j||^2``, with ``T`` the weighted means; ``total``
    equals the sum of the other two up to rounding. Empty clusters add nothing.
    """
    x, s = _check_points(z, weights, "decomposition")
    f = _as_float64(targets, "targets", "decomposition").to(x.device)
    if f.ndim != 2 or f.shape[1] != x.shape[1]:
        raise ValueError(
            f"decomposition needs targets of shape (k, {x.shape[1]}), got {tuple(f.shape)}"
        )
    k = f.shape[0]
    lab = _check_labels(labels, x.shape[0], k, "decomposition", x.device)
    t, w, grouping = _stats(x, s, lab, k)
    total = float((s * (f[lab] - x).square().sum(1)).sum())
    approximation = float((w * (f - t).square().sum(1)).sum())
    return total, approximation, grouping


def pair_costs(
    z_a: torch.Tensor | np.ndarray,
    z_b: torch.Tensor | np.ndarray,
    s_a: torch.Tensor | np.ndarray,
    s_b: torch.Tensor | np.ndarray,
) -> torch.Tensor:
    """HF's exact grouping cost ``C[a, b] = s_a s_b / (s_a + s_b) ||z_a - z_b||^2`` (Thm 2a).

    It is the weighted K-means cost ``s_a ||t - z_a||^2 + s_b ||t - z_b||^2`` of the pair
    alone, ``t`` its weighted mean. Returns a float64 (units_a, units_b) matrix.
    """
    za, sa = _check_points(z_a, s_a, "pair_costs", ("z_a", "s_a"))
    zb, sb = _check_points(z_b, s_b, "pair_costs", ("z_b", "s_b"))
    if za.shape[1] != zb.shape[1]:
        raise ValueError(
            f"pair_costs needs z_a and z_b over the same samples, got {za.shape[1]} and "
            f"{zb.shape[1]} columns"
        )
    zb, sb = zb.to(za.device), sb.to(za.device)
    d2 = za.square().sum(1)[:, None] + zb.square().sum(1)[None, :] - 2.0 * za @ zb.T
    return sa[:, None] * sb[None, :] / (sa[:, None] + sb[None, :]) * d2.clamp_min(0.0)


def hungarian_pairs(
    z_a: torch.Tensor | np.ndarray,
    z_b: torch.Tensor | np.ndarray,
    s_a: torch.Tensor | np.ndarray,
    s_b: torch.Tensor | np.ndarray,
    *,
    backend: str = "scipy",
) -> torch.Tensor:
    """HF grouping of two equal-width parents: the pairing of least total grouping error.

    Minimises ``sum_i C[i, perm[i]]`` over permutations (:func:`pair_costs`, a LAP solved by
    :func:`symmerge.solvers.lap.solve_lap`), which is optimal among one-to-one groupings.

    Args:
        z_a, z_b: (n, samples) neuron output vectors of parents a and b.
        s_a, s_b: (n,) their importance scores, positive and finite.
        backend: LAP backend, one of :data:`symmerge.solvers.lap.BACKENDS`.

    Returns:
        A CPU int64 permutation ``perm``: unit ``i`` of a is paired with unit ``perm[i]`` of b
        (:func:`pair_clusters` gives the matching KF labels).

    Raises:
        ValueError: unequal widths (use :func:`weighted_kmeans`), bad shapes or weights.
    """
    n_a, n_b = int(torch.as_tensor(z_a).shape[0]), int(torch.as_tensor(z_b).shape[0])
    if n_a != n_b:
        raise ValueError(
            f"hungarian_pairs (HF) needs two parents of equal width; got {n_a} and {n_b} "
            "units. HF groups units one to one; for unequal widths or more than two parents "
            "use weighted_kmeans (KF) on the concatenated units"
        )
    if backend not in BACKENDS:
        raise ValueError(
            f"The 'backend' parameter of hungarian_pairs must be one of {BACKENDS}. Got "
            f"{backend!r} instead."
        )
    return solve_lap(pair_costs(z_a, z_b, s_a, s_b), maximize=False, backend=backend)


def pair_clusters(perm: torch.Tensor | np.ndarray) -> torch.Tensor:
    """KF-style labels (2n,) of an HF pairing: unit i of a and unit ``perm[i]`` of b form
    cluster i, so downstream code treats HF and KF alike.

    Example:
        >>> pair_clusters(torch.tensor([1, 0])).tolist()
        [0, 1, 1, 0]
    """
    p = torch.as_tensor(perm).detach().cpu()
    n = p.numel()
    if (
        p.ndim != 1
        or p.is_floating_point()
        or not torch.equal(p.sort().values.long(), torch.arange(n))
    ):
        raise ValueError(f"pair_clusters needs a permutation of range({n}), got {p.tolist()}")
    inv = torch.empty(n, dtype=torch.long)
    inv[p.long()] = torch.arange(n)
    return torch.cat([torch.arange(n), inv])


# ---------------------------------------------------------------------------------------


def _farthest_point(
    gram: torch.Tensor, sq: torch.Tensor, k: int, gen: torch.Generator
) -> torch.Tensor:
    """``k`` distinct units: a random first one, then the farthest from all chosen so far.

    A loop of ``k`` steps over (units,) vectors: NumPy on the CPU (its per-call overhead is
    a fraction of torch's, which dominates at these sizes), torch elsewhere.
    """
    n = sq.numel()
    first = int(torch.randint(n, (1,), generator=gen)[0])
    if sq.device.type == "cpu":
        g, d = gram.numpy(), sq.numpy()
        idx = np.empty(k, dtype=np.int64)
        mind, row = np.full(n, np.inf, dtype=g.dtype), np.empty(n, dtype=g.dtype)
        nxt = first
        for c in range(k):
            idx[c] = nxt
            np.multiply(g[nxt], -2.0, out=row)
            row += d
            row += d[nxt]
            np.maximum(row, 0.0, out=row)
            np.minimum(mind, row, out=mind)
            mind[nxt] = -1.0  # a chosen unit is never taken twice (its duplicates may be)
            nxt = int(mind.argmax())
        return torch.from_numpy(idx)
    out = torch.empty(k, dtype=torch.long, device=sq.device)
    mind = torch.full_like(sq, torch.inf)
    cur = torch.tensor(first, device=sq.device)
    for c in range(k):
        out[c] = cur
        mind = torch.minimum(mind, (sq + sq[cur] - 2.0 * gram[cur]).clamp_min(0.0))
        mind[cur] = -1.0
        cur = torch.argmax(mind)
    return out


def _lloyd(
    gram: torch.Tensor,
    sq: torch.Tensor,
    s: torch.Tensor,
    d2: torch.Tensor,
    k: int,
    max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, int, float]:
    """Lloyd iterations from the squared distances ``d2`` (units, k) to initial centroids.

    Returns the labels, the iterations run and their cost (from the Gram matrix: enough to
    rank restarts; the result's cost is recomputed exactly).
    """
    labels = d2.argmin(1)
    labels = _fill_empty(labels, d2.gather(1, labels[:, None])[:, 0], k)
    history: list[float] = []
    iterations = 0
    while True:
        d2 = _sqdist_to_means(gram, sq, s, labels, k)
        own = d2.gather(1, labels[:, None])[:, 0]
        cost = float((s * own).sum())
        if iterations == max_iter or (
            len(history) >= _PATIENCE and cost >= history[-_PATIENCE] * (1.0 - tol)
        ):
            return labels, iterations, cost
        iterations += 1
        history.append(cost)
        best, new = d2.min(1)
        new = torch.where(own <= best, labels, new)
        new = _fill_empty(new, torch.minimum(own, best), k)
        if torch.equal(new, labels):
            return labels, iterations, cost
        labels = new


def _sqdist_to_means(
    gram: torch.Tensor, sq: torch.Tensor, s: torch.Tensor, labels: torch.Tensor, k: int
) -> torch.Tensor:
    """(units, k) squared distances to the weighted cluster means, from the Gram matrix.

    With ``w_i = s_i / S_{k_i}``: ``||x_j - c_k||^2 = G_jj - 2 sum_{i in k} w_i G_ji
    + sum_{i, i' in k} w_i w_i' G_ii'``; O(units^2).
    """
    n = sq.numel()
    total = torch.zeros(k, dtype=s.dtype, device=s.device).index_add_(0, labels, s)
    w = s / total[labels]
    cross = torch.zeros(n, k, dtype=s.dtype, device=s.device).index_add_(1, labels, gram * w)
    own = w * cross[torch.arange(n, device=s.device), labels]
    norms = torch.zeros(k, dtype=s.dtype, device=s.device).index_add_(0, labels, own)
    return (sq[:, None] - 2.0 * cross + norms[None, :]).clamp_min(0.0)


def _fill_empty(labels: torch.Tensor, dist: torch.Tensor, k: int) -> torch.Tensor:
    """Re-seed every empty cluster with the unit farthest from its centroid (``dist``) among
    the clusters of two or more units; a loop over empty clusters, not units."""
    counts = torch.bincount(labels, minlength=k)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if not empty:
        return labels
    labels, dist = labels.clone(), dist.clone()
    for c in empty:  # units >= k, so some cluster always has two or more units
        j = torch.argmax(torch.where(counts[labels] > 1, dist, -torch.inf))
        counts[labels[j]] -= 1
        counts[c] += 1
        labels[j] = c
    return labels


def _stats(
    x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Weighted means ``T`` (k, samples), weights ``S`` (k,) and grouping error, exactly.

    Empty clusters get ``S_k = 0`` and ``T_k = 0``.
    """
    w = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, labels, s)
    t = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    t.index_add_(0, labels, x * s[:, None])
    t = t / torch.where(w > 0, w, 1.0)[:, None]
    cost = float((s * (x - t[labels]).square().sum(1)).sum())
    return t, w, cost


def _normalize(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every sample column of every parent block divided by its L2 norm over the block."""
    tiny = torch.finfo(x.dtype).tiny
    return torch.cat([b / b.norm(dim=0, keepdim=True).clamp_min(tiny) for b in x.split(sizes)])


def _as_float64(v: torch.Tensor | np.ndarray, name: str, fn: str) -> torch.Tensor:
    t = v.detach() if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"The '{name}' parameter of {fn} must be real. Got {t.dtype} instead.")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"The '{name}' parameter of {fn} must be finite (no NaN or inf).")
    return t


def _check_points(
    z: torch.Tensor | np.ndarray,
    weights: torch.Tensor | np.ndarray,
    fn: str,
    names: tuple[str, str] = ("z", "weights"),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``z`` (units, samples) and ``weights`` (units,) > 0 on ``z``'s device."""
    x = _as_float64(z, names[0], fn)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(
            f"The '{names[0]}' parameter of {fn} must be a 2-D (units, samples) matrix with at "
            f"least one unit. Got shape {tuple(x.shape)} instead."
        )
    s = _as_float64(weights, names[1], fn).to(x.device)
    if s.shape != (x.shape[0],):
        raise ValueError(
            f"The '{names[1]}' parameter of {fn} must have shape ({x.shape[0]},), one "
            f"importance per unit of {names[0]}. Got {tuple(s.shape)} instead."
        )
    if not bool((s > 0).all()):
        raise ValueError(
            f"The '{names[1]}' parameter of {fn} must be positive (importance scores; the "
            f"paper adds 1e-8). Got minimum {float(s.min())} instead."
        )
    return x, s


def _check_labels(
    labels: torch.Tensor | np.ndarray, units: int, k: int | None, fn: str, device: torch.device
) -> torch.Tensor:
    lab = torch.as_tensor(labels).detach()
    if lab.is_floating_point() or lab.is_complex() or lab.shape != (units,):
        raise ValueError(
            f"The 'labels' parameter of {fn} must be an integer tensor of shape ({units},). "
            f"Got {lab.dtype} of shape {tuple(lab.shape)} instead."
        )
    lab = lab.to(device, torch.long)
    hi = int(lab.max())
    if int(lab.min()) < 0 or (k is not None and hi >= int(k)):
        raise ValueError(
            f"The 'labels' parameter of {fn} must lie in [0, {k if k is not None else 'k'}). "
            f"Got values in [{int(lab.min())}, {hi}] instead."
        )
    return lab


def _check_int(name: str, v: object, lo: int, hi: int | None, fn: str) -> None:
    ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    if not ok or v < lo or (hi is not None and v > hi):  # type: ignore[operator]
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"The '{name}' parameter of {fn} must be an int {rng}. Got {v!r} instead.")


def _check_sizes(sizes: Sequence[int] | None, units: int) -> list[int]:
    if sizes is None:
        return [units]
    out = [int(n) for n in sizes]
    if not out or min(out) < 1 or sum(out) != units:
        raise ValueError(
            f"The 'sizes' parameter of weighted_kmeans must be positive parent widths summing "
            f"to the {units} units of z. Got {list(sizes)} instead."
        )
    return out
