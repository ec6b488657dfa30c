"""Matching: LAP solvers, similarities, weight / activation matching, MergeMany, the registry.

The central invariant (algorithms.md section 6.4, item 2): a model and a randomly permuted copy
of it are matched back exactly (the permutation found is the inverse of the applied one) and
the merged model equals the original.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from _toy_models import Attention, Branches
from scipy.optimize import linear_sum_assignment
from torch import nn

import symmerge
from symmerge.groupmap import build_state_dict
from symmerge.methods import (
    MergeResult,
    get_method,
    list_methods,
    method_info,
    register_method,
)
from symmerge.models import ZOO_NAMES, create_model
from symmerge.similarity import (
    WeightSimilarity,
    activation_similarity,
    activation_similarity_from_moments,
    mix,
    weight_similarity,
)
from symmerge.solvers import (
    centre_prices,
    coordinates,
    lap_objective,
    merge_many,
    solve_kronecker,
    solve_lap,
    solve_shared_blocks,
    warm_lap,
    weight_matching,
)
from symmerge.spec import SymmetrySpec

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- models ----------------------------------------------------------------------------------


_CUSTOM = {"branches": Branches, "attention": Attention}


@functools.cache
def _spec(name: str) -> SymmetrySpec:
    model = _CUSTOM[name]() if name in _CUSTOM else create_model(name)[0]
    return symmerge.trace(model.eval(), torch.randn(2, *model.input_shape))


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = _CUSTOM[name]() if name in _CUSTOM else create_model(name)[0]
    if isinstance(model, Branches):
        with torch.no_grad():
            model.bn.running_mean.normal_()
            model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _permuted(spec: SymmetrySpec, model: nn.Module, seed: int) -> tuple[nn.Module, dict]:
    applied = spec.random_permutations(seed=seed)
    return spec.permuted(model, applied), applied


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _brute_force(C: np.ndarray, maximize: bool = True) -> float:
    n, m = C.shape
    best = -np.inf if maximize else np.inf
    if n <= m:
        for cols in itertools.permutations(range(m), n):
            v = C[np.arange(n), list(cols)].sum()
            best = max(best, v) if maximize else min(best, v)
    else:
        for rows in itertools.permutations(range(n), m):
            v = C[list(rows), np.arange(m)].sum()
            best = max(best, v) if maximize else min(best, v)
    return float(best)


# ---- LAP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (4, 4), (6, 6), (3, 5), (5, 3), (2, 6)])
@pytest.mark.parametrize("maximize", [True, False])
def test_lap_is_optimal_and_feasible(shape: tuple[int, int], maximize: bool) -> None:
    rng = np.random.default_rng(sum(shape))
    C = rng.normal(size=shape)
    perm = solve_lap(torch.from_numpy(C), maximize=maximize)
    assert perm.dtype == torch.int64 and perm.shape == (shape[0],)
    assigned = perm[perm >= 0]
    assert len(assigned) == min(shape) and len(set(assigned.tolist())) == len(assigned)
    assert int(assigned.max()) < shape[1]
    assert lap_objective(C, perm) == pytest.approx(_brute_force(C, maximize))
    r, c = linear_sum_assignment(C, maximize=maximize)
    assert lap_objective(C, perm) == pytest.approx(C[r, c].sum())


def test_lap_on_a_permuted_identity_returns_the_inverse() -> None:
    p = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    C = torch.eye(50)[p]  # C[i, j] = 1 iff j == p[i]
    assert torch.equal(solve_lap(C), p)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 64])
def test_warm_lap_is_exact_from_any_start_and_keeps_an_optimum(n: int) -> None:
    rng = np.random.default_rng(n)
    C = rng.normal(size=(n, n))
    r, c = linear_sum_assignment(C, maximize=True)
    best = C[r, c].sum()
    for start in (np.arange(n), rng.permutation(n)):  # cold: zero prices
        x, v, _ = warm_lap(C, start)
        assert sorted(x.tolist()) == list(range(n))
        assert C[np.arange(n), x].sum() == pytest.approx(best, abs=1e-10)
        red = C - v[None, :]  # the prices prove it: each row's column maximizes C - v
        np.testing.assert_allclose(red[np.arange(n), x], red.max(1), atol=1e-10)
    y, w, released = warm_lap(C, x, v, tol=1e-12)  # its own prices: nothing moves
    assert released == 0 and np.array_equal(y, x) and np.array_equal(w, v)
    for _ in range(5):  # drift: warm starts stay exact
        C = C + 0.05 * rng.normal(size=(n, n))
        x, v, _ = warm_lap(C, x, v)
        r, c = linear_sum_assignment(C, maximize=True)
        assert C[np.arange(n), x].sum() == pytest.approx(C[r, c].sum(), abs=1e-10)


@pytest.mark.parametrize("n", [2, 9, 40])
def test_centred_prices_stay_feasible_and_open_zero_slacks(n: int) -> None:
    rng = np.random.default_rng(n)
    C = rng.standard_normal((n, n))
    x, v, _ = warm_lap(C, np.arange(n))
    ca = C[:, x]  # the optimal assignment on the diagonal

    def slacks(prices: np.ndarray) -> np.ndarray:
        w = prices[x]
        s = (ca.diagonal() - w)[:, None] - (ca - w[None, :])
        return s[~np.eye(n, dtype=bool)]

    before, after = slacks(v), slacks(centre_prices(C, x, v, 12))
    assert before.min() >= -1e-12 and after.min() >= -1e-12  # both prove x optimal
    assert before.min() <= 1e-12  # a solve's prices have tight pairs
    assert after.min() > 1e-3 * np.abs(before).max()  # centred: every pair has slack
    assert np.array_equal(centre_prices(C, x, v, 0), v)


def test_warm_lap_matches_scipy_on_many_random_and_tied_instances() -> None:
    """Integer and rounded costs make ties, which stress the row reduction's tie branch."""
    rng = np.random.default_rng(5)
    for t in range(300):
        n = int(rng.integers(1, 30))
        C = rng.integers(0, 4, (n, n)).astype(float) if t % 3 == 0 else rng.normal(size=(n, n))
        C = np.round(C, 1) if t % 3 == 2 else C
        prices = None if t % 2 else rng.normal(size=n)  # cold, or stale prices from elsewhere
        x, v, _ = warm_lap(C, rng.permutation(n), prices)
        r, c = linear_sum_assignment(C, maximize=True)
        assert sorted(x.tolist()) == list(range(n))
        assert C[np.arange(n), x].sum() == pytest.approx(C[r, c].sum(), abs=1e-9)
        red = C - v[None, :]
        np.testing.assert_allclose(red[np.arange(n), x], red.max(1), atol=1e-9)


