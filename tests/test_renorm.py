"""BN reset and REPAIR: statistics recomputed exactly, goals hit, corrections folded losslessly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import symmerge
from symmerge.models import create_model
from symmerge.renorm import _affine_hook, _find_points, _fold, _Point, repair, reset_bn

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("native_cpu_convs")


def _pair(
    name: str, seed: int = 0, n: int = 2, dtype: torch.dtype = torch.float64, **kw
) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [create_model(name, **kw)[0].to(dtype).eval() for _ in range(n)]


def _data(model: nn.Module, n: int = 3, size: int = 16, seed: int = 1) -> list[tuple]:
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    return [
        (torch.randn(size, *model.input_shape, generator=gen).to(dtype), None) for _ in range(n)
    ]


def _average(models: list[nn.Module]) -> nn.Module:
    merged = copy.deepcopy(models[0])
    sds = [m.state_dict() for m in models]
    merged.load_state_dict(
        {
            k: sum(sd[k] for sd in sds) / len(sds) if v.is_floating_point() else v
            for k, v in sds[0].items()
        }
    )
    return merged


def _moments(model: nn.Module, points: list[_Point], data) -> dict[str, tuple]:
    """Per point: per-channel mean and population std of the hooked output over all data."""
    caught: dict[str, list[torch.Tensor]] = {p.module: [] for p in points}

    def keep(p: _Point):
        return lambda mod, a, out: caught[p.module].append(
            out.movedim(p.dim, -1).reshape(-1, p.size)
        )

    hooks = [model.get_submodule(p.module).register_forward_hook(keep(p)) for p in points]
    model.eval()
    with torch.no_grad():
        for x, _ in data:
            model(x)
    for h in hooks:
        h.remove()
    out = {}
    for name, zs in caught.items():
        z = torch.cat(zs)
        out[name] = (z.mean(0), z.std(0, correction=0))
    return out


# ---- BN reset -----------------------------------------------------------------------------


def test_reset_bn_equals_direct_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.9),
        nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6, momentum=0.3), nn.ReLU(),
    ).double()  # fmt: skip
    data = [torch.randn(10, 3, 9, 9, dtype=torch.float64) * 2 + 1 for _ in range(4)]
    # direct: the BN inputs during a pass with batch statistics and dropout off
    ref = copy.deepcopy(model).eval()
    for i in (1, 5):
        ref[i].train()
    inputs: dict[int, list[torch.Tensor]] = {1: [], 5: []}
    for i in inputs:
        ref[i].register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].clone()))
    with torch.no_grad():
        for x in data:
            ref(x)
    model.train()
    model[3].eval()  # a caller's per-module mode must survive too
    assert reset_bn(model, [(x, torch.zeros(10)) for x in data]) is model
    for i, xs in inputs.items():
        bn = model[i]
        mean = torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
        var = torch.stack([x.var((0, 2, 3), correction=1) for x in xs]).mean(0)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)
        assert int(bn.num_batches_tracked) == len(data)
    assert model[1].momentum == 0.1 and model[5].momentum == 0.3
    assert model.training and model[1].training and not model[3].training
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="no batches"):
        reset_bn(model, [])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ---- REPAIR -------------------------------------------------------------------------------

CASES = [
    ("mlp", {"width": 24, "depth": 2}, "layers.1", "layers.1"),
    ("resnet20x1", {"input_shape": (3, 8, 8)}, "layer2.0.shortcut.0", "layer2.0.shortcut.1"),
    ("resnet20x1-ln", {"input_shape": (3, 8, 8)}, "layer1.0.conv1", "layer1.0.norm1"),
    ("vgg11", {"norm": "none"}, "features.3", "features.3"),
]


@pytest.mark.parametrize("name,kw,layer,module", CASES, ids=[c[0] for c in CASES])
def test_repair_hits_goal_statistics(name: str, kw: dict, layer: str, module: str) -> None:
    endpoints = _pair(name, dtype=torch.float32, **kw)  # float64 convs are slow on CPU
    data = _data(endpoints[0], n=2, size={"mlp": 64, "vgg11": 4}.get(name, 8))
    for e in endpoints:
        reset_bn(e, data)
    merged = _average(endpoints)
    keys = {k: v.shape for k, v in merged.state_dict().items()}
    spec = symmerge.trace(merged, data[0][0][:2])
    points = _find_points(merged, data[0], CPU, spec)
    assert (layer, module) in {(p.layer, p.module) for p in points}
    assert len(points) == {"mlp": 2, "vgg11": 8}.get(name, 21)  # every hidden conv/linear

    ends = [_moments(e, points, data) for e in endpoints]
    fast = repair(copy.deepcopy(merged), endpoints, data, exact=False, spec=spec)
    exact = repair(merged, endpoints, data, spec=spec)
    assert {k: v.shape for k, v in exact.state_dict().items()} == keys  # same architecture
    worst_fast = worst_exact = 0.0
    for model, is_exact in ((fast, False), (exact, True)):
        got = _moments(model, points, data)
        for p in points:
            mu = (ends[0][p.module][0] + ends[1][p.module][0]) / 2
            sd = (ends[0][p.module][1] + ends[1][p.module][1]) / 2
            err = max(
                float(((got[p.module][0] - mu).abs() / sd).max()),
                float(((got[p.module][1] - sd).abs() / sd).max()),
            )
            if is_exact:
                worst_exact = max(worst_exact, err)
            else:
                worst_fast = max(worst_fast, err)
    assert worst_exact < 1e-5  # float32 round-off
    assert worst_fast < 0.2  # REPAIR's single train-mode pass is only approximately right


def test_repair_n_endpoints_weights_and_mean_of_vars() -> None:
    endpoints = _pair("mlp", n=3, width=16, depth=2)
    data = _data(endpoints[0])
    merged = _average(endpoints)
    points = _find_points(merged, data[0], CPU, None)
    w = [0.2, 0.3, 0.5]
    repair(merged, endpoints, data, weights=w, goal_std="mean_of_vars")
    ends = [_moments(e, points, data) for e in endpoints]
    got = _moments(merged, points, data)
    for p in points:
        mu = sum(wi * e[p.module][0] for wi, e in zip(w, ends, strict=True))
        sd = sum(wi * e[p.module][1] ** 2 for wi, e in zip(w, ends, strict=True)).sqrt()
        torch.testing.assert_close(got[p.module][0], mu, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got[p.module][1], sd, rtol=1e-9, atol=1e-9)


def test_repair_rejects_unaligned_widths() -> None:
    (a,) = _pair("mlp", n=1, width=8, depth=1)
    (b,) = _pair("mlp", n=1, width=9, depth=1)
    with pytest.raises(ValueError, match="aligned"):
        repair(a, [a, b], _data(a))
    with pytest.raises(ValueError, match="goal_std"):
        repair(a, [a], _data(a), goal_std="median")


def test_fold_preserves_the_corrected_function() -> None:
    torch.manual_seed(0)
    bare = nn.Sequential(  # bias-free conv without a norm: the fold must add a bias
        nn.Conv2d(3, 6, 3, bias=False), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(5 * 5 * 5, 7), nn.ReLU(), nn.Linear(7, 2),
    ).double()  # fmt: skip
    cases = [
        (bare, torch.randn(4, 3, 9, 9, dtype=torch.float64)),
        (_pair("resnet20x1", n=1, input_shape=(3, 8, 8))[0], None),
        (_pair("resnet20x1-gn", n=1, input_shape=(3, 8, 8))[0], None),
    ]
    for model, x in cases:
        if x is None:
            x = _data(model, n=1)[0][0]
        model.eval()
        points = _find_points(model, x, CPU, symmerge.trace(model, x[:2]))
        gen = torch.Generator().manual_seed(3)
        fixes = {
            p.module: (
                torch.rand(p.size, generator=gen, dtype=torch.float64) + 0.5,
                torch.randn(p.size, generator=gen, dtype=torch.float64),
            )
            for p in points
        }
        hooks = [
            model.get_submodule(p.module).register_forward_hook(_affine_hook(p, *fixes[p.module]))
            for p in points
        ]
        with torch.no_grad():
            want = model(x)
        for h in hooks:
            h.remove()
        folded = copy.deepcopy(model)
        for p in points:
            _fold(folded, p, *fixes[p.module])
        with torch.no_grad():
            got = folded(x)
        assert not torch.allclose(got, model(x))  # the correction does change the function
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert [p.module for p in _find_points(bare, cases[0][1], CPU, None)] == ["0", "2", "5"]
