"""Grouping of neuron-interpolation fusion (algorithms.md §5(b)): Theorem 1's decomposition,
weighted K-means (centroids, no empty cluster, determinism, recovery of permuted copies,
normalisation) and Hungarian pairing (Thm 2a cost, brute force, recovery), bad input."""

from __future__ import annotations

import itertools

import pytest
import torch

from symmerge.solvers.kmeans import (
    decomposition,
    from_labels,
    hungarian_pairs,
    pair_clusters,
    pair_costs,
    weighted_kmeans,
)
from symmerge.solvers.lap import lap_objective

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- helpers --------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _data(units: int, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random float64 vectors and positive importances (spread over two decades)."""
    g = _gen(seed)
    z = torch.randn(units, samples, generator=g, dtype=torch.float64)
    s = 10 ** (2 * torch.rand(units, generator=g, dtype=torch.float64) - 1)
    return z, s


def _copies(k: int, samples: int, n: int, noise: float, seed: int):
    """``n`` parents holding noisy, permuted copies of ``k`` well separated neuron vectors:
    unit ``i`` of parent m is base vector ``perms[m][i]``."""
    g = _gen(seed)
    base = 10 * torch.randn(k, samples, generator=g, dtype=torch.float64)
    perms = [torch.randperm(k, generator=g) for _ in range(n)]
    z = torch.cat([base[p] + noise * torch.randn(k, samples, generator=g) for p in perms])
    s = 0.5 + torch.rand(n * k, generator=g, dtype=torch.float64)
    return z, s, perms


def _weighted_means(z: torch.Tensor, s: torch.Tensor, labels: torch.Tensor, k: int):
    """Cluster means by their definition, one cluster at a time."""
    rows = []
    for c in range(k):
        m = labels == c
        rows.append((s[m, None] * z[m]).sum(0) / s[m].sum())
    return torch.stack(rows)


def _assert_recovered(labels: torch.Tensor, perms: list[torch.Tensor], k: int) -> None:
    """Every cluster holds exactly the units that copy one base vector, one per parent."""
    base_of = torch.cat(perms)
    for c in range(k):
        members = torch.nonzero(labels == c).flatten()
        assert len(members) == len(perms)
        assert sorted((members // k).tolist()) == list(range(len(perms)))
        assert len(set(base_of[members].tolist())) == 1


# ---- Theorem 1 ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_decomposition_identity(seed: int) -> None:
    z, s = _data(30, 17, seed)
    k = 7
    labels = torch.randint(k - 1, (30,), generator=_gen(seed))  # cluster k - 1 stays empty
    f = 3 * torch.randn(k, 17, generator=_gen(100 + seed), dtype=torch.float64)
    total, approx, grouping = decomposition(z, s, labels, f)
    direct = float((s * (f[labels] - z).square().sum(1)).sum())
    assert total == pytest.approx(direct, rel=1e-12)
    assert total == pytest.approx(approx + grouping, rel=1e-9, abs=1e-9)
    means = _weighted_means(z, s, labels, k - 1)
    t = torch.cat([means, f[-1:]])  # F = T: nothing left to approximate
    total_t, approx_t, grouping_t = decomposition(z, s, labels, t)
    assert approx_t == pytest.approx(0.0, abs=1e-9)
    assert total_t == pytest.approx(grouping, rel=1e-12)
    assert grouping_t == pytest.approx(grouping, rel=1e-12)


def test_decomposition_needs_the_weighted_mean() -> None:
    """The cross term vanishes only at the weighted mean: the plain mean breaks the identity."""
    z, s = _data(12, 5, 0)
    labels = torch.arange(12) % 3
    f = torch.randn(3, 5, generator=_gen(1), dtype=torch.float64)
    plain = torch.stack([z[labels == c].mean(0) for c in range(3)])
    total = float((s * (f[labels] - z).square().sum(1)).sum())
    w = torch.stack([s[labels == c].sum() for c in range(3)])
    split = float((w * (f - plain).square().sum(1)).sum()) + float(
        (s * (plain[labels] - z).square().sum(1)).sum()
    )
    assert abs(total - split) > 1e-3
    total2, approx2, grouping2 = decomposition(z, s, labels, f)
    assert total2 == pytest.approx(approx2 + grouping2, rel=1e-9)


# ---- weighted K-means -----------------------------------------------------------------------


@pytest.mark.parametrize("init", ["farthest", "first"])
def test_centroids_are_weighted_means(init: str) -> None:
    z, s = _data(60, 9, 3)
    res = weighted_kmeans(z, s, 8, init=init, tol=0.0, max_iter=500)
    assert res.labels.dtype == torch.int64 and res.labels.shape == (60,)
    assert int(res.labels.min()) >= 0 and int(res.labels.max()) < 8
    torch.testing.assert_close(res.centroids, _weighted_means(z, s, res.labels, 8))
    weights = torch.stack([s[res.labels == c].sum() for c in range(8)])
    torch.testing.assert_close(res.weights, weights)
    grouping = decomposition(z, s, res.labels, res.centroids)[2]
    assert res.cost == pytest.approx(grouping, rel=1e-12)
    # converged Lloyd: every unit is at a nearest centroid
    d2 = torch.cdist(z, res.centroids).square()
    own = d2.gather(1, res.labels[:, None])[:, 0]
    assert bool((own <= d2.min(1).values + 1e-9).all())
    assert 1 <= res.iterations <= 500 and res.k == 8


def test_from_labels_matches_kmeans() -> None:
    z, s = _data(40, 6, 4)
    res = weighted_kmeans(z, s, 5)
    again = from_labels(z, s, res.labels)
    torch.testing.assert_close(again.centroids, res.centroids)
    assert again.cost == pytest.approx(res.cost, rel=1e-12) and again.iterations == 0
    with pytest.raises(ValueError, match="empty"):
        from_labels(z, s, res.labels, k=6)


def _adversarial() -> list[tuple[str, torch.Tensor, int]]:
    g = _gen(7)
    pts = torch.randn(5, 4, generator=g, dtype=torch.float64)
    dup = pts.repeat_interleave(4, 0)  # 20 units, 5 distinct points
    z12 = torch.randn(12, 4, generator=g, dtype=torch.float64)
    return [
        ("k == units", z12, 12),
        ("k == units - 1", z12, 11),
        ("duplicates, k > distinct", dup, 8),
        ("duplicates, k == units", dup, 20),
        ("duplicates, k == units - 1", dup, 19),
        ("all equal", torch.ones(10, 3, dtype=torch.float64), 6),
        ("all equal, k == units", torch.ones(10, 3, dtype=torch.float64), 10),
        ("one sample", torch.randn(9, 1, generator=g, dtype=torch.float64), 8),
        ("k == 1", z12, 1),
    ]


@pytest.mark.parametrize("init", ["farthest", "first"])
@pytest.mark.parametrize("case", _adversarial(), ids=lambda c: c[0])
def test_no_empty_clusters(case: tuple[str, torch.Tensor, int], init: str) -> None:
    _, z, k = case
    s = 0.5 + torch.rand(z.shape[0], generator=_gen(1), dtype=torch.float64)
    for seed in range(3):
        res = weighted_kmeans(z, s, k, init=init, restarts=3, tol=0.0, seed=seed)
        counts = torch.bincount(res.labels, minlength=k)
        assert counts.numel() == k and bool((counts >= 1).all())
        assert bool(torch.isfinite(res.centroids).all())
        torch.testing.assert_close(res.centroids, _weighted_means(z, s, res.labels, k))
    if k == z.shape[0]:  # one unit per cluster: nothing is lost
        assert res.cost == pytest.approx(0.0, abs=1e-12)


def test_duplicates_reach_zero_cost() -> None:
    """5 distinct points, each 4 times: k = 5 groups the copies exactly."""
    pts = 10 * torch.randn(5, 4, generator=_gen(2), dtype=torch.float64)
    z = pts.repeat_interleave(4, 0)
    res = weighted_kmeans(z, torch.ones(20, dtype=torch.float64), 5)
    assert res.cost == pytest.approx(0.0, abs=1e-9)
    assert [len(set(res.labels[4 * i : 4 * i + 4].tolist())) for i in range(5)] == [1] * 5


def test_deterministic_given_seed() -> None:
    z, s = _data(80, 12, 5)
    a = weighted_kmeans(z, s, 10, restarts=4, seed=11)
    b = weighted_kmeans(z, s, 10, restarts=4, seed=11)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)
    assert a.cost == b.cost and a.iterations == b.iterations
    # no structure: other seeds start elsewhere and end in other local optima
    costs = {weighted_kmeans(z, s, 10, restarts=4, seed=t).cost for t in range(11, 15)}
    assert len(costs) > 1
    # restarts keep the best start: never worse than one start of the same seed
    one = weighted_kmeans(z, s, 10, restarts=1, seed=11)
    assert a.cost <= one.cost + 1e-12
    # init="first" uses no randomness
    f1 = weighted_kmeans(z, s, 10, init="first", seed=0)
    f2 = weighted_kmeans(z, s, 10, init="first", seed=99)
    assert torch.equal(f1.labels, f2.labels)


@pytest.mark.parametrize("init", ["farthest", "first"])
@pytest.mark.parametrize("n_parents", [2, 3, 5])
def test_recovers_permuted_copies(init: str, n_parents: int) -> None:
    z, s, perms = _copies(16, 32, n_parents, noise=0.3, seed=n_parents)
    res = weighted_kmeans(z, s, 16, init=init)
    _assert_recovered(res.labels, perms, 16)


def test_recovers_at_scale() -> None:
    """2 x 512 units over 2000 samples (the speed sanity case of the issue, not timed)."""
    z, s, perms = _copies(512, 2000, 2, noise=1.0, seed=0)
    res = weighted_kmeans(z, s, 512, restarts=2)
    _assert_recovered(res.labels, perms, 512)
    perm = hungarian_pairs(z[:512], z[512:], s[:512], s[512:])
    hf = pair_clusters(perm)
    _assert_recovered(hf, perms, 512)
    # HF and KF find the same partition, numbered by parent a's units
    assert torch.equal(res.labels[:512][hf], res.labels)


def test_normalize_per_parent_and_sample() -> None:
    """With ``sizes``, every sample column of every parent is scaled to unit norm: rescaling
    a parent's sample columns by positive factors changes no label, and the targets stay the
    weighted means of the raw vectors."""
    z, s, perms = _copies(8, 20, 2, noise=0.2, seed=3)
    scale = 0.1 + 5 * torch.rand(2, 1, 20, generator=_gen(4), dtype=torch.float64)
    zs = (z.view(2, 8, 20) * scale).view(16, 20)
    a = weighted_kmeans(z, s, 8, normalize=True, sizes=[8, 8], seed=1)
    b = weighted_kmeans(zs, s, 8, normalize=True, sizes=[8, 8], seed=1)
    assert torch.equal(a.labels, b.labels)
    _assert_recovered(b.labels, perms, 8)
    torch.testing.assert_close(b.centroids, _weighted_means(zs, s, b.labels, 8))
    assert b.cost == pytest.approx(decomposition(zs, s, b.labels, b.centroids)[2], rel=1e-12)
    # a zero sample (dead units) stays zero instead of NaN
    zs[:, 0] = 0.0
    c = weighted_kmeans(zs, s, 8, normalize=True, sizes=[8, 8])
    assert bool(torch.isfinite(c.centroids).all())


def test_kmeans_bad_input() -> None:
    z, s = _data(10, 4, 0)
    cases = [
        (dict(k=0), "'k' parameter .* \\[1, 10\\]"),
        (dict(k=11), "'k' parameter .* \\[1, 10\\]"),
        (dict(k=2.0), "'k' parameter"),
        (dict(k=2, init="random"), "'init' parameter"),
        (dict(k=2, restarts=0), "'restarts' parameter"),
        (dict(k=2, max_iter=0), "'max_iter' parameter"),
        (dict(k=2, tol=1.0), "'tol' parameter"),
        (dict(k=2, normalize=True, sizes=[5, 4]), "'sizes' parameter"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            weighted_kmeans(z, s, **kw)
    bad_weights = [-s, torch.zeros(10), s[:9], torch.full((10,), float("nan"))]
    for w in bad_weights:
        with pytest.raises(ValueError, match="'weights' parameter"):
            weighted_kmeans(z, w, 2)
    with pytest.raises(ValueError, match="'z' parameter .* 2-D"):
        weighted_kmeans(z[0], s[:1], 1)
    zn = z.clone()
    zn[0, 0] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        weighted_kmeans(zn, s, 2)
    with pytest.raises(ValueError, match="'labels' parameter"):
        decomposition(z, s, torch.arange(10) % 3, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="targets"):
        decomposition(z, s, torch.arange(10) % 2, torch.zeros(2, 5))


# ---- Hungarian pairing (HF) -----------------------------------------------------------------


def test_pair_cost_is_two_unit_grouping_error() -> None:
    """Thm 2a: s_a s_b / (s_a + s_b) ||z_a - z_b||^2 = s_a ||t - z_a||^2 + s_b ||t - z_b||^2."""
    za, sa = _data(6, 11, 0)
    zb, sb = _data(6, 11, 1)
    cost = pair_costs(za, zb, sa, sb)
    for a, b in itertools.product(range(6), range(6)):
        t = (sa[a] * za[a] + sb[b] * zb[b]) / (sa[a] + sb[b])
        err = sa[a] * (t - za[a]).square().sum() + sb[b] * (t - zb[b]).square().sum()
        assert float(cost[a, b]) == pytest.approx(float(err), rel=1e-9)
        k = weighted_kmeans(torch.stack([za[a], zb[b]]), torch.stack([sa[a], sb[b]]), 1)
        assert float(cost[a, b]) == pytest.approx(k.cost, rel=1e-9)
    # a whole pairing: its LAP objective is the grouping error of its clusters
    perm = hungarian_pairs(za, zb, sa, sb)
    res = from_labels(torch.cat([za, zb]), torch.cat([sa, sb]), pair_clusters(perm))
    assert lap_objective(cost, perm) == pytest.approx(res.cost, rel=1e-9)


@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_hungarian_is_optimal(n: int) -> None:
    za, sa = _data(n, 3, 10 + n)
    zb, sb = _data(n, 3, 20 + n)
    perm = hungarian_pairs(za, zb, sa, sb)
    assert perm.dtype == torch.int64 and sorted(perm.tolist()) == list(range(n))
    cost = pair_costs(za, zb, sa, sb)
    best = min(lap_objective(cost, torch.tensor(p)) for p in itertools.permutations(range(n)))
    assert lap_objective(cost, perm) == pytest.approx(best, rel=1e-12)


def test_hungarian_recovers_permutation() -> None:
    g = _gen(5)
    za = torch.randn(64, 40, generator=g, dtype=torch.float64)
    perm = torch.randperm(64, generator=g)
    zb = torch.empty_like(za)
    zb[perm] = za + 0.1 * torch.randn(64, 40, generator=g, dtype=torch.float64)
    sa, sb = 0.5 + torch.rand(64, generator=g), 0.5 + torch.rand(64, generator=g)
    assert torch.equal(hungarian_pairs(za, zb, sa, sb), perm)
    assert torch.equal(hungarian_pairs(za.float().numpy(), zb.float().numpy(), sa, sb), perm)


def test_pair_clusters() -> None:
    perm = torch.tensor([2, 0, 1])
    labels = pair_clusters(perm)
    assert labels.tolist() == [0, 1, 2, 1, 2, 0]
    for i in range(3):  # unit i of a and unit perm[i] of b share cluster i
        assert labels[i] == labels[3 + perm[i]] == i
    for bad in (torch.tensor([0, 0, 1]), torch.tensor([0, 1, 3]), torch.tensor([0.0, 1.0])):
        with pytest.raises(ValueError, match="permutation"):
            pair_clusters(bad)


def test_hungarian_bad_input() -> None:
    za, sa = _data(4, 3, 0)
    zb, sb = _data(5, 3, 1)
    with pytest.raises(ValueError, match="equal width.*weighted_kmeans"):
        hungarian_pairs(za, zb, sa, sb)
    with pytest.raises(ValueError, match="same samples"):
        hungarian_pairs(za, za[:, :2], sa, sa)
    with pytest.raises(ValueError, match="'s_b' parameter"):
        hungarian_pairs(za, za, sa, -sa)
    with pytest.raises(ValueError, match="'backend' parameter"):
        hungarian_pairs(za, za, sa, sa, backend="munkres")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    z, s, perms = _copies(64, 128, 3, noise=0.5, seed=9)
    cpu = weighted_kmeans(z, s, 64, seed=2)
    gpu = weighted_kmeans(z.cuda(), s.cuda(), 64, seed=2)
    assert gpu.labels.is_cuda and torch.equal(gpu.labels.cpu(), cpu.labels)
    torch.testing.assert_close(gpu.centroids.cpu(), cpu.centroids)
    _assert_recovered(gpu.labels.cpu(), perms, 64)
