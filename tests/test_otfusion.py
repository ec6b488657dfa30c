"""OT fusion: the exact transport solver, the reduction to activation matching (equal widths,
uniform marginals), identity recovery, N models, parents of different widths, importance
marginals, and the errors (missing POT, blocked groups, residual streams on the weight ground).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from _toy_models import Attention, Branches
from scipy.optimize import linear_sum_assignment
from torch import nn

import symmerge
from symmerge.merging import merge
from symmerge.methods import get_method, method_info
from symmerge.models import create_model
from symmerge.solvers.ot import as_permutation, transport
from symmerge.spec import SymmetrySpec

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(9))


def _batches(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 1, 28, 28, generator=g) for _ in range(n)]


def _mlp(seed: int, width: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("mlp", width=width, depth=2)[0].eval()


def _alive(model: nn.Module, data: list[torch.Tensor]) -> nn.Module:
    """Centre every hidden bias on ``data`` so no unit is dead: a dead unit is at distance 0
    from every other dead unit, and such ties may be broken differently by EMD and a LAP."""
    h = torch.cat(data).flatten(1)
    with torch.no_grad():
        for layer in [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]:
            pre = h @ layer.weight.T
            layer.bias.copy_(0.5 * pre.std(0) - pre.mean(0))
            h = torch.relu(pre + layer.bias)
    return model


@pytest.fixture(scope="module")
def data() -> list[torch.Tensor]:
    return _batches()


@pytest.fixture(scope="module")
def mlps(data) -> tuple[list[nn.Module], SymmetrySpec]:
    models = [_alive(_mlp(seed), data) for seed in range(3)]
    return models, symmerge.trace(models[0], (X,))


# ---- the solver ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_uniform_square_transport_is_the_assignment(n: int) -> None:
    cost = torch.rand(n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    plan = transport(cost)
    perm = as_permutation(plan)
    assert perm is not None and torch.equal(perm.sort().values, torch.arange(n))
    torch.testing.assert_close(plan * n, torch.eye(n, dtype=torch.float64)[perm], atol=0, rtol=0)
    rows, cols = linear_sum_assignment(cost.numpy())
    best = float(cost.numpy()[rows, cols].sum())
    assert float(cost[torch.arange(n), perm].sum()) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("shape", [(5, 3), (3, 8), (6, 6)])
def test_transport_with_marginals(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(1)
    cost = torch.rand(*shape, generator=g)
    a = torch.rand(shape[0], generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.1
    plan = transport(cost, 3 * a, b)  # weights are normalised
    assert plan.dtype == torch.float64 and plan.shape == shape and bool((plan >= 0).all())
    torch.testing.assert_close(plan.sum(1), a / a.sum(), atol=1e-12, rtol=0)
    torch.testing.assert_close(plan.sum(0), b / b.sum(), atol=1e-12, rtol=0)
    independent = torch.outer(a / a.sum(), b / b.sum())  # a feasible plan
    assert float((plan * cost).sum()) <= float((independent * cost).sum()) + 1e-12
    assert as_permutation(plan) is None


def test_transport_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="'cost' parameter of transport must be a non-empty"):
        transport(torch.zeros(3))
    with pytest.raises(ValueError, match="must be finite"):
        transport(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="'a' parameter of transport must hold 2 finite"):
        transport(torch.zeros(2, 2), a=[1.0, -1.0])
    with pytest.raises(ValueError, match="'b' parameter of transport must hold 2 finite"):
        transport(torch.zeros(2, 2), b=[1.0, 1.0, 1.0])


def test_missing_pot_names_the_extra(monkeypatch, mlps, data) -> None:
    models, spec = mlps
    monkeypatch.setitem(sys.modules, "ot", None)  # `import ot` now raises ImportError
    for call in (
        lambda: transport(torch.zeros(2, 2)),
        lambda: merge(models[:2], "otfusion", data=data, spec=spec),
    ):
        with pytest.raises(ImportError, match=r"pip install 'symmerge\[ot\]' \(or pip install pot"):
            call()


# ---- equal widths ----------------------------------------------------------------------------


def test_registered_capabilities() -> None:
    info = method_info("otfusion")
    assert (info.needs_data, info.max_models, info.unequal_widths) == (True, None, True)
    assert "1910.05653" in (info.url or "") and "Singh" in (info.paper or "")


@pytest.mark.parametrize("n", [2, 3])
def test_equal_widths_uniform_is_activation_matching(mlps, data, n: int) -> None:
    """Exact OT with uniform masses on the squared-distance cost is the LAP's permutation:
    the same maps and bit-identical merged weights as activation matching (neg_sqdist)."""
    models, spec = mlps
    fused, ot = merge(models[:n], "otfusion", data=data, spec=spec)
    _, am = merge(models[:n], "activation", data=data, spec=spec, kind="neg_sqdist")
    assert ot.details["permutation_groups"] == list(spec.groups)
    for m in range(n):
        for g, p in am.perms(m).items():
            assert torch.equal(ot.perms(m)[g], p), (m, g)
            assert not torch.equal(p, torch.arange(p.numel())) or m == 0
    assert ot.state_dict.keys() == am.state_dict.keys()
    for k, v in am.state_dict.items():
        assert torch.equal(ot.state_dict[k], v), k
    for g, cost in ot.objective.items():  # <T, C> = LAP cost / n, summed over the models
        assert cost == pytest.approx(-am.objective[g] / spec.groups[g].size, rel=1e-9)
    assert fused(X).shape == (2, 10) and torch.isfinite(fused(X)).all()


def _permuted_copy(model: nn.Module, spec: SymmetrySpec, seed: int = 3) -> nn.Module:
    copy = create_model("mlp", width=32, depth=2)[0]
    copy.load_state_dict(
        spec.permute_state_dict(model.state_dict(), spec.random_permutations(seed))
    )
    return copy.eval()


@pytest.mark.parametrize("ground", ["activation", "weight"])
@pytest.mark.parametrize("marginals", ["uniform", "importance"])
def test_permuted_copy_fuses_back(mlps, data, ground: str, marginals: str) -> None:
    models, spec = mlps
    model = models[0]
    copy = _permuted_copy(model, spec)
    fused, res = merge([model, copy], "otfusion", data=data, spec=spec, ground=ground,
                       marginals=marginals, lam=0.3)  # fmt: skip
    assert res.details["permutation_groups"] == list(spec.groups)
    with torch.no_grad():
        torch.testing.assert_close(fused(X), model(X), atol=1e-5, rtol=1e-5)
    assert all(abs(c) < 1e-6 for c in res.objective.values())


@pytest.mark.parametrize("ground", ["activation", "weight"])
def test_permuted_copy_with_concat_bn_and_flatten(ground: str) -> None:
    """Branches: a concat of two convs (segments), BatchNorm, a flatten into the head."""
    torch.manual_seed(0)
    model = Branches().eval()
    spec = symmerge.trace(model, (torch.randn(2, 3, 4, 4),))
    copy = Branches().eval()
    copy.load_state_dict(spec.permute_state_dict(model.state_dict(), spec.random_permutations(1)))
    batches = [torch.randn(32, 3, 4, 4, generator=torch.Generator().manual_seed(k)) for k in (0, 1)]
    res = get_method("otfusion")(spec, [model, copy], data=batches, ground=ground)
    assert res.details["permutation_groups"] == list(spec.groups)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(res.state_dict[k], v, atol=1e-6, rtol=1e-6, msg=k)


def test_three_models_fuse(mlps, data) -> None:
    models, spec = mlps
    for kw in ({}, {"ground": "weight"}, {"marginals": "importance"}):
        fused, res = merge(models, "otfusion", data=data, spec=spec, **kw)
        assert all(gm.num_models == 3 and gm.n_out == 32 for gm in res.maps.values())
        out = fused(X)
        assert out.shape == (2, 10) and torch.isfinite(out).all(), kw


def test_importance_marginals_differ_from_uniform(mlps, data) -> None:
    models, spec = mlps
    _, uni = merge(models[:2], "otfusion", data=data, spec=spec)
    fused, imp = merge(models[:2], "otfusion", data=data, spec=spec, marginals="importance")
    assert imp.details["permutation_groups"] == []  # masses differ: units are split
    assert any(not torch.equal(imp.state_dict[k], v) for k, v in uni.state_dict.items())
    for g, gm in imp.maps.items():
        assert not gm.is_permutation
        for m, w in enumerate((0.5, 0.5)):  # M_m rows carry w_m, U_m rows are means
            torch.testing.assert_close(gm.merge_matrix(m).sum(1), torch.full((32,), w).double())
            torch.testing.assert_close(gm.unmerge_matrix(m).sum(1), torch.ones(32).double())
        assert imp.objective[g] != pytest.approx(uni.objective[g])
    assert torch.isfinite(fused(X)).all()


# ---- parents of different widths -------------------------------------------------------------


def _doubled(narrow: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A width-32 MLP computing exactly what the width-16 ``narrow`` computes: every hidden
    unit twice (in a random order), outgoing weights halved. Returns it and the source of
    each wide unit."""
    gen = torch.Generator().manual_seed(5)
    src = [torch.randperm(32, generator=gen) % 16 for _ in range(2)]
    sd = narrow.state_dict()
    wide = create_model("mlp", width=32, depth=2)[0].eval()
    wide.load_state_dict({
        "layers.1.weight": sd["layers.1.weight"][src[0]],
        "layers.1.bias": sd["layers.1.bias"][src[0]],
        "layers.3.weight": sd["layers.3.weight"][src[1]][:, src[0]] / 2,
        "layers.3.bias": sd["layers.3.bias"][src[1]],
        "layers.5.weight": sd["layers.5.weight"][:, src[1]] / 2,
        "layers.5.bias": sd["layers.5.bias"],
    })  # fmt: skip
    return wide, {"layers.1.out": src[0], "layers.3.out": src[1]}


