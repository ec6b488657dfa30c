"""Merging parents of different widths (weight and activation matching).

The key invariant: a wide model and a *narrowed permuted copy* of it (k of its n units per
hidden layer, in a random order, every weight sliced to match) are matched back exactly: each
narrow unit is matched to the wide unit it was cut from. The builder then gives the wide model
at lam=0 and the narrow model's function at lam=1 (unmatched units keep the wide model's).

Weight matching recovers the cut units of any wide model. A deeper narrow unit computes a
different function than its source (it lost the inputs of the dropped units), so activation
matching is tested on a wide model whose kept units read no dropped unit ("closed"): there the
narrow units are exact copies and must be found exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import symmerge
from symmerge.groupmap import GroupMap, build_state_dict
from symmerge.merging import merge
from symmerge.methods import get_method
from symmerge.models import create_model
from symmerge.solvers import solve_lap
from symmerge.spec import SymmetrySpec

pytestmark = pytest.mark.usefixtures("one_thread")


def _traced(name: str, **kw: int) -> tuple[nn.Module, SymmetrySpec]:
    model = create_model(name, **kw)[0].eval()
    return model, symmerge.trace(model, (torch.randn(2, *model.input_shape),))


def _cut(
    wide: nn.Module, spec: SymmetrySpec, narrow: nn.Module, k: int, *, closed: bool = False
) -> dict[str, torch.Tensor]:
    """``narrow`` loaded with k units of every group of ``wide`` (a random subset in a random
    order); returns the source of each narrow unit, ``src[g][j]`` = wide unit.

    ``closed``: first zero the wide MLP's weights from dropped units into kept ones and centre
    its biases on random inputs (no dead unit, whose correlations would all tie at zero).
    """
    gen = torch.Generator().manual_seed(0)
    src = {g: torch.randperm(grp.size, generator=gen)[:k] for g, grp in spec.groups.items()}
    if closed:
        with torch.no_grad():
            groups = list(src)
            hidden = [m for m in wide.modules() if isinstance(m, nn.Linear)][:-1]
            for layer, g_in, g_out in zip(hidden[1:], groups[:-1], groups[1:], strict=True):
                dropped = torch.ones(layer.in_features, dtype=torch.bool)
                dropped[src[g_in]] = False
                layer.weight[src[g_out].unsqueeze(1), dropped.nonzero().T] = 0.0
            h = torch.randn(1024, 784)
            for layer in hidden:
                pre = h @ layer.weight.T
                layer.bias.copy_(0.5 * pre.std(0) - pre.mean(0))
                h = torch.relu(pre + layer.bias)
    sd = dict(wide.state_dict())
    for mem in spec.members():  # axis_index on the wide layout with narrow-length indices
        sd[mem.tensor] = sd[mem.tensor].index_select(mem.axis, spec.axis_index(mem, src))
    narrow.load_state_dict(sd)
    return src


Parents = tuple[nn.Module, nn.Module, SymmetrySpec, SymmetrySpec, dict[str, torch.Tensor]]


def _parents(closed: bool) -> Parents:
    torch.manual_seed(0)
    wide, spec_w = _traced("mlp", width=512)
    narrow, spec_n = _traced("mlp", width=256)
    src = _cut(wide, spec_w, narrow, 256, closed=closed)
    return wide, narrow, spec_w, spec_n, src


@pytest.fixture(scope="module")
def mlps() -> Parents:
    return _parents(closed=False)


@pytest.fixture(scope="module")
def closed_mlps() -> Parents:
    return _parents(closed=True)


def _check_recovered(maps: dict[str, GroupMap], narrow: int, src: dict[str, torch.Tensor]) -> None:
    """Merged unit i (= wide unit i) holds narrow unit j exactly when src[j] == i."""
    for g, gm in maps.items():
        assert gm.indices is not None and gm.n_out == 512
        idx = gm.indices[narrow]
        assert torch.equal(gm.indices[1 - narrow], torch.arange(512))
        expect = torch.full((512,), -1, dtype=torch.long)
        expect[src[g]] = torch.arange(src[g].numel())
        assert torch.equal(idx, expect), g


@pytest.mark.parametrize("method", ["weight", "activation"])
@pytest.mark.parametrize("narrow_first", [False, True])
def test_narrowed_copy_is_recovered(request, method: str, narrow_first: bool) -> None:
    fixture = "closed_mlps" if method == "activation" else "mlps"
    wide, narrow, spec_w, spec_n, src = request.getfixturevalue(fixture)
    models, specs = [wide, narrow], [spec_w, spec_n]
    if narrow_first:
        models, specs = models[::-1], specs[::-1]
    kw = {"data": [torch.randn(64, 1, 28, 28) for _ in range(4)]} if method == "activation" else {}
    res = get_method(method)(specs[0], models, specs=specs, **kw)
    _check_recovered(res.maps, 0 if narrow_first else 1, src)
    shapes = {k: v.shape for k, v in wide.state_dict().items()}
    assert {k: v.shape for k, v in res.state_dict.items()} == shapes


def test_builder_limits(mlps) -> None:
    """lam=0 gives the wide model, lam=1 the narrow model's function with its units in place."""
    wide, narrow, spec_w, spec_n, src = mlps
    res = get_method("weight")(spec_w, [wide, narrow], specs=[spec_w, spec_n])
    sds = [wide.state_dict(), narrow.state_dict()]
    specs = [spec_w, spec_n]
    at0 = build_state_dict(specs, sds, {g: m.with_weights([1, 0]) for g, m in res.maps.items()})
    for k, v in wide.state_dict().items():
        assert torch.equal(at0[k], v), k
    at1 = build_state_dict(specs, sds, {g: m.with_weights([0, 1]) for g, m in res.maps.items()})
    nsd, (g1, g2, g3) = narrow.state_dict(), list(spec_w.groups)
    assert torch.equal(at1["layers.1.weight"][src[g1]], nsd["layers.1.weight"])
    assert torch.equal(at1["layers.3.bias"][src[g2]], nsd["layers.3.bias"])
    rows = at1["layers.3.weight"][src[g2]]
    assert torch.equal(rows[:, src[g1]], nsd["layers.3.weight"])
    unmatched = torch.ones(512, dtype=torch.bool)
    unmatched[src[g1]] = False
    assert not rows[:, unmatched].any()  # a narrow unit reads no wide-only unit
    assert torch.equal(at1["layers.7.weight"][:, src[g3]], nsd["layers.7.weight"])
    gone = torch.ones(512, dtype=torch.bool)
    gone[src[g2]] = False  # unmatched units are the wide model's own, whatever lam
    assert torch.equal(at1["layers.3.weight"][gone], wide.state_dict()["layers.3.weight"][gone])
    merged = create_model("mlp", width=512)[0].eval()
    merged.load_state_dict(at1)
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), narrow(x), rtol=1e-5, atol=1e-5)