def test_warm_lap_with_ties_and_bad_shapes() -> None:
    x, v, _ = warm_lap(np.ones((5, 5)), np.arange(5)[::-1].copy())
    assert sorted(x.tolist()) == list(range(5))  # every assignment is optimal
    p = np.random.default_rng(0).permutation(30)
    x, _, _ = warm_lap(np.eye(30)[p], np.arange(30))
    assert np.array_equal(x, p)
    with pytest.raises(ValueError, match="square"):
        warm_lap(np.ones((3, 4)), np.arange(3))
    with pytest.raises(ValueError, match="square"):
        warm_lap(np.ones((3, 3)), np.arange(3), np.zeros(2))
    with pytest.raises(ValueError, match="finite"):
        warm_lap(np.array([[0.0, np.nan], [1.0, 0.0]]), np.arange(2))
    with pytest.raises(ValueError, match="permutation"):
        warm_lap(np.ones((3, 3)), np.array([0, 0, 2]))
    for bad in (np.inf, -np.inf):
        with pytest.raises(ValueError, match="finite"):
            warm_lap(np.array([[0.0, bad], [1.0, 0.0]]), np.arange(2))


def test_warm_lap_relative_tolerance_scales_with_the_similarities() -> None:
    """A row short of optimal by less than ``rtol * max|C|`` stays; by more, it is released."""
    rng = np.random.default_rng(3)
    C = 1e6 * rng.normal(size=(20, 20))
    x, v, _ = warm_lap(C, np.arange(20))
    red = C - v[None, :]
    i = 0
    others = red[i].copy()
    others[x[i]] = -np.inf
    j = int(others.argmax())  # row 0's best other column
    gap = red[i, x[i]] - red[i, j]
    scale = np.abs(C).max()
    D = C.copy()
    D[i, j] += gap + 1e-9 * scale  # now beats row 0's column by 1e-9 of the scale
    _, _, kept = warm_lap(D, x, v, rtol=1e-8)
    _, _, released = warm_lap(D, x, v, rtol=1e-10)
    assert kept == 0 and released >= 1
    assert warm_lap(D, x, v, tol=1e-8 * scale)[2] == 0  # the same slack, given absolutely