@pytest.fixture(scope="module")
def unequal(data) -> tuple[nn.Module, nn.Module, SymmetrySpec, SymmetrySpec]:
    narrow = _alive(_mlp(7, width=16), data)
    wide, _ = _doubled(narrow)
    return wide, narrow, symmerge.trace(wide, (X,)), symmerge.trace(narrow, (X,))


@pytest.mark.parametrize("ground", ["activation", "weight"])
@pytest.mark.parametrize("narrow_first", [False, True])
def test_narrow_model_fuses_into_its_doubled_copy(unequal, data, ground, narrow_first) -> None:
    """Each narrow unit is transported (mass 1/16) onto its two copies (1/32 each), so the
    fused model is the doubled model exactly and computes the narrow model's function."""
    wide, narrow, spec_w, spec_n = unequal
    _, src = _doubled(narrow)
    models, specs = [wide, narrow], [spec_w, spec_n]
    if narrow_first:
        models, specs = models[::-1], specs[::-1]
    res = get_method("otfusion")(specs[0], models, data=data, specs=specs, ground=ground)
    r = 1 if narrow_first else 0
    assert res.details["target"] == r
    for g, gm in res.maps.items():
        assert gm.n_out == 32 and not gm.is_permutation
        expect = torch.zeros(32, 16, dtype=torch.float64)
        expect[torch.arange(32), src[g]] = 1.0
        torch.testing.assert_close(gm.merge_matrix(1 - r), 0.5 * expect, atol=1e-9, rtol=0)
        torch.testing.assert_close(gm.unmerge_matrix(1 - r), 0.5 * expect.T, atol=1e-9, rtol=0)
    for k, v in wide.state_dict().items():
        torch.testing.assert_close(res.state_dict[k], v, atol=1e-6, rtol=1e-6, msg=k)


