"""REPAIR through any GroupMap: goals ``Σ_m M_m stat_m`` for permutations, zips, partial zips,
side-by-side and unequal-width maps; BN reset on resized models; the zip's input checks."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn

import symmerge
from symmerge.groupmap import GroupMap
from symmerge.merging import BatchNormStatsWarning, interpolation, merge
from symmerge.models import create_model
from symmerge.renorm import _find_points, _Point, repair, reset_bn

pytestmark = pytest.mark.usefixtures("native_cpu_convs", "one_thread")
CPU = torch.device("cpu")
DT = torch.float64


def _resnets(*names: str) -> list[nn.Module]:
    """BN ResNet-20s (8x8 inputs) with trained-looking BatchNorms: random γ (some < 0), β and
    running statistics."""
    models = []
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        model = create_model(name, input_shape=(3, 8, 8))[0].to(DT).eval()
        gen = torch.Generator().manual_seed(seed)
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                c = bn.num_features
                bn.weight.data = torch.randn(c, generator=gen, dtype=DT)
                bn.bias.data = 0.3 * torch.randn(c, generator=gen, dtype=DT)
                bn.running_mean.copy_(0.1 * torch.randn(c, generator=gen, dtype=DT))
                bn.running_var.copy_(torch.rand(c, generator=gen, dtype=DT) + 0.5)
        models.append(model)
    return models


def _mlps(*outputs: int, width: int = 16) -> list[nn.Module]:
    torch.manual_seed(0)
    return [create_model("mlp", width=width, depth=2, num_classes=k)[0].eval() for k in outputs]


def _data(model: nn.Module, n: int = 2, size: int = 8) -> list[tuple[Tensor, None]]:
    gen = torch.Generator().manual_seed(5)
    dtype = next(model.parameters()).dtype
    return [
        (torch.randn(size, *model.input_shape, generator=gen, dtype=dtype), None) for _ in range(n)
    ]


def _unit_stats(model: nn.Module, points: list[_Point], data) -> dict[str, tuple[Tensor, Tensor]]:
    """Per point: every unit's mean and population std over all data (eval mode), at the
    model's own width."""
    caught: dict[str, list[Tensor]] = {p.module: [] for p in points}

    def keep(p: _Point):
        return lambda mod, a, out: caught[p.module].append(
            out.movedim(p.dim, -1).reshape(-1, out.shape[p.dim])
        )

    hooks = [model.get_submodule(p.module).register_forward_hook(keep(p)) for p in points]
    with torch.no_grad():
        for x, _ in data:
            model.eval()(x)
    for h in hooks:
        h.remove()
    zs = {k: torch.cat(v).double() for k, v in caught.items()}
    return {k: (z.mean(0), z.std(0, correction=0)) for k, z in zs.items()}


def _assert_goals(merged, models, maps, data, tol: float = 1e-9) -> list[_Point]:
    """Every repaired unit i has mean Σ_m (M_m μ_m)_i and std Σ_m (M_m σ_m)_i."""
    points = _find_points(merged, data[0], CPU, None)
    got = _unit_stats(merged, points, data)
    ends = [_unit_stats(m, points, data) for m in models]
    for p in points:
        merges = [maps[p.group].merge_matrix(k) for k in range(len(models))]
        for s in (0, 1):
            goal = sum(a @ e[p.module][s] for a, e in zip(merges, ends, strict=True))
            torch.testing.assert_close(got[p.module][s], goal, rtol=tol, atol=tol)
    return points


def test_permutation_maps_give_the_aligned_repair() -> None:
    """The permutation map is the identity case: goals Σ_m w_m μ_{m, perm_m[i]}, as REPAIR of
    endpoints permuted into the merged order (the call before maps existed) gives; the two
    differ only by the round-off of running the endpoints unpermuted."""
    models = _resnets("resnet20x1", "resnet20x1")
    data = _data(models[0])
    new, res = merge(models, "weight", lam=0.3, renorm="repair", data=data)
    with pytest.warns(BatchNormStatsWarning):
        plain, _ = merge(models, "weight", lam=0.3)
    spec = symmerge.trace(models[0], (data[0][0][:2],))
    aligned = [spec.permuted(m, res.perms(k)) for k, m in enumerate(models)]
    old = repair(plain, aligned, data, weights=(0.7, 0.3), spec=spec)
    for k, v in old.state_dict().items():
        torch.testing.assert_close(new.state_dict()[k], v, rtol=1e-9, atol=1e-12)
    assert all(gm.weights == (0.7, 0.3) for gm in res.maps.values())
    assert len(_assert_goals(new, models, res.maps, data)) == 21


@pytest.mark.parametrize("method,kw", [("ensemble", {}), ("zip", {"stop": 0})])
def test_repair_keeps_the_ensemble(method: str, kw: dict) -> None:
    """Side by side, every unit's goal is its source's own statistics: REPAIR changes nothing
    (also where γ < 0: the correction keeps each unit's sign)."""
    models = _resnets("resnet20x1", "resnet20x1")
    assert any(bool((bn.weight < 0).any()) for bn in models[0].modules() if hasattr(bn, "weight"))
    data = _data(models[0])
    x = torch.randn(16, 3, 8, 8, dtype=DT)
    plain, _ = merge(models, method, data=data, **kw)
    repaired, res = merge(models, method, renorm="repair", data=data, **kw)
    assert all(gm.n_out == 2 * gm.sizes[0] for gm in res.maps.values())  # resized, 2x wide
    with torch.no_grad():
        want = (models[0](x) + models[1](x)) / 2
        torch.testing.assert_close(plain(x), want, rtol=0, atol=1e-12)
        torch.testing.assert_close(repaired(x), want, rtol=0, atol=1e-10)
    state = plain.state_dict()
    assert any(not torch.equal(v, state[k]) for k, v in repaired.state_dict().items())


