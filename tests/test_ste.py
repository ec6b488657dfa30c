"""STE matching (Git Re-Basin's straight-through estimator, as Yamada et al. use it).

Invariants: a model and a permuted copy of it are matched back exactly and merge into the
model itself (every matcher); on two briefly trained MNIST MLPs the STE midpoint beats weight
matching on the data it was trained on; the fast and warm matchers return what a full weight
matching returns every step, also along a drifting proxy; a bound certificate never accepts
a suboptimal assignment; centred prices stay feasible; the warm assignment is an exact LAP;
runs are reproducible under a seed.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

import symmerge
from symmerge.groupmap import GroupMap, build_state_dict
from symmerge.methods import get_method
from symmerge.models.mlp import MLP
from symmerge.refine import ste_refine
from symmerge.refine.ste import _proxy_keys
from symmerge.similarity import WeightSimilarity, weight_similarity
from symmerge.solvers.coordinate import weight_matching
from symmerge.solvers.warm import PlainGroup, WarmAssignment, WarmMatcher

needs_data = pytest.mark.skipif(
    not os.environ.get("SYMMERGE_DATA"),
    reason="set SYMMERGE_DATA to a folder with MNIST (see README)",
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_batches(n: int, shape: tuple[int, ...], seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, *shape, generator=g), torch.randint(0, 10, (32,), generator=g))
            for _ in range(n)]  # fmt: skip


def _midpoint_loss(
    spec: symmerge.SymmetrySpec,
    model: nn.Module,
    sb: dict[str, Tensor],
    perms: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
) -> float:
    sa = model.state_dict()
    ident = spec.identity_permutations()
    maps = {g: GroupMap.permutations([ident[g], perms[g]], (0.5, 0.5)) for g in spec.groups}
    with torch.no_grad():
        out = functional_call(model, build_state_dict(spec, [sa, sb], maps), (x,))
    return float(F.cross_entropy(out, y))


# ---------------------------------------------------------------------------------------
# identity recovery
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("matcher", ["fast", "warm", "full"])
def test_permuted_copy_is_matched_back_and_merges_to_the_model(matcher: str) -> None:
    torch.manual_seed(0)
    model = MLP(depth=3, width=24, input_shape=(1, 4, 4)).eval()
    spec = symmerge.trace(model, (torch.randn(2, 1, 4, 4),))
    applied = spec.random_permutations(seed=3)
    sb = spec.permute_state_dict(model.state_dict(), applied)
    data = _random_batches(6, (1, 4, 4))
    res = ste_refine(
        spec, model, sb, data, init=spec.identity_permutations(), lr=0.5, steps=10,
        matcher=matcher,
    )  # fmt: skip  # not even warm-started from the answer
    for g, p in applied.items():
        assert torch.equal(res.perms[g], torch.argsort(p)), g
    # the midpoint is the model itself: its loss is the model's, batch by batch
    with torch.no_grad():
        expected = [float(F.cross_entropy(model(x), y)) for x, y in data + data[:4]]
    assert res.losses == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert len(res.match_seconds) == len(res.train_seconds) == res.steps == 10

    merged = get_method("ste")(spec, [model, sb], data=data, steps=5, lr=0.5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(merged.state_dict[k], v, rtol=0, atol=1e-6)
    assert merged.method == "ste" and merged.iterations == 5
    assert merged.timings["match_per_step"] > 0 and merged.timings["rest_per_step"] > 0


def test_batchnorm_midpoint_uses_reset_or_batch_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)
    ).eval()
    spec = symmerge.trace(model, (torch.randn(4, 1, 4, 4),))
    applied = spec.random_permutations(seed=1)
    sb = spec.permute_state_dict(model.state_dict(), applied)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _random_batches(4, (1, 4, 4), seed=2)
    for bn in ("reset", "batch"):
        res = ste_refine(spec, model, sb, data, steps=3, lr=0.1, bn=bn)
        assert all(torch.equal(res.perms[g], torch.argsort(p)) for g, p in applied.items())
        assert all(np.isfinite(res.losses))
    for k, v in model.state_dict().items():  # the model is left as it was, in eval mode
        assert torch.equal(v, before[k]), k
    assert not model.training
    # bn="reset": the first step's loss is the model's with statistics recomputed on the data
    from symmerge.renorm import reset_bn

    ref = reset_bn(copy.deepcopy(model), data).eval()
    res = ste_refine(spec, model, sb, data, steps=1, bn="reset")
    with torch.no_grad():
        assert res.losses[0] == pytest.approx(float(F.cross_entropy(ref(data[0][0]), data[0][1])))


def test_reset_statistics_are_recomputed_only_when_the_permutations_move(monkeypatch) -> None:
    """The forward pass sees (1 - lam) A + lam pi(B) whatever the proxy, so the statistics
    depend on the permutations only: a permuted copy, recovered at once, needs one reset,
    and every step's loss is that of the model with statistics reset on the data."""
    import symmerge.renorm

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)
    ).eval()
    spec = symmerge.trace(model, (torch.randn(4, 1, 4, 4),))
    sb = spec.permute_state_dict(model.state_dict(), spec.random_permutations(seed=1))
    data = _random_batches(4, (1, 4, 4), seed=2)
    calls = []
    real = symmerge.renorm.reset_bn
    monkeypatch.setattr(
        symmerge.renorm, "reset_bn", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    res = ste_refine(spec, model, sb, data, steps=4, lr=0.1, bn="reset", keep="last")
    assert sum(res.changed) == 0 and len(calls) == 1
    ref = real(copy.deepcopy(model), data).eval()
    with torch.no_grad():
        want = [float(F.cross_entropy(ref(x), y)) for x, y in data]
    assert res.losses == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------------------------------
# STE beats weight matching on real data
# ---------------------------------------------------------------------------------------


def _briefly_trained_pair() -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    from symmerge.data import get_dataset

    ds = get_dataset("mnist", "train")
    x, y = ds.tensors[0][:512], ds.tensors[1][:512]

    def train(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        m = MLP(depth=2, width=64)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(seed)
        for _ in range(3):
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 64):
                idx = order[i : i + 64]
                loss = F.cross_entropy(m(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return m.eval()

    return train(0), train(1), x, y


@needs_data
def test_ste_lowers_the_midpoint_loss_below_weight_matching() -> None:
    a, b, x, y = _briefly_trained_pair()
    spec = symmerge.trace(a, (x[:2],))
    sa, sb = a.state_dict(), b.state_dict()
    wm = weight_matching(spec, sa, sb)
    loss_wm = _midpoint_loss(spec, a, sb, wm.perms, x, y)
    loss_naive = _midpoint_loss(spec, a, sb, spec.identity_permutations(), x, y)
    assert loss_wm < loss_naive
    res = ste_refine(
        spec, a, sb, TensorDataset(x, y), init=wm.perms, steps=40, batch_size=128, lr=0.5,
        keep="last",
    )  # fmt: skip
    loss_ste = _midpoint_loss(spec, a, sb, res.perms, x, y)
    assert loss_ste < 0.9 * loss_wm, (loss_ste, loss_wm)
    assert sum(res.changed) > 0

    # the recipe: same merge, data required
    with pytest.raises(ValueError, match="needs data"):
        get_method("ste")(spec, [a, b])
    merged = get_method("ste")(
        spec, [a, b], data=TensorDataset(x, y), steps=40, batch_size=128, lr=0.5, keep="last"
    )
    with torch.no_grad():
        out = functional_call(a, merged.state_dict, (x,))
    assert float(F.cross_entropy(out, y)) == pytest.approx(loss_ste, rel=1e-5)


@needs_data
@pytest.mark.parametrize("matcher", ["fast", "warm"])
def test_fast_matcher_equals_full_weight_matching_every_step(matcher: str) -> None:
    a, b, x, y = _briefly_trained_pair()
    spec = symmerge.trace(a, (x[:2],))
    kw = dict(steps=15, batch_size=128, lr=0.5, seed=4)
    fast = ste_refine(
        spec, a, b.state_dict(), TensorDataset(x, y), max_sweeps=100, matcher=matcher, **kw
    )
    full = ste_refine(spec, a, b.state_dict(), TensorDataset(x, y), matcher="full", **kw)
    assert sum(fast.changed) > 0  # the permutations did move
    assert fast.losses == full.losses
    assert fast.changed == full.changed
    for g in spec.groups:
        assert torch.equal(fast.last_perms[g], full.last_perms[g])
    assert sum(fast.solves) == 0 and sum(fast.certified) + sum(fast.repaired) > 0
    assert matcher == "fast" or sum(fast.bounded) == 0  # bounds: see the drifting test


def test_fast_matcher_equals_full_on_a_resnet_with_batchnorm() -> None:
    """Conv members (4-D, permuted on axis 0 or 1), BatchNorm and residual groups."""
    from symmerge.models import create_model

    a = create_model("resnet20", width=1)[0].eval()
    torch.manual_seed(1)
    b = create_model("resnet20", width=1)[0].eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    spec = symmerge.trace(a, (x[:2],))
    data = [(x[:8], y[:8]), (x[8:], y[8:])]
    kw = dict(steps=4, lr=0.5, bn="batch", max_sweeps=100)
    fast = ste_refine(spec, a, b.state_dict(), data, matcher="fast", **kw)  # type: ignore[arg-type]
    full = ste_refine(spec, a, b.state_dict(), data, matcher="full", **kw)  # type: ignore[arg-type]
    assert sum(fast.changed) > 0 and fast.losses == full.losses
    for name in spec.groups:
        assert torch.equal(fast.last_perms[name], full.last_perms[name]), name
    match = WarmMatcher(spec, b.state_dict(), "inner", "scipy", 3, plain=True)
    assert set(match.plain) == set(spec.groups)  # every group is served by PlainGroup


def _drifting_proxy(
    width: int, steps: int, seed: int
) -> tuple[symmerge.SymmetrySpec, dict[str, Tensor], list[dict[str, Tensor]]]:
    """A spec, B's weights and a sequence of proxies: A, then small random steps, with a few
    large ones that move the optimal permutations."""
    torch.manual_seed(seed)
    a = MLP(depth=3, width=width, input_shape=(1, 4, 4))
    spec = symmerge.trace(a, (torch.randn(2, 1, 4, 4),))
    b = MLP(depth=3, width=width, input_shape=(1, 4, 4))
    sa = a.state_dict()
    # B: half of A, permuted, plus an independent model: the optimum is clear but moves
    sb = spec.permute_state_dict(sa, spec.random_permutations(seed=seed))
    sb = {k: 0.5 * v + w for (k, v), w in zip(sb.items(), b.state_dict().values(), strict=True)}
    keys = _proxy_keys(spec, sa)
    theta = {k: sa[k].clone() for k in keys}
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        out.append({k: v.clone() for k, v in theta.items()})
        size = 0.3 if t % 9 == 8 else 0.01
        for v in theta.values():
            v += size * v.abs().mean() * torch.randn(v.shape, generator=g)
    return spec, sb, out


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_matcher_follows_full_weight_matching_along_a_drifting_proxy(seed: int) -> None:
    spec, sb, proxies = _drifting_proxy(width=48, steps=30, seed=seed)
    fast = WarmMatcher(spec, sb, "inner", "scipy", max_sweeps=100, plain=True)
    warm = WarmMatcher(spec, sb, "inner", "scipy", max_sweeps=100, plain=False)
    p_fast = p_warm = p_full = spec.identity_permutations()
    bounded = moved = 0
    for t, theta in enumerate(proxies):
        p_fast, stats = fast(theta, p_fast, t)
        p_warm, _ = warm(theta, p_warm, t)
        before = p_full
        p_full = weight_matching(spec, theta, sb, init=p_full, seed=t).perms
        for g in spec.groups:
            assert torch.equal(p_fast[g], p_full[g]), (t, g)
            assert torch.equal(p_warm[g], p_full[g]), (t, g)
        bounded += stats.bounded
        moved += t > 0 and any(not torch.equal(before[g], p_full[g]) for g in spec.groups)
    assert bounded >= len(proxies)  # most groups, most steps: no similarity computed
    assert moved > 0  # and the permutations did move along the way


def test_bound_never_certifies_a_suboptimal_assignment() -> None:
    spec, sb, proxies = _drifting_proxy(width=32, steps=1, seed=3)
    theta = proxies[0]
    match = WarmMatcher(spec, sb, "inner", "scipy", max_sweeps=100, plain=True)
    perms, _ = match(theta, spec.identity_permutations(), 0)  # sets every reference
    g = torch.Generator().manual_seed(0)
    proven = {True: 0, False: 0}
    for size in [1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3]:
        for _ in range(4):
            moved = {
                k: v + size * v.abs().mean() * torch.randn(v.shape, generator=g)
                for k, v in theta.items()
            }
            for name, group in match.plain.items():
                ok = group.prove(moved, perms, match.warm[name].prices, step=2) is not None
                proven[ok] += 1
                if ok:
                    C = weight_similarity(spec, name, moved, sb, perms).double().numpy()
                    r, c = linear_sum_assignment(C, maximize=True)
                    own = C[np.arange(len(c)), perms[name].numpy()].sum()
                    assert own >= C[r, c].sum() - 1e-9, (size, name)
    assert proven[True] > 0 and proven[False] > 0  # both outcomes were exercised


def test_kept_similarity_follows_neighbour_moves_and_matches_a_fresh_one() -> None:
    spec, sb, proxies = _drifting_proxy(width=20, steps=1, seed=5)
    theta = proxies[0]
    fresh = WeightSimilarity(spec, theta, sb)
    g = torch.Generator().manual_seed(0)
    for name in spec.groups:
        group = PlainGroup.create(spec, name, sb)
        assert group is not None
        perms = spec.identity_permutations()
        C = group.similarity(theta, perms, step=1)
        assert torch.equal(C, fresh(name, perms).double())  # the same products, bit for bit
        for _ in range(3):  # move the neighbours a little: a low-rank update, in float64
            for other in perms:
                if other != name:
                    p = perms[other].clone()
                    i, j = torch.randperm(len(p), generator=g)[:2].tolist()
                    p[i], p[j] = p[j].clone(), p[i].clone()
                    perms[other] = p
            C = group.similarity(theta, perms, step=1)
            torch.testing.assert_close(C, fresh(name, perms).double(), rtol=1e-5, atol=1e-5)


def test_a_repeated_batch_reuses_the_pass_and_follows_a_loop_that_recomputes() -> None:
    """Same batch and permutations: same loss and gradient, so the pass is skipped; the run
    equals a plain STE loop that recomputes every step."""
    torch.manual_seed(0)
    a = MLP(depth=2, width=16, input_shape=(1, 4, 4)).eval()
    b = MLP(depth=2, width=16, input_shape=(1, 4, 4)).eval()
    spec = symmerge.trace(a, (torch.randn(2, 1, 4, 4),))
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(64, 1, 4, 4, generator=g), torch.randint(0, 10, (64,), generator=g))
    # from the identity, weight matching stops where STE's steps still move units
    ident = spec.identity_permutations()
    init = weight_matching(spec, a.state_dict(), b.state_dict(), init=ident).perms
    kw = dict(init=init, steps=12, lr=0.3, momentum=0.9, weight_decay=1e-4)
    res = ste_refine(spec, a, b.state_dict(), [batch], **kw)  # type: ignore[arg-type]
    assert any(res.reused) and not all(res.reused[1:])  # both kinds of steps happened
    # the loop without reuse: recompute the midpoint, forward and backward every step
    sa, sb = a.state_dict(), b.state_dict()
    keys = _proxy_keys(spec, sa)
    theta = {k: sa[k].clone().requires_grad_(True) for k in keys}
    opt = torch.optim.SGD(list(theta.values()), lr=0.3, momentum=0.9, weight_decay=1e-4)
    perms, losses = init, []
    for step in range(12):
        detached = {k: v.detach() for k, v in theta.items()}
        perms = weight_matching(spec, detached, sb, init=perms, seed=step + 1).perms
        aligned = spec.permute_state_dict(sb, perms)
        mid = {k: 0.5 * v + 0.5 * aligned[k] for k, v in sa.items()}
        for k, t in theta.items():
            mid[k] = mid[k] + 0.5 * (t - t.detach())
        loss = F.cross_entropy(functional_call(a, mid, (batch[0],)), batch[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert res.losses == pytest.approx(losses, rel=1e-5)
    for name in spec.groups:
        assert torch.equal(res.last_perms[name], perms[name])


# ---------------------------------------------------------------------------------------
# determinism, errors
# ---------------------------------------------------------------------------------------


def test_deterministic_under_a_seed() -> None:
    torch.manual_seed(0)
    a, b = (
        MLP(depth=2, width=16, input_shape=(1, 4, 4)),
        MLP(depth=2, width=16, input_shape=(1, 4, 4)),
    )
    spec = symmerge.trace(a, (torch.randn(2, 1, 4, 4),))
    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(
        torch.randn(96, 1, 4, 4, generator=g), torch.randint(0, 10, (96,), generator=g)
    )
    runs = [
        ste_refine(spec, a, b.state_dict(), ds, epochs=3, batch_size=16, lr=0.5, seed=s)
        for s in (7, 7, 8)
    ]
    assert runs[0].losses == runs[1].losses
    assert all(torch.equal(runs[0].perms[k], runs[1].perms[k]) for k in spec.groups)
    assert runs[0].losses != runs[2].losses  # the seed shuffles the data
    assert runs[0].steps == 3 * 6


def test_missing_or_bad_data_and_parameters_raise() -> None:
    model = MLP(depth=1, width=8, input_shape=(1, 2, 2))
    spec = symmerge.trace(model, (torch.randn(2, 1, 2, 2),))
    sb = model.state_dict()
    with pytest.raises(ValueError, match="needs data"):
        ste_refine(spec, model, sb, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs data"):
        get_method("ste")(spec, [model, model])
    with pytest.raises(ValueError, match="gave no batches"):
        ste_refine(spec, model, sb, [])
    with pytest.raises(TypeError, match="labelled"):
        ste_refine(spec, model, sb, [torch.randn(4, 1, 2, 2)])
    data = _random_batches(1, (1, 2, 2))
    with pytest.raises(ValueError, match="'optimizer' parameter"):
        ste_refine(spec, model, sb, data, optimizer="lion")
    with pytest.raises(ValueError, match="'lam' parameter"):
        get_method("ste")(spec, [model, model], data=data, lam=2.0)
    with pytest.raises(TypeError, match="nn.Module"):
        get_method("ste")(spec, [sb, sb], data=data)


# ---------------------------------------------------------------------------------------
# the warm assignment
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 60])
def test_warm_assignment_is_an_exact_lap_along_a_drifting_sequence(n: int) -> None:
    rng = np.random.default_rng(n)
    C = rng.standard_normal((n, n))
    lap = WarmAssignment()
    perm = torch.from_numpy(rng.permutation(n))  # a cold, non-optimal start
    seen = set()
    for t in range(40):
        C = C + (0.3 if t % 7 == 0 else 0.01) * rng.standard_normal((n, n))
        perm, how = lap(torch.from_numpy(C), perm)
        seen.add(how)
        r, c = linear_sum_assignment(C, maximize=True)
        assert sorted(perm.tolist()) == list(range(n))
        assert C[np.arange(n), perm.numpy()].sum() == pytest.approx(C[r, c].sum(), abs=1e-9)
    if n >= 7:
        assert {"certified", "repaired"} <= seen
