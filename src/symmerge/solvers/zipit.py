"""ZipIt!'s greedy zip: merge the most similar features of N models, within models too.

Given the similarity ``S`` ((T x T), ``T = sum_m n_m``) of the concatenated units of N models
(model-major: model 0's units first), the zip starts from T singleton clusters and repeats:

1. take the most similar pair of current clusters ``(i, j)``, ``i < j`` (the first maximum of
   ``S`` in row-major order; the diagonal is masked);
2. merge them; the new cluster's similarity to every other cluster ``k`` becomes
   ``alpha * min(S[i, k], S[j, k])`` (``alpha`` in [0, 1]; with ``alpha = 0`` it is never
   merged again);
3. a cluster belongs to the model of its lowest unit (as in the paper's code); a merge of two
   clusters of one model m is a *within-model* merge, and each model may make at most
   ``floor(beta * floor(merges / N))`` of them, where ``merges = T - width``; once a model's
   budget is spent, pairs of its clusters are masked;

until ``width`` clusters remain (default ``n_0``, model 0's width; any width in
``[n_0, T]``; ``width = T`` merges nothing). Each cluster is one merged unit, numbered by its
lowest unit index. With the 0/1 assignment ``P`` (T x width, ``P[u, c] = 1`` when unit u is in
cluster c) and cluster sizes ``c = P.sum(0)``, model m's maps are

    U_m = P_m                  (n_m x width: each model unit reads its merged unit)
    M_m = (P_m / c)^T          (width x n_m: each merged unit is the mean of its members)

so that ``sum_m M_m U_m = diag(1/c) P^T P = I``: unmerging and merging again is the identity
on merged units, while ``M_m U_m = diag(c_m / c)`` alone is not.

Blocked groups (GroupNorm groups, attention heads): no merged unit may mix blocks. The blocks
of every model are first paired with model 0's by the exact blocked assignment of activation
matching (:func:`symmerge.solvers.lap.solve_lap` with ``blocks``) or a given pairing (shared
attention heads); then each set of paired blocks is zipped on its own to the block width, with
the same ``alpha`` and ``beta`` (budgets per block set). The width of a blocked group cannot change.

.. note::
    ``beta = 0`` forbids merging two clusters of one model, but a cluster of model A that
    already holds a unit of B may still take a second unit of B when ``alpha > 0``. With
    ``alpha = 0`` and ``beta = 0`` two models are matched one to one (a greedy matching, the
    paper's "permute" limit; not the optimal assignment). With ``alpha = 0`` a unit merges at
    most once, so 3 or more models cannot reach width ``n``.

Reference: Stoica, Bolya, Bjorner, Ramesh, Hearn, Hoffman, "ZipIt! Merging Models from
Different Tasks without Training", ICLR 2024, https://arxiv.org/abs/2305.03053
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from symmerge.groupmap import GroupMap
from symmerge.solvers.lap import solve_lap

__all__ = ["ZipResult", "greedy_zip", "zip_labels", "zip_map", "zip_match"]


@dataclass(frozen=True)
class ZipResult:
    """The clusters of a zip.

    Attributes:
        labels: (T,) int64, the merged unit of every unit of the concatenation.
        values: (merges,) float64, the similarity of every accepted merge, in order.
        within: (N,) int64, the within-model merges of every model (at most its budget).
    """

    labels: torch.Tensor
    values: torch.Tensor
    within: torch.Tensor

    @property
    def objective(self) -> float:
        """Mean similarity of the accepted merges (0 when nothing was merged)."""
        return float(self.values.mean()) if self.values.numel() else 0.0


def greedy_zip(
    corr: torch.Tensor | np.ndarray,
    sizes: Sequence[int],
    width: int | None = None,
    *,
    alpha: float = 0.5,
    beta: float = 1.0,
) -> ZipResult:
    """The greedy zip of the module docstring on one (unblocked) similarity matrix.

    Args:
        corr: (T x T) symmetric similarity of the concatenated units (e.g. Pearson
            correlation from :meth:`symmerge.stats.ActivationStats.correlation`).
        sizes: units of each model, ``sum(sizes) == T``.
        width: clusters to keep, in ``[sizes[0], T]`` (default ``sizes[0]``).
        alpha: in [0, 1], similarity kept by a merged cluster (``alpha * min``); 0: never
            merged again.
        beta: in [0, 1], share of the merges each model may spend within itself.

    Returns:
        :class:`ZipResult`. Each merge costs O(T) plus a rescan of the rows whose cached
        maximum was merged away (a few), and O(T^2) when a budget runs out (at most N
        times); memory O(T^2).

    Raises:
        ValueError: bad shapes or parameters, or no allowed pair is left before ``width``
            (e.g. ``alpha = 0`` with 3 models and width ``n``: a unit merges at most once).
    """
    s = _check(corr, sizes, width, alpha, beta)
    t, n_models = s.shape[0], len(sizes)
    width = int(sizes[0]) if width is None else int(width)
    merges = t - width
    model = np.repeat(np.arange(n_models), sizes)  # a cluster's model is its lowest unit's
    budget = np.full(n_models, int(beta * (merges // n_models) + 1e-4))
    within = np.zeros(n_models, dtype=np.int64)
    rep = np.arange(t)  # the cluster (its lowest unit) of every unit
    np.fill_diagonal(s, -np.inf)
    raw = s.copy()  # similarities; ``s`` also masks the pairs of spent models
    for m in np.nonzero(budget <= 0)[0]:
        _mask_model(s, model == m)
    row_max, row_arg = s.max(1), s.argmax(1)
    values = np.empty(merges)
    for step in range(merges):
        i = int(row_max.argmax())
        if row_max[i] == -np.inf:
            raise ValueError(
                f"zip cannot reach width {width}: no allowed pair is left after {step} of "
                f"{merges} merges (alpha={alpha}, beta={beta}, sizes {list(sizes)}); use a "
                "larger width, alpha > 0 or a larger beta"
            )
        values[step] = row_max[i]
        a, b = sorted((i, int(row_arg[i])))
        rep[rep == b] = a
        new = alpha * np.minimum(raw[a], raw[b]) if alpha > 0 else np.full(t, -np.inf)
        new[a] = -np.inf
        for x in (raw, s):
            x[a], x[:, a] = new, new
            x[b], x[:, b] = -np.inf, -np.inf
        m = model[a]
        if m == model[b]:
            within[m] += 1
            if within[m] == budget[m]:  # budget spent: mask the model's pairs
                _mask_model(s, model == m)
                row_max, row_arg = s.max(1), s.argmax(1)
                continue
        if within[m] >= budget[m]:  # the new cluster belongs to a spent model
            same = model == m
            s[a, same], s[same, a] = -np.inf, -np.inf
        # cached row maxima: rows that pointed at a or b are recomputed, the rest see s[:, a]
        stale = (row_arg == a) | (row_arg == b)
        stale[a] = stale[b] = True
        col = s[:, a]
        better = (col > row_max) | ((col == row_max) & (a < row_arg))
        row_max = np.where(better, col, row_max)
        row_arg = np.where(better, a, row_arg)
        rows = np.nonzero(stale)[0]
        row_max[rows], row_arg[rows] = s[rows].max(1), s[rows].argmax(1)
    _, labels = np.unique(rep, return_inverse=True)
    labels = torch.from_numpy(labels.astype(np.int64))
    return ZipResult(labels, torch.from_numpy(values), torch.from_numpy(within))


def zip_labels(
    corr: torch.Tensor | np.ndarray,
    sizes: Sequence[int],
    width: int | None = None,
    *,
    alpha: float = 0.5,
    beta: float = 1.0,
    blocks: int | None = None,
    block_pairing: Sequence[torch.Tensor] | None = None,
) -> ZipResult:
    """:func:`greedy_zip`, or for a blocked group the zip of every set of paired blocks.

    Args:
        blocks: number of blocks of the group (every model has the same width ``n``, a
            multiple of ``blocks``); merged block b holds units of block
            ``block_pairing[m][b]`` of every model m only, and the width stays ``n``.
        block_pairing: one (blocks,) index vector per model (model 0: ``arange``); default
            the blocked assignment of every model to model 0 on ``corr``'s cross blocks.
    """
    if not blocks:
        return greedy_zip(corr, sizes, width, alpha=alpha, beta=beta)
    s = _check(corr, sizes, width, alpha, beta)
    n = int(sizes[0])
    if len(set(sizes)) != 1 or n % blocks:
        raise ValueError(
            f"a blocked zip needs equal widths that are a multiple of blocks={blocks}; got "
            f"sizes {list(sizes)}"
        )
    if width is not None and int(width) != n:
        raise ValueError(
            f"the width of a blocked group (GroupNorm groups, attention heads) cannot change: "
            f"width must be {n}, got {width}"
        )
    w, n_models = n // blocks, len(sizes)
    if block_pairing is None:
        block_pairing = [torch.arange(blocks)]
        for m in range(1, n_models):
            perm = solve_lap(s[:n, m * n : (m + 1) * n], blocks=blocks)
            block_pairing.append(perm.view(blocks, w)[:, 0] // w)
    pairing = [torch.as_tensor(p, dtype=torch.long) for p in block_pairing]
    if len(pairing) != n_models or any(
        p.shape != (blocks,) or not torch.equal(p.sort().values, torch.arange(blocks))
        for p in pairing
    ):
        raise ValueError(f"block_pairing needs one permutation of range({blocks}) per model")
    labels = torch.empty(n_models * n, dtype=torch.long)
    values, within = [], torch.zeros(n_models, dtype=torch.long)
    for b in range(blocks):
        idx = torch.cat([m * n + int(p[b]) * w + torch.arange(w) for m, p in enumerate(pairing)])
        sub = greedy_zip(s[np.ix_(idx.numpy(), idx.numpy())], [w] * n_models, w,
                         alpha=alpha, beta=beta)  # fmt: skip
        labels[idx] = b * w + sub.labels
        values.append(sub.values)
        within += sub.within
    return ZipResult(labels, torch.cat(values), within)


def zip_map(
    labels: torch.Tensor,
    sizes: Sequence[int],
    weights: Sequence[float] | None = None,
) -> GroupMap:
    """The GroupMap of a clustering: ``U_m = P_m``, ``M_m = (P_m / c)^T`` (module docstring).

    ``weights`` are the model shares for tensors outside every group (default uniform).
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    width = int(labels.max()) + 1
    assign = torch.zeros(labels.numel(), width, dtype=torch.float64)
    assign[torch.arange(labels.numel()), labels] = 1.0
    count = assign.sum(0)
    if bool((count == 0).any()):
        raise ValueError("labels must use every merged unit 0..max at least once")
    parts = assign.split([int(n) for n in sizes])
    merges = [(p / count).T for p in parts]
    n = len(sizes)
    return GroupMap.from_matrices(merges, list(parts), weights or [1.0 / n] * n)