@pytest.mark.parametrize("blocks,width", [(3, 2), (2, 3), (2, 5), (4, 1)])
def test_blocked_lap_is_optimal_and_never_crosses_blocks(blocks: int, width: int) -> None:
    n = blocks * width
    rng = np.random.default_rng(n)
    C = rng.normal(size=(n, n))
    perm = solve_lap(C, blocks=blocks).numpy()
    assert sorted(perm.tolist()) == list(range(n))
    src = perm.reshape(blocks, width) // width
    assert (src == src[:, :1]).all()  # every row block lands in one column block
    best = -np.inf  # brute force over all block-respecting permutations
    for order in itertools.permutations(range(blocks)):
        total = 0.0
        for p, q in enumerate(order):
            sub = C[p * width : (p + 1) * width, q * width : (q + 1) * width]
            total += _brute_force(sub)
        best = max(best, total)
    assert lap_objective(C, perm) == pytest.approx(best)


def test_shared_blocks_pick_one_block_permutation_for_all_matrices() -> None:
    rng = np.random.default_rng(0)
    Cs = [rng.normal(size=(6, 6)) for _ in range(2)]
    heads = rng.normal(size=(3, 3))
    block_perm, perms = solve_shared_blocks(Cs, 3, block_similarity=heads)
    for perm in perms:
        assert torch.equal(perm.view(3, 2)[:, 0] // 2, block_perm)
    best = -np.inf
    for order in itertools.permutations(range(3)):
        total = sum(heads[p, q] for p, q in enumerate(order))
        for C in Cs:
            total += sum(
                _brute_force(C[2 * p : 2 * p + 2, 2 * q : 2 * q + 2]) for p, q in enumerate(order)
            )
        best = max(best, total)
    got = sum(lap_objective(C, p) for C, p in zip(Cs, perms, strict=True))
    assert got + lap_objective(heads, block_perm) == pytest.approx(best)


def test_kronecker_assignment_recovers_a_planted_product_and_stays_a_local_optimum() -> None:
    """``solve_kronecker``: the planted (block, inner) permutation of a product axis from a
    noisy similarity; on noise alone, neither factor can be improved with the other fixed."""
    rng = np.random.default_rng(0)
    blocks, width = 4, 5
    p, q = rng.permutation(blocks), rng.permutation(width)
    truth = (p[:, None] * width + q[None, :]).reshape(-1)
    C = 0.3 * rng.normal(size=(20, 20))
    C[np.arange(20), truth] += 1.0
    got_p, got_q = solve_kronecker(C, blocks)
    assert got_p.tolist() == p.tolist() and got_q.tolist() == q.tolist()
    C = rng.normal(size=(20, 20))
    got_p, got_q = solve_kronecker(C, blocks)
    pairs = C.reshape(blocks, width, blocks, width)

    def total(pp: np.ndarray, qq: np.ndarray) -> float:
        return float(pairs[np.arange(blocks)[:, None], np.arange(width), pp[:, None], qq].sum())

    best = total(got_p.numpy(), got_q.numpy())
    for order in itertools.permutations(range(width)):
        assert total(got_p.numpy(), np.array(order)) <= best + 1e-9
    for order in itertools.permutations(range(blocks)):
        assert total(np.array(order), got_q.numpy()) <= best + 1e-9
    with pytest.raises(ValueError, match="multiple of"):
        solve_kronecker(np.zeros((6, 6)), 4)


def test_lap_errors() -> None:
    with pytest.raises(ValueError, match="backend"):
        solve_lap(torch.eye(2), backend="nope")
    with pytest.raises(ValueError, match="NaN"):
        solve_lap(torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="multiple of blocks"):
        solve_lap(torch.eye(5), blocks=2)


def test_lapx_backend_gives_the_scipy_objective() -> None:
    pytest.importorskip("lap", reason="lapx is optional")
    rng = np.random.default_rng(1)
    for shape in [(8, 8), (5, 9), (9, 5)]:
        C = rng.normal(size=shape)
        a, b = solve_lap(C, backend="lapx"), solve_lap(C)
        assert lap_objective(C, a) == pytest.approx(lap_objective(C, b))


# ---- similarities ------------------------------------------------------------------------------


def test_weight_similarity_peaks_at_the_inverse_permutation() -> None:
    spec = _spec("resnet20x1")
    model = _model("resnet20x1")
    perm_model, applied = _permuted(spec, model, seed=1)
    back = {g: torch.argsort(p) for g, p in applied.items()}
    sa, sb = model.state_dict(), perm_model.state_dict()
    for kind in ("inner", "corr", "cos"):
        sim = WeightSimilarity(spec, sa, sb, kind=kind, dtype=torch.float64)
        for g in spec.groups:
            C = sim(g, back)  # neighbours already aligned: rows match their units exactly
            assert torch.equal(C.argmax(1), back[g]), (kind, g)
            if kind != "inner":
                assert C.max() <= 1 + 1e-9
                assert torch.allclose(
                    C[torch.arange(len(back[g])), back[g]], torch.ones(1).double()
                )
    one = weight_similarity(spec, "conv1.out", sa, sb, back)
    assert torch.allclose(one.double(), WeightSimilarity(spec, sa, sb)("conv1.out", back).double())


def test_weight_similarity_cache_follows_the_permutations() -> None:
    spec = _spec("mlp")
    sa, sb = _model("mlp", 0).state_dict(), _model("mlp", 1).state_dict()
    sim = WeightSimilarity(spec, sa, sb)
    g0, g1 = list(spec.groups)[:2]
    p = spec.random_permutations(seed=2)
    first = sim(g0, {g1: p[g1]}).clone()
    fresh = WeightSimilarity(spec, sa, sb)(g0, {g1: p[g1]})
    assert torch.allclose(first, fresh)
    other = sim(g0, {g1: torch.arange(spec.groups[g1].size)})  # must not reuse the cache
    assert not torch.allclose(first, other)
    assert torch.allclose(other, WeightSimilarity(spec, sa, sb)(g0, {}))


def test_activation_similarity_kinds_match_direct_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    n, samples = 4, 50
    Z = torch.randn(3 * n, samples, generator=gen, dtype=torch.float64)  # 3 models stacked
    mean, second = Z.mean(1), Z @ Z.T / samples
    za, zb = Z[n : 2 * n], Z[2 * n :]  # model 1 vs model 2

    def get(kind: str) -> torch.Tensor:
        return activation_similarity_from_moments(mean, second, 3, 1, 2, kind=kind, count=samples)

    assert torch.allclose(get("inner"), za @ zb.T / samples)
    ca, cb = za - za.mean(1, keepdim=True), zb - zb.mean(1, keepdim=True)
    assert torch.allclose(get("cov"), ca @ cb.T / samples)
    corr = (ca @ cb.T) / (ca.norm(dim=1)[:, None] * cb.norm(dim=1)[None, :])
    assert torch.allclose(get("corr"), corr)
    assert torch.allclose(get("neg_dist"), -torch.cdist(za, zb))
    assert torch.allclose(get("neg_sqdist"), -(torch.cdist(za, zb) ** 2) / samples)
    Z[0] = 1.0  # a constant unit correlates with nothing
    stats = _Moments({"g": Z}, 3)
    assert torch.equal(
        activation_similarity(stats, "g", 0, 1, kind="corr")[0], torch.zeros(n).double()
    )
    with pytest.raises(ValueError, match="kind"):
        get("nope")


def test_mix() -> None:
    A, B = torch.ones(2, 2), torch.zeros(2, 2)
    assert torch.equal(mix(0.25, A, B), torch.full((2, 2), 0.25))
    with pytest.raises(ValueError, match="alpha"):
        mix(1.5, A, B)


# ---- weight matching: identity recovery ---------------------------------------------------------

# plus every transformer the zoo registers (their heads are blocked groups with a shared
# head permutation)
ZOO = ["mlp", "resnet20x1", "resnet20x1-gn", "vgg11", "branches", "attention"] + [
    n for n in ZOO_NAMES if n.startswith("vit")
]


@pytest.mark.parametrize("name", ZOO)
def test_weight_matching_recovers_a_permuted_copy(name: str) -> None:
    spec, model = _spec(name), _model(name)
    perm_model, applied = _permuted(spec, model, seed=7)
    res = get_method("weight")(spec, [model, perm_model], lam=0.5)
    assert isinstance(res, MergeResult) and res.method == "weight"
    found = res.perms(1)
    for g, grp in spec.groups.items():
        assert torch.equal(found[g], torch.argsort(applied[g])), g
        assert grp.is_valid_permutation(found[g])
    assert _max_diff(res.state_dict, model.state_dict()) < 1e-6
    assert res.iterations >= 1 and res.lap_seconds >= 0 and res.other_seconds > 0
    assert set(res.objective) == set(spec.groups)
    want = model.state_dict()
    for lam in (0.0, 1.0):  # endpoints exactly
        maps = {g: gm.with_weights([1 - lam, lam]) for g, gm in res.maps.items()}
        end = build_state_dict(spec, [want, perm_model.state_dict()], maps)
        assert all(torch.equal(end[k], want[k]) for k in want), lam


def _bottleneck_mlp() -> nn.Module:
    widths = [20, 64, 16, 64, 16, 64, 10]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def test_weight_matching_recovers_a_bottleneck_copy_at_every_visiting_order() -> None:
    """From the identity, coordinate descent stops in a local optimum on these (a first
    sweep reads unsolved neighbours); the dependency sweep starts it at the truth."""
    recovered = {"dependency": 0, "identity": 0}
    for init_seed in range(4):
        torch.manual_seed(init_seed)
        model = _bottleneck_mlp()
        spec = symmerge.trace(model, (torch.randn(2, 20),))
        truth = spec.random_permutations(seed=init_seed + 1)
        sa, sb = model.state_dict(), spec.permuted(model, truth).state_dict()
        for seed in range(5):
            for start, init in (("dependency", None), ("identity", spec.identity_permutations())):
                found = weight_matching(spec, sa, sb, init=init, seed=seed).perms
                recovered[start] += all(
                    torch.equal(found[g], torch.argsort(truth[g])) for g in spec.groups
                )
        found = weight_matching(spec, sa, sb, kind="corr").perms  # MuDSC's similarity
        assert all(torch.equal(found[g], torch.argsort(truth[g])) for g in spec.groups)
    assert recovered == {"dependency": 20, "identity": recovered["identity"]}
    assert recovered["identity"] < 20  # the start is what recovers them
    # groups left out of the search stay fixed, and count as solved
    middle = list(spec.groups)[1:4]
    truth = {g: p if g in middle else torch.arange(len(p)) for g, p in truth.items()}
    sb = spec.permuted(model, truth).state_dict()
    found = weight_matching(spec, sa, sb, groups=middle).perms
    assert all(torch.equal(found[g], torch.argsort(truth[g])) for g in spec.groups)
    # only the tensors whose other axes are solved: the first layer has none unsolved
    sim = WeightSimilarity(spec, sa, sb)
    first, second = list(spec.groups)[:2]
    assert sim.known_share(first, [first]) == pytest.approx((20 + 1) / (20 + 1 + 16))
    assert sim.known_share(second, [first, second]) == pytest.approx((64 + 1) / (64 + 1 + 64))
    assert sim.known_share(second, spec.groups) == 1.0
    ident = spec.identity_permutations()
    assert torch.equal(sim(first, ident, known=spec.groups), sim(first, ident))
    assert torch.equal(
        sim(first, ident, known=[first]), sa["0.weight"] @ sb["0.weight"].T + torch.outer(
            sa["0.bias"], sb["0.bias"])
    )  # fmt: skip
    # correlations of the unit vectors read: [first layer's row, bias]
    va, vb = (torch.cat([s["0.weight"], s["0.bias"][:, None]], 1).double() for s in (sa, sb))
    va, vb = (v - v.mean(1, keepdim=True) for v in (va, vb))
    want = (va / va.norm(dim=1, keepdim=True)) @ (vb / vb.norm(dim=1, keepdim=True)).T
    corr = WeightSimilarity(spec, sa, sb, kind="corr", dtype=torch.float64)
    torch.testing.assert_close(corr(first, ident, known=[first]), want)


def test_weight_matching_of_different_models_improves_and_is_deterministic() -> None:
    spec = _spec("resnet20x1")
    sa, sb = _model("resnet20x1", 0).state_dict(), _model("resnet20x1", 1).state_dict()
    a = weight_matching(spec, sa, sb, seed=3)
    b = weight_matching(spec, sa, sb, seed=3)
    assert all(torch.equal(a.perms[g], b.perms[g]) for g in spec.groups)
    assert a.converged

    def total(perms: dict[str, torch.Tensor]) -> float:
        aligned = spec.permute_state_dict(sb, perms)
        keys = {m.tensor for m in spec.members() if not m.tensor.endswith("running_var")}
        keys = {k for k in keys if not k.endswith("running_mean")}
        return sum(float((sa[k].double() * aligned[k].double()).sum()) for k in keys)

    assert total(a.perms) > total(spec.identity_permutations())
    # the coordinates group the heads of an attention with the groups they steer
    att = _spec("attention")
    joint = [c for c in coordinates(att) if len(c) > 1]
    assert len(joint) == 1 and joint[0][0].endswith("heads") and len(joint[0]) == 3


# ---- MergeMany -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "resnet20x1-gn"])
def test_mergemany_recovers_permuted_copies(name: str) -> None:
    spec, model = _spec(name), _model(name)
    copies = [_permuted(spec, model, seed=s) for s in (11, 12)]
    res = get_method("mergemany")(spec, [model] + [c[0] for c in copies], seed=0)
    assert _max_diff(res.state_dict, model.state_dict()) < 1e-6
    for m, (_, applied) in enumerate(copies, 1):
        assert all(torch.equal(res.perms(m)[g], torch.argsort(applied[g])) for g in spec.groups)
    assert all(
        torch.equal(res.perms(0)[g], torch.arange(grp.size)) for g, grp in spec.groups.items()
    )


def test_mergemany_recovers_bottleneck_copies() -> None:
    """Its first round starts each matching with the dependency sweep (from the identity it
    recovers only the first group of these, for every order seed)."""
    for init_seed in range(2):
        torch.manual_seed(init_seed)
        model = _bottleneck_mlp()
        spec = symmerge.trace(model, (torch.randn(2, 20),))
        truths = [spec.random_permutations(seed=10 * init_seed + k) for k in (1, 2)]
        sds = [model.state_dict()] + [spec.permuted(model, t).state_dict() for t in truths]
        for seed in range(2):
            res = merge_many(spec, sds, seed=seed)
            for m, truth in enumerate(truths, 1):
                found = res.model_perms[m]
                assert all(torch.equal(found[g], torch.argsort(truth[g])) for g in spec.groups)


@pytest.mark.parametrize("method", ["weight", "mergemany", "c2m3"])
def test_depthwise_copies_merge_back(method: str) -> None:
    """MobileNetV2 (inverted residuals, depthwise convolutions): from the identity every
    data-free matcher stopped short of its permuted copies (output off by its whole scale)."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.mobilenet_v2(num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    spec = symmerge.trace(model, (x[:2],))
    copies = [spec.permuted(model, spec.random_permutations(seed=s)) for s in (1, 2)]
    models = [model, copies[0]] if method == "weight" else [model, *copies]
    merged, _ = symmerge.merge(models, method, spec=spec)
    with torch.no_grad():
        want = model(x)
        assert float((merged.eval()(x) - want).abs().max()) < 1e-5 * float(want.abs().max())


def test_mergemany_is_expressed_in_model_zero_order() -> None:
    spec, model = _spec("mlp"), _model("mlp")
    models = [_permuted(spec, model, seed=s) for s in (21, 22, 23)]
    res = merge_many(spec, [m.state_dict() for m, _ in models], seed=1)
    assert res.converged and len(res.model_perms) == 3
    first = models[0][0].state_dict()
    for m, (perm_model, _) in enumerate(models):
        aligned = spec.permute_state_dict(perm_model.state_dict(), res.model_perms[m])
        assert _max_diff(aligned, first) == 0.0


# ---- activation matching ----------------------------------------------------------------------


class _Moments:
    """Stand-in for symmerge.stats results: exact moments of stacked unit activations."""

    def __init__(self, acts: dict[str, torch.Tensor], num_models: int) -> None:
        self.acts, self.num_models = acts, num_models

    def mean(self, group: str) -> torch.Tensor:
        return self.acts[group].mean(1)

    def second_moment(self, group: str) -> torch.Tensor:
        z = self.acts[group]
        return z @ z.T / z.shape[1]

    def count(self, group: str) -> int:
        return int(self.acts[group].shape[1])


def _record(into: list[torch.Tensor], dim: int, _m: nn.Module, _a: Any, out: Any) -> None:
    z = out.detach().double().movedim(dim, 0)
    into.append(z.reshape(z.shape[0], -1))


def _exact_statistics(
    spec: SymmetrySpec,
    models: Sequence[nn.Module],
    batches: Iterable[Any],
    groups: Any = None,
    device: Any = None,
    progress: bool = False,
) -> _Moments:
    """Hooks on the modules whose output is a site of a group; every site adds samples."""
    per_model: list[dict[str, list[torch.Tensor]]] = []
    for model in models:
        found: dict[str, list[torch.Tensor]] = {g: [] for g in spec.groups}
        modules = dict(model.named_modules())
        hooks = []
        for g, grp in spec.groups.items():
            for site in grp.sites:
                if site.module_output:
                    hook = functools.partial(_record, found[g], site.dim)
                    hooks.append(modules[site.module].register_forward_hook(hook))
        with torch.no_grad():
            for x in batches:
                model(x)
        for h in hooks:
            h.remove()
        per_model.append(found)
    acts = {g: torch.cat([torch.cat(f[g], 1) for f in per_model]) for g in spec.groups}
    return _Moments(acts, len(models))


@pytest.mark.parametrize("name", ["mlp", "resnet20x1"])
def test_activation_matching_recovers_a_permuted_copy(name: str) -> None:
    spec, model = _spec(name), _model(name)
    perm_model, applied = _permuted(spec, model, seed=5)
    batches = [torch.randn(8, *model.input_shape, generator=torch.Generator().manual_seed(0))]
    method = get_method("activation")
    res = method(spec, [model, perm_model], data=batches, collect=_exact_statistics)
    assert all(torch.equal(res.perms(1)[g], torch.argsort(applied[g])) for g in spec.groups)
    assert _max_diff(res.state_dict, model.state_dict()) < 1e-6
    stats = _exact_statistics(spec, [model, perm_model], batches)
    for kind in ("inner", "neg_dist"):
        again = method(spec, [model, perm_model], stats=stats, kind=kind)
        assert all(torch.equal(again.perms(1)[g], res.perms(1)[g]) for g in spec.groups), kind


def test_activation_matching_with_the_statistics_module() -> None:
    stats_mod = pytest.importorskip("symmerge.stats", reason="symmerge.stats not available")
    spec, model = _spec("resnet20x1"), _model("resnet20x1")
    perm_model, applied = _permuted(spec, model, seed=5)
    batches = [torch.randn(4, *model.input_shape, generator=torch.Generator().manual_seed(0))]
    # every module output: post-ReLU features alone tie on units dead for the whole batch
    collect = functools.partial(stats_mod.collect_statistics, sites="all")
    res = get_method("activation")(spec, [model, perm_model], data=batches, collect=collect)
    assert all(torch.equal(res.perms(1)[g], torch.argsort(applied[g])) for g in spec.groups)
    assert _max_diff(res.state_dict, model.state_dict()) < 1e-6


def test_activation_matching_needs_data_and_modules() -> None:
    spec, model = _spec("mlp"), _model("mlp")
    with pytest.raises(ValueError, match="needs data"):
        get_method("activation")(spec, [model, model])
    with pytest.raises(ValueError, match="nn.Modules"):
        get_method("activation")(spec, [model.state_dict()] * 2, data=[torch.randn(2, 1, 28, 28)])


# ---- the registry and the simple recipes ----------------------------------------------------


def test_registry() -> None:
    assert {"naive", "weight", "activation", "mergemany"} <= set(list_methods())
    assert list_methods() == sorted(list_methods())
    info = method_info("weight")
    assert info.url and info.paper and info.summary.startswith("Weight matching")
    with pytest.raises(ValueError, match="registered methods: .*naive.*weight"):
        get_method("no-such-method")
    with pytest.raises(ValueError, match="already registered"):
        register_method("weight")
    with pytest.raises(ValueError, match="non-empty"):
        register_method("")


def test_naive_is_the_weighted_average_and_lam_is_validated() -> None:
    spec = _spec("mlp")
    sa, sb = _model("mlp", 0).state_dict(), _model("mlp", 1).state_dict()
    res = get_method("naive")(spec, [sa, sb], lam=0.25)
    for k in sa:
        assert torch.allclose(res.state_dict[k], 0.75 * sa[k] + 0.25 * sb[k], atol=1e-7)
    with pytest.raises(ValueError, match="'lam' parameter of naive must be a float in"):
        get_method("naive")(spec, [sa, sb], lam=1.5)
    with pytest.raises(ValueError, match="pass weights="):
        get_method("naive")(spec, [sa, sb, sa], lam=0.2)
    with pytest.raises(ValueError, match="use 'mergemany'"):
        get_method("weight")(spec, [sa, sb, sa])
    three = get_method("naive")(spec, [sa, sb, sb], weights=[0.5, 0.25, 0.25])
    for k in sa:
        assert torch.allclose(three.state_dict[k], 0.5 * sa[k] + 0.5 * sb[k], atol=1e-7)