@pytest.mark.parametrize("stop", [None, 4], ids=["zip", "partial-zip"])
def test_zip_repair_hits_its_goals(stop: int | None) -> None:
    """A zip merges units within and across models: each merged unit's goal is the average of
    its members' statistics; a partial zip keeps later units side by side (own goals)."""
    models = _resnets("resnet20x1", "resnet20x1")
    data = _data(models[0])
    merged, res = merge(models, "zip", renorm="repair", data=data, stop=stop)
    members = torch.stack([(res.maps["conv1.out"].merge_matrix(m) > 0).sum(1) for m in (0, 1)])
    assert bool((members > 0).all(0).any())  # some units mix both models' units
    assert bool((members >= 2).any())  # some merge units of one model
    side = res.maps["layer3.2.conv1.out"]
    assert side.n_out == (64 if stop is None else 128)
    _assert_goals(merged, models, res.maps, data)
    with warnings.catch_warnings():  # the zip without REPAIR is far from the goals
        warnings.simplefilter("ignore", BatchNormStatsWarning)
        plain, _ = merge(models, "zip", data=data, stop=stop)
    with pytest.raises(AssertionError):
        _assert_goals(plain, models, res.maps, data, tol=1e-2)


def test_unequal_widths_repair_hits_its_goals() -> None:
    """Partial permutations: matched units average, the wide model's unmatched units keep their
    own statistics."""
    models = _resnets("resnet20x1", "resnet20x2")
    data = _data(models[0])
    merged, res = merge(models, "weight", renorm="repair", data=data)
    gm = res.maps["conv1.out"]
    assert gm.sizes == (16, 32) and gm.n_out == 32 and gm.indices is not None
    _assert_goals(merged, models, res.maps, data)


def test_interpolation_repairs_every_point_with_its_weights() -> None:
    models = _mlps(10, 10)
    data = _data(models[0], size=32)
    _, res = merge(models, "weight")
    ((lam, point),) = list(interpolation(models, "weight", [0.25], data=data, renorm="repair"))
    maps = {g: gm.with_weights([0.75, 0.25]) for g, gm in res.maps.items()}
    assert len(_assert_goals(point, models, maps, data, tol=1e-5)) == 2  # float32 round-off


def test_repair_rejects_maps_of_other_widths() -> None:
    models = _mlps(10, 10)
    data = _data(models[0])
    merged, _ = merge(models, "ensemble")  # 32 units per group
    maps = {"layers.1.out": GroupMap.identity(16, 2)}
    with pytest.raises(ValueError, match=r"group 'layers.1.out' merges \(16, 16\) units into 16"):
        repair(merged, models, data, maps=maps)


def test_reset_bn_on_resized_models() -> None:
    """The side-by-side model (2x wide) computes every source's units, also in train mode: its
    reset statistics are the sources' own, concatenated."""
    models = _resnets("resnet20x1", "resnet20x1")
    data = _data(models[0])
    merged, _ = merge(models, "ensemble", renorm="reset-bn", data=data)
    sources = [reset_bn(copy.deepcopy(m), data) for m in models]
    state = merged.state_dict()
    for k, v in sources[0].state_dict().items():
        if k.endswith(("running_mean", "running_var")):
            want = torch.cat([v, sources[1].state_dict()[k]])
            torch.testing.assert_close(state[k], want, rtol=1e-10, atol=1e-12)
    zipped, res = merge(models, "zip", renorm="reset-bn", data=data, width={"conv1.out": 24})
    assert res.maps["conv1.out"].n_out == 24
    bns = [m for m in zipped.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(int(bn.num_batches_tracked) == len(data) for bn in bns)


# ---- the zip's input checks ---------------------------------------------------------------


def test_zip_rejects_other_block_counts() -> None:
    def net(groups: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(groups, 8), nn.ReLU(),
                             nn.Flatten(), nn.Linear(8 * 4 * 4, 3)).eval()  # fmt: skip

    x = torch.randn(4, 3, 6, 6)
    with pytest.raises(ValueError, match=r"group '0.out' has 4 blocks .* but 2 in model 1"):
        merge([net(4), net(2)], "zip", data=[(x, None)], example_inputs=(x[:2],))
    merged, _ = merge([net(4), net(4)], "zip", data=[(x, None)], example_inputs=(x[:2],))
    assert merged[1].num_groups == 4


def test_outputs_of_other_sizes_need_per_task_heads() -> None:
    a, b = _mlps(5, 10)
    data = _data(a)
    for method in ("zip", "weight"):
        with pytest.raises(ValueError, match=r"differ in size \(\[5, 10\].*heads='per-task'"):
            merge([a, b], method, data=data)
    x = data[0][0]
    with torch.no_grad():
        merged, _ = merge([a, b], "zip", data=data, stop=0, heads="per-task")
        torch.testing.assert_close(merged(x), torch.cat([a(x), b(x)], 1), rtol=0, atol=1e-6)
        merged, _ = merge([b, a], "weight", heads="per-task")
        assert merged(x).shape == (8, 15)