def test_builder_narrow_first_mid(mlps) -> None:
    """Model 0 narrow: merged widths are the wide model's; matched units average, the rest
    are the wide model's units; lam=1 is the wide model exactly."""
    wide, narrow, spec_w, spec_n, src = mlps
    res = get_method("weight")(spec_n, [narrow, wide], specs=[spec_n, spec_w], lam=0.25)
    sds, specs = [narrow.state_dict(), wide.state_dict()], [spec_n, spec_w]
    g1 = next(iter(spec_w.groups))
    b = res.state_dict["layers.1.bias"]
    expect = wide.state_dict()["layers.1.bias"].clone()
    expect[src[g1]] = 0.75 * narrow.state_dict()["layers.1.bias"] + 0.25 * expect[src[g1]]
    torch.testing.assert_close(b, expect)
    at1 = build_state_dict(specs, sds, {g: m.with_weights([0, 1]) for g, m in res.maps.items()})
    for k, v in wide.state_dict().items():
        assert torch.equal(at1[k], v), k


def test_partial_permutations_map() -> None:
    gm = GroupMap.partial_permutations([torch.arange(4), torch.tensor([1, -1, 0, -1])], [4, 2])
    assert gm.perms is None and gm.sizes == (4, 2) and gm.n_out == 4
    torch.testing.assert_close(gm.mass(0), torch.tensor([0.5, 1.0, 0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(gm.mass(1), torch.tensor([0.5, 0.0, 0.5, 0.0], dtype=torch.float64))
    one = gm.with_weights([0.0, 1.0])  # a unit only model 0 has stays model 0's
    torch.testing.assert_close(one.mass(0), torch.tensor([0.0, 1, 0, 1], dtype=torch.float64))
    back = GroupMap.from_state(gm.to_state())
    assert all(torch.equal(a, b) for a, b in zip(back.indices, gm.indices, strict=True))
    full = GroupMap.partial_permutations([torch.arange(3), torch.tensor([2, 0, 1])], [3, 3])
    assert full.perms is not None  # nothing unmatched: a plain permutation map
    with pytest.raises(ValueError, match="injective"):
        GroupMap.partial_permutations([torch.arange(3), torch.tensor([0, 0, -1])], [3, 2])


def test_blocked_rectangular_lap() -> None:
    """Two blocks of 3 rows, two of 2 columns: each row block takes one column block whole."""
    C = torch.zeros(6, 4)
    C[0, 3] = C[1, 2] = C[4, 0] = C[5, 1] = 1.0
    assert solve_lap(C, blocks=2).tolist() == [3, 2, -1, -1, 0, 1]


def test_resnet20_x1_with_x2() -> None:
    """ResNet-20x1 (model 0) with x2: the merged state dict has x2's shapes and runs."""
    torch.manual_seed(0)
    small, spec_s = _traced("resnet20")
    big, spec_b = _traced("resnet20x2")
    assert set(spec_s.groups) == set(spec_b.groups)
    res = get_method("weight")(spec_s, [small, big], specs=[spec_s, spec_b], max_sweeps=2)
    assert {k: v.shape for k, v in res.state_dict.items()} == {
        k: v.shape for k, v in big.state_dict().items()
    }
    for g, gm in res.maps.items():
        assert gm.n_out == spec_b.groups[g].size
        assert int((gm.indices[0] >= 0).sum()) == spec_s.groups[g].size
    merged = create_model("resnet20x2")[0].eval()
    merged.load_state_dict(res.state_dict)
    with torch.no_grad():
        assert torch.isfinite(merged(torch.randn(2, *merged.input_shape))).all()


@pytest.mark.parametrize("method", ["c2m3", "ste", "naive", "mergemany"])
def test_methods_without_unequal_widths_refuse(mlps, method: str) -> None:
    wide, narrow, spec_w, _, _ = mlps
    data = [(torch.randn(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))]
    with pytest.raises(ValueError, match="'activation'.*'weight'|activation, .*weight"):
        merge([wide, narrow], method, data=data)
    if method in ("naive", "mergemany"):  # called directly, too
        with pytest.raises(ValueError, match="'activation', .*'weight'"):
            get_method(method)(spec_w, [wide, narrow])


def test_merge_front_door(mlps) -> None:
    """merge() traces each parent and returns a model of the wider widths (model 0 narrow)."""
    wide, narrow, _, _, src = mlps
    model, res = merge([narrow, wide], "weight", lam=1.0)
    _check_recovered(res.maps, 0, src)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), wide(x), rtol=1e-5, atol=1e-5)