def zip_match(
    corr: torch.Tensor | np.ndarray,
    sizes: Sequence[int],
    width: int | None = None,
    *,
    alpha: float = 0.5,
    beta: float = 1.0,
    blocks: int | None = None,
    block_pairing: Sequence[torch.Tensor] | None = None,
) -> GroupMap:
    """The zip of one group as a GroupMap (:func:`zip_labels`, then :func:`zip_map`).

    Example:
        >>> corr = torch.tensor([[1.0, 0.1, 0.9, 0.0], [0.1, 1.0, 0.2, 0.8],
        ...                      [0.9, 0.2, 1.0, 0.3], [0.0, 0.8, 0.3, 1.0]])
        >>> gm = zip_match(corr, [2, 2])  # unit 0 of A with unit 0 of B, 1 with 1
        >>> gm.merge_matrix(1)
        tensor([[0.5000, 0.0000],
                [0.0000, 0.5000]], dtype=torch.float64)
    """
    res = zip_labels(corr, sizes, width, alpha=alpha, beta=beta, blocks=blocks,
                     block_pairing=block_pairing)  # fmt: skip
    return zip_map(res.labels, sizes)


# ---------------------------------------------------------------------------------------


def _check(
    corr: torch.Tensor | np.ndarray,
    sizes: Sequence[int],
    width: int | None,
    alpha: float,
    beta: float,
) -> np.ndarray:
    """A float64 copy of ``corr`` after checking every argument."""
    s = (corr.detach().cpu().double().numpy() if isinstance(corr, torch.Tensor)
         else np.asarray(corr, dtype=np.float64)).copy()  # fmt: skip
    t = sum(int(n) for n in sizes)
    if len(sizes) < 2 or min(int(n) for n in sizes) < 1:
        raise ValueError(f"zip needs at least 2 models of positive width, got sizes {sizes}")
    if s.shape != (t, t):
        raise ValueError(f"corr must be ({t}, {t}) for sizes {list(sizes)}, got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("corr must be finite (the zip masks pairs itself)")
    for name, v in (("alpha", alpha), ("beta", beta)):
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)):
            raise ValueError(f"The '{name}' parameter of zip must be a float. Got {v!r} instead.")
        if not 0.0 <= v <= 1.0:
            raise ValueError(
                f"The '{name}' parameter of zip must be a float in [0, 1]. Got {v!r} instead."
            )
    if width is not None and not (
        isinstance(width, (int, np.integer)) and int(sizes[0]) <= int(width) <= t
    ):
        raise ValueError(
            f"The 'width' parameter of zip must be an int in [{int(sizes[0])}, {t}]. Got "
            f"{width!r} instead."
        )
    return s


def _mask_model(s: np.ndarray, rows: np.ndarray) -> None:
    """Mask (-inf) every pair of clusters of one model (``rows``: its units)."""
    idx = np.nonzero(rows)[0]
    s[np.ix_(idx, idx)] = -np.inf
