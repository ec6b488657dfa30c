"""Neuron importance scores (captum attributions) and their use in neuron-interpolation fusion
(algorithms.md §5(b), §5(e))."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

import symmerge
from symmerge.importance import neuron_importance
from symmerge.merging import merge
from symmerge.models import create_model
from symmerge.spec import SymmetrySpec, _jitter_

pytestmark = pytest.mark.usefixtures("one_thread")

ATTRIBUTIONS = ("conductance", "deeplift", "ablation")


def _mlp(seed: int, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("mlp", width=width, depth=2)[0].eval()
    _jitter_(model, seed)
    return model


def _cnn(seed: int) -> nn.Module:
    """Conv -> BN -> ReLU -> Conv -> ReLU -> pool -> Linear: conv groups with positions."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )  # fmt: skip
    model.input_shape = (3, 6, 6)
    _jitter_(model, seed)
    return model.eval()


def _spec(model: nn.Module) -> SymmetrySpec:
    return symmerge.trace(model, (torch.randn(2, *model.input_shape),))


def _data(model: nn.Module, n: int = 60, size: int = 20, classes: int = 5) -> list:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *model.input_shape, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return list(zip(x.split(size), y.split(size), strict=True))


MODELS = {"mlp": _mlp, "cnn": _cnn}


@pytest.mark.parametrize("method", ATTRIBUTIONS + ("uniform",))
@pytest.mark.parametrize("arch", list(MODELS))
def test_one_positive_score_per_unit(arch: str, method: str) -> None:
    model = MODELS[arch](0)
    spec = _spec(model)
    scores = neuron_importance(model, spec, _data(model), method=method)
    assert set(scores) == set(spec.groups)
    for g, s in scores.items():
        assert s.shape == (spec.groups[g].size,) and s.dtype == torch.float64, g
        assert (s > 0).all() and torch.isfinite(s).all(), g
        if method == "uniform":
            assert torch.equal(s, torch.ones_like(s))
        else:
            assert s.std() > 0, g  # real attributions differ between units
    normed = neuron_importance(model, spec, _data(model), method=method, normalize=True)
    for g, s in normed.items():
        assert float(s.sum()) == pytest.approx(1.0)
        torch.testing.assert_close(s, scores[g] / scores[g].sum())


@pytest.mark.parametrize("method", ATTRIBUTIONS)
@pytest.mark.parametrize("arch", list(MODELS))
def test_a_unit_nothing_reads_has_no_importance(arch: str, method: str) -> None:
    """Zero outgoing weights: no gradient reaches the unit and ablating it changes nothing."""
    model = MODELS[arch](1)
    spec = _spec(model)
    group, reader = ("layers.1.out", model.layers[3]) if arch == "mlp" else ("0.out", model[3])
    with torch.no_grad():
        reader.weight[:, 2] = 0.0
    s = neuron_importance(model, spec, _data(model), method=method)[group]
    assert float(s[2]) < 1e-7
    assert (s[torch.arange(len(s)) != 2] > 1e-5).all()


@pytest.mark.parametrize("method", ATTRIBUTIONS)
@pytest.mark.parametrize("arch", list(MODELS))
def test_a_permuted_copy_gets_the_permuted_scores(arch: str, method: str) -> None:
    model = MODELS[arch](2)
    spec = _spec(model)
    perms = spec.random_permutations(seed=5)
    other = spec.permuted(model, perms)
    data = _data(model)
    ref = neuron_importance(model, spec, data, method=method)
    got = neuron_importance(other, spec, data, method=method)
    for g, p in perms.items():
        assert not torch.equal(p, torch.arange(len(p)))
        torch.testing.assert_close(got[g], ref[g][p], rtol=1e-4, atol=1e-7)