def test_different_widths_fuse_into_the_wider(data) -> None:
    wide, narrow = _mlp(0, 32), _mlp(1, 16)
    for models in ([wide, narrow], [narrow, wide]):
        for kw in ({}, {"ground": "weight"}, {"marginals": "importance"}):
            fused, res = merge(models, "otfusion", data=data, **kw)
            assert {gm.n_out for gm in res.maps.values()} == {32}
            assert {k: v.shape for k, v in res.state_dict.items()} == {
                k: v.shape for k, v in wide.state_dict().items()
            }
            out = fused(X)
            assert out.shape == (2, 10) and torch.isfinite(out).all(), kw
    # weight 1 on the wide model gives it back
    specs = [symmerge.trace(m, (X,)) for m in (narrow, wide)]
    res = get_method("otfusion")(specs[0], [narrow, wide], data=data, specs=specs, lam=1.0)
    for k, v in wide.state_dict().items():
        torch.testing.assert_close(res.state_dict[k], v, atol=1e-6, rtol=1e-6, msg=k)


# ---- what is refused ---------------------------------------------------------------------


class _Residual(nn.Module):
    """A residual stream: its producers (fc0, fc2) read a group (fc1's units) produced later."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc0(x)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(torch.relu(h))


def test_refusals(mlps, data) -> None:
    models, spec = mlps
    fn = get_method("otfusion")
    with pytest.raises(ValueError, match="'ground' parameter of otfusion must be one of"):
        fn(spec, models[:2], data=data, ground="cosine")
    with pytest.raises(ValueError, match="'marginals' parameter of otfusion must be one of"):
        fn(spec, models[:2], data=data, marginals="l1")
    with pytest.raises(ValueError, match="'width' parameter of otfusion must be None"):
        fn(spec, models[:2], data=data, width=16)
    with pytest.raises(ValueError, match="ground='activation' needs data="):
        fn(spec, models[:2])
    res = fn(spec, models[:2], ground="weight", width=32)  # data-free, the target's width
    assert set(res.maps) == set(spec.groups)

    attention = [Attention().eval() for _ in range(2)]
    att_spec = symmerge.trace(attention[0], (torch.randn(2, 6, 5),))
    with pytest.raises(ValueError, match=r"move in blocks \(GroupNorm groups or attention heads"):
        fn(att_spec, attention, ground="weight")

    residual = [_Residual().eval() for _ in range(2)]
    res_spec = symmerge.trace(residual[0], (torch.randn(2, 6),))
    with pytest.raises(ValueError, match="not aligned yet \\(a residual stream\\?\\)"):
        fn(res_spec, residual, ground="weight")
    batches = [torch.randn(16, 6, generator=torch.Generator().manual_seed(0))]
    fused = fn(res_spec, residual, data=batches)  # the activation ground works there
    assert set(fused.maps) == set(res_spec.groups)


def test_given_marginals(mlps, data) -> None:
    models, spec = mlps
    fn = get_method("otfusion")
    g = next(iter(spec.groups))
    ones = [torch.ones(32), torch.ones(32)]
    res = fn(spec, models[:2], data=data, marginals={g: ones})  # uniform, given explicitly
    ref = fn(spec, models[:2], data=data)
    assert all(torch.equal(res.state_dict[k], v) for k, v in ref.state_dict.items())
    with pytest.raises(ValueError, match="one mass vector per model of sizes"):
        fn(spec, models[:2], data=data, marginals={g: [torch.ones(32)]})
    with pytest.raises(ValueError, match="positive finite unit masses"):
        fn(spec, models[:2], data=data, marginals={g: [torch.ones(32), torch.zeros(32)]})
    assert np.isfinite(res.objective[g])
