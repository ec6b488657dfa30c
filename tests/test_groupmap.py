"""GroupMap and the weight builder: the merged weights are exactly what the maps say."""

from __future__ import annotations

import copy

import pytest
import torch
from _toy_models import Branches
from torch import nn

import symmerge
from symmerge.groupmap import GroupMap, align_state_dict, build_state_dict
from symmerge.models import create_model
from symmerge.spec import Factor, Group, Member, Segment, SymmetrySpec

# ---- helpers ---------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


def _traced(name: str, seed: int = 0, **kw: object) -> tuple[nn.Module, SymmetrySpec]:
    torch.manual_seed(seed)
    model, _ = create_model(name, **kw)
    return model.eval(), symmerge.trace(model, torch.randn(2, *model.input_shape))


def _inverse(perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {g: torch.argsort(p) for g, p in perms.items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _branches(seed: int = 0) -> tuple[nn.Module, SymmetrySpec]:
    torch.manual_seed(seed)
    model = Branches().eval()
    with torch.no_grad():  # non-trivial BN statistics
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    return model, symmerge.trace(model, torch.randn(2, 3, 4, 4))


# ---- GroupMap ---------------------------------------------------------------------------------


def test_permutation_map_matrices() -> None:
    p = torch.tensor([2, 0, 3, 1])
    gm = GroupMap.permutations([torch.arange(4), p], [0.25, 0.75])
    P = torch.zeros(4, 4, dtype=torch.float64)
    P[torch.arange(4), p] = 1.0  # merged unit i = model unit p[i]
    assert torch.equal(gm.merge_matrix(1), 0.75 * P)
    assert torch.equal(gm.unmerge_matrix(1), P.T)
    assert torch.equal(gm.merge_matrix(0), 0.25 * torch.eye(4, dtype=torch.float64))
    assert torch.equal(gm.merge_matrix(1) @ gm.unmerge_matrix(1), 0.75 * torch.eye(4).double())
    assert gm.is_permutation and gm.n_out == 4 and gm.sizes == (4, 4) and gm.num_models == 2
    x = torch.randn(3, 4, 5)
    assert torch.equal(gm.merge(1, x, 1, normalized=True), x[:, p])
    assert torch.equal(gm.unmerge(1, x, 1), x[:, p])
    assert torch.allclose(gm.mass(1), torch.full((4,), 0.75, dtype=torch.float64))


def test_dense_map_applies_like_its_matrices() -> None:
    gen = torch.Generator().manual_seed(0)
    M = [torch.rand(3, 5, generator=gen), torch.rand(3, 4, generator=gen)]
    U = [torch.rand(5, 3, generator=gen), torch.rand(4, 3, generator=gen)]
    gm = GroupMap.from_matrices(M, U)
    assert gm.n_out == 3 and gm.sizes == (5, 4) and not gm.is_permutation
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    assert torch.allclose(gm.merge(0, x, 1), torch.einsum("ij,bjk->bik", M[0].double(), x))
    assert torch.allclose(gm.unmerge(0, x, 1), torch.einsum("ji,bjk->bik", U[0].double(), x))
    total = sum(float(m.sum()) for m in M)
    assert gm.weights == pytest.approx([float(M[0].sum()) / total, float(M[1].sum()) / total])


def test_map_state_round_trip() -> None:
    gm = GroupMap.permutations([torch.arange(5), torch.tensor([4, 2, 0, 1, 3])], [0.4, 0.6])
    back = GroupMap.from_state(gm.to_state())
    assert back.weights == gm.weights and all(
        torch.equal(a, b) for a, b in zip(back.perms, gm.perms, strict=True)
    )
    dense = GroupMap.from_matrices([gm.merge_matrix(0)], [gm.unmerge_matrix(0)], [1.0])
    again = GroupMap.from_state(dense.to_state())
    assert torch.equal(again.merge_matrix(0), dense.merge_matrix(0))


def test_map_validation() -> None:
    with pytest.raises(ValueError, match="not a permutation"):
        GroupMap.permutations([torch.arange(3), torch.tensor([0, 0, 1])])
    with pytest.raises(ValueError, match="one weight per model"):
        GroupMap.identity(3, 2, [1.0])
    with pytest.raises(ValueError, match="n_out"):
        GroupMap.from_matrices([torch.ones(2, 3)], [torch.ones(2, 3)])
    with pytest.raises(ValueError, match="only defined for permutation"):
        GroupMap.from_matrices([torch.ones(2, 3)], [torch.ones(3, 2)]).with_weights([1.0])
    gm = GroupMap.identity(3, 2).with_weights([0.1, 0.9])
    assert gm.weights == (0.1, 0.9)


# ---- the builder ------------------------------------------------------------------------------


def test_identity_maps_give_the_weighted_average() -> None:
    model_a, spec = _traced("resnet20x1", seed=0)
    model_b, _ = _traced("resnet20x1", seed=1)
    sa, sb = copy.deepcopy(model_a.state_dict()), model_b.state_dict()
    for k in sa:
        if k.endswith("num_batches_tracked"):
            sa[k].fill_(7)
    w = (0.25, 0.75)
    maps = {g: GroupMap.identity(grp.size, 2, w) for g, grp in spec.groups.items()}
    merged = build_state_dict(spec, [sa, sb], maps)
    for k, v in merged.items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.25 * sa[k] + 0.75 * sb[k], atol=1e-6), k
        else:
            assert torch.equal(v, sa[k]), k
    # no maps at all: every tensor is averaged with the given (or uniform) weights
    plain = build_state_dict(spec, [sa, sb], {}, weights=w)
    assert _max_diff(plain, merged) < 1e-6
    uniform = build_state_dict(spec, [sa, sb], {})
    assert torch.allclose(uniform["fc.bias"], (sa["fc.bias"] + sb["fc.bias"]) / 2)


@pytest.mark.parametrize("name", ["mlp", "resnet20x1", "resnet20x1-gn", "vgg11", "branches"])
def test_permuted_copy_merges_back_for_any_lambda(name: str) -> None:
    model, spec = _branches() if name == "branches" else _traced(name)
    sd = model.state_dict()
    applied = spec.random_permutations(seed=3)
    sb = spec.permute_state_dict(sd, applied)
    back = _inverse(applied)
    ident = spec.identity_permutations()
    for lam in (0.0, 0.3, 0.5, 1.0):
        maps = {g: GroupMap.permutations([ident[g], back[g]], [1 - lam, lam]) for g in spec.groups}
        merged = build_state_dict(spec, [sd, sb], maps)
        assert _max_diff(merged, sd) < 1e-6, lam
        if lam in (0.0, 1.0):  # the endpoints are exact, not merely close
            assert all(torch.equal(merged[k], sd[k]) for k in sd)


def test_endpoints_are_exact_for_different_models() -> None:
    model_a, spec = _traced("resnet20x1", seed=0)
    model_b, _ = _traced("resnet20x1", seed=1)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    perm = spec.random_permutations(seed=5)
    ident = spec.identity_permutations()
    aligned_b = align_state_dict(spec, sb, perm)
    for lam, want in ((0.0, sa), (1.0, aligned_b)):
        maps = {g: GroupMap.permutations([ident[g], perm[g]], [1 - lam, lam]) for g in spec.groups}
        merged = build_state_dict(spec, [sa, sb], maps)
        assert all(torch.equal(merged[k], want[k]) for k in sa), lam


def test_dense_form_of_a_permutation_builds_the_same_weights() -> None:
    model_a, spec = _branches(seed=0)
    model_b, _ = _branches(seed=1)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    perm = spec.random_permutations(seed=2)
    ident = spec.identity_permutations()
    sparse = {g: GroupMap.permutations([ident[g], perm[g]], [0.3, 0.7]) for g in spec.groups}
    dense = {
        g: GroupMap.from_matrices(
            [gm.merge_matrix(0), gm.merge_matrix(1)],
            [gm.unmerge_matrix(0), gm.unmerge_matrix(1)],
            gm.weights,
        )
        for g, gm in sparse.items()
    }
    a = build_state_dict(spec, [sa, sb], sparse)
    b = build_state_dict(spec, [sa, sb], dense)
    assert _max_diff(a, b) < 1e-6


def test_side_by_side_map_builds_the_ensemble() -> None:
    """n_out = 2n: keep every unit of both models. The merged net of twice the width computes
    exactly the weighted average of the two models' outputs (frozen output axes carry w_m)."""
    kw = {"depth": 2, "width": 6, "input_shape": (1, 3, 3)}
    model_a, spec = _traced("mlp", seed=0, **kw)
    model_b, _ = _traced("mlp", seed=1, **kw)
    wide, _ = create_model("mlp", **{**kw, "width": 12})
    eye, zero = torch.eye(6), torch.zeros(6, 6)
    for w in ((0.5, 0.5), (0.2, 0.8)):
        maps = {
            g: GroupMap.from_matrices(
                [torch.cat([eye, zero]), torch.cat([zero, eye])],  # M_m: (12 x 6), mass 1
                [torch.cat([eye, zero], 1), torch.cat([zero, eye], 1)],  # U_m: (6 x 12)
                w,
            )
            for g in spec.groups
        }
        merged = build_state_dict(spec, [model_a.state_dict(), model_b.state_dict()], maps)
        wide.load_state_dict(merged)
        x = torch.randn(5, 1, 3, 3)
        with torch.no_grad():
            want = w[0] * model_a(x) + w[1] * model_b(x)
            assert torch.allclose(wide.eval()(x), want, atol=1e-5)


def test_two_produced_group_factors_carry_the_weight_once() -> None:
    """An axis laid out as g1 x g2 (both produced): the model weight must not be squared."""
    lay = (Segment(0, (Factor("g1", 2), Factor("g2", 3))),)
    w1, b1, w2 = (
        Member("w1", 0, lay, "out"),
        Member("b1", 0, lay, "out"),
        Member("w2", 1, lay, "in"),
    )
    groups = {
        "g1": Group("g1", 2, [w1, b1, w2]),
        "g2": Group("g2", 3, [w1, b1, w2]),
    }
    spec = SymmetrySpec(groups, [], {"w1": (6, 4), "b1": (6,), "w2": (5, 6)})
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(*s, generator=gen) for k, s in spec.shapes.items()}
    applied = spec.random_permutations(seed=1)
    sb = spec.permute_state_dict(sd, applied)
    back = _inverse(applied)
    ident = spec.identity_permutations()
    maps = {g: GroupMap.permutations([ident[g], back[g]], [0.4, 0.6]) for g in groups}
    assert _max_diff(build_state_dict(spec, [sd, sb], maps), sd) < 1e-6


def test_builder_validation() -> None:
    model, spec = _traced("mlp", depth=1, width=4, input_shape=(1, 2, 2))
    sd = model.state_dict()
    g = next(iter(spec.groups))
    with pytest.raises(KeyError, match="groups the spec does not have"):
        build_state_dict(spec, [sd, sd], {"nope": GroupMap.identity(4)})
    with pytest.raises(ValueError, match="expected 2 models of size 4"):
        build_state_dict(spec, [sd, sd], {g: GroupMap.identity(5)})
    with pytest.raises(ValueError, match="disagree on the model weights"):
        two = {g: GroupMap.identity(4, 2, [0.5, 0.5])}
        spec.groups["other"] = Group("other", 4)
        two["other"] = GroupMap.identity(4, 2, [0.1, 0.9])
        build_state_dict(spec, [sd, sd], two)