def test_scores_repeat_do_not_depend_on_batching_and_restore_the_model() -> None:
    model = _cnn(3).train()
    spec = _spec(model)
    data = _data(model)
    before = torch.random.get_rng_state()
    first = neuron_importance(model, spec, data, method="conductance", batch_size=7, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(m.training for m in model.modules())  # modes restored
    again = neuron_importance(model, spec, data, method="conductance", batch_size=7, seed=1)
    whole = neuron_importance(model, spec, [(torch.cat([x for x, _ in data]),
                                             torch.cat([y for _, y in data]))],
                              method="conductance", batch_size=7)  # fmt: skip
    for g in spec.groups:
        assert torch.equal(first[g], again[g]), g
        torch.testing.assert_close(first[g], whole[g], rtol=1e-6, atol=1e-9)
    only = neuron_importance(model, spec, data, method="deeplift", groups=["3.out"])
    assert list(only) == ["3.out"]


def test_steps_reach_captum() -> None:
    model = _mlp(4)
    spec = _spec(model)
    data = _data(model, 20)
    coarse = neuron_importance(model, spec, data, method="conductance", steps=2)
    fine = neuron_importance(model, spec, data, method="conductance", steps=10)
    assert any(not torch.equal(coarse[g], fine[g]) for g in spec.groups)


def test_missing_captum_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _mlp(0)
    spec = _spec(model)
    monkeypatch.setitem(sys.modules, "captum", None)
    with pytest.raises(ImportError, match=r"pip install 'symmerge\[attribution\]'"):
        neuron_importance(model, spec, _data(model), method="deeplift")
    uniform = neuron_importance(model, spec, None, method="uniform")  # no captum needed
    assert all(torch.equal(s, torch.ones(16, dtype=torch.float64)) for s in uniform.values())


def test_bad_input_is_refused() -> None:
    model = _mlp(0)
    spec = _spec(model)
    x = torch.randn(8, *model.input_shape)
    with pytest.raises(ValueError, match=r"\(inputs, labels\).*uniform"):
        neuron_importance(model, spec, [x], method="conductance")
    with pytest.raises(ValueError, match=r"\(inputs, labels\)"):
        neuron_importance(model, spec, [(x,)], method="ablation")
    with pytest.raises(ValueError, match="integer class label"):
        neuron_importance(model, spec, [(x, torch.rand(8))], method="deeplift")
    with pytest.raises(ValueError, match="'method' parameter"):
        neuron_importance(model, spec, [(x, torch.zeros(8, dtype=torch.long))], method="grad")
    with pytest.raises(ValueError, match="'batch_size' parameter"):
        neuron_importance(model, spec, _data(model), batch_size=0)
    with pytest.raises(ValueError, match="unknown groups"):
        neuron_importance(model, spec, _data(model), groups=["nope"])
    with pytest.raises(ValueError, match="needs data"):
        neuron_importance(model, spec, None, method="conductance")
    blocked = copy.deepcopy(spec)
    blocked.groups["layers.1.out"].blocks = 4  # as if GroupNorm groups
    with pytest.raises(ValueError, match=r"groups=.*uniform"):
        neuron_importance(model, blocked, _data(model), method="conductance")
    assert list(neuron_importance(model, blocked, _data(model), groups=["layers.3.out"])) == [
        "layers.3.out"
    ]


# ---- neuron-interpolation fusion with attribution scores ---------------------------------


def _fusion_data(model: nn.Module, n: int = 1024, size: int = 128) -> list:
    """More samples than inputs (784 + 1), so every least-squares fit is determined."""
    return _data(model, n, size, classes=10)


def test_kf_linear_weighs_each_unit_by_its_normalised_conductance() -> None:
    a, b = _mlp(0), _mlp(1, width=12)  # different widths: one spec per parent
    data = _fusion_data(a, 256)
    fused, res = merge([a, b], "kf-linear", data=data, importance="conductance", restarts=2)
    assert res.timings["importance"] > 0
    assert all(v >= 0 for v in res.objective.values())
    with torch.no_grad():
        assert torch.isfinite(fused(data[0][0])).all()
    scores = [neuron_importance(m, _spec(m), data, normalize=True) for m in (a, b)]
    for g, gm in res.maps.items():
        s = torch.cat([scores[0][g], scores[1][g]])  # model-major
        merge_ = torch.cat([gm.merge_matrix(0), gm.merge_matrix(1)], 1)  # (fused, all units)
        cluster = merge_.argmax(0)
        # fused unit = the importance-weighted mean of its members: M[c, j] = s_j / S_c
        mass = torch.zeros(gm.n_out, dtype=torch.float64).index_add_(0, cluster, s)
        torch.testing.assert_close(merge_[cluster, torch.arange(len(s))], s / mass[cluster])
        assert not torch.allclose(s, s.mean().expand_as(s))


@pytest.mark.parametrize(("method", "importance"), [("kf-linear", "conductance"),
                                                    ("hf-linear", "deeplift")])  # fmt: skip
def test_fusing_permuted_copies_with_attribution_returns_the_model(
    method: str, importance: str
) -> None:
    """Exact copies have identical activations, so any positive weights give the clusters."""
    model = _mlp(0)
    spec = _spec(model)
    copies = [model, spec.permuted(model, spec.random_permutations(seed=0))]
    fused, res = merge(copies, method, data=_fusion_data(model), ridge=1e-10,
                       importance=importance)  # fmt: skip
    x = torch.randn(16, *model.input_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
    assert all(v == pytest.approx(0.0, abs=1e-8) for v in res.objective.values())


def test_fusion_refuses_unknown_or_unlabelled_importance() -> None:
    a, b = _mlp(0), _mlp(1)
    with pytest.raises(ValueError, match="'importance' parameter.*conductance"):
        merge([a, b], "kf-linear", data=_fusion_data(a, 64), importance="saliency")
    unlabelled = [torch.randn(32, *a.input_shape)]
    with pytest.raises(ValueError, match="uniform"):
        merge([a, b], "kf-linear", data=unlabelled, importance="conductance")
