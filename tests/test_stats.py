"""Streaming statistics equal a direct computation on the same activations, for N models at
once, on one process or summed over processes."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import symmerge
from symmerge.models import create_model
from symmerge.spec import ActivationSite, Group
from symmerge.stats import (
    ActivationStats,
    collect_statistics,
    default_sites,
    flatten_units,
    unflatten_units,
)

pytestmark = pytest.mark.usefixtures("native_cpu_convs")


def _models(name: str, n: int, seed: int = 0, **kw) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [create_model(name, **kw)[0].double().eval() for _ in range(n)]


def _batches(model: nn.Module, n: int, size: int = 8, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = model.input_shape
    return [torch.randn(size, *shape, generator=gen, dtype=torch.float64) + 0.5 for _ in range(n)]


def _direct(
    models: list[nn.Module], sites: dict[str, list[ActivationSite]], batches
) -> dict[str, torch.Tensor]:
    """Per group: rows = samples from every site, columns = units of all models (model-major)."""
    rows: dict[str, list[torch.Tensor]] = {g: [] for g in sites}
    caught: dict = {}

    def keep(key, dim):
        return lambda mod, a, out: caught.__setitem__(key, flatten_units(out, dim).clone())

    for x in batches:
        caught.clear()
        for m, model in enumerate(models):
            hooks = [
                model.get_submodule(s.module).register_forward_hook(keep((s.node, m), s.dim))
                for ss in sites.values()
                for s in ss
            ]
            with torch.no_grad():
                model(x)
            for h in hooks:
                h.remove()
        for g, ss in sites.items():
            rows[g] += [torch.cat([caught[(s.node, m)] for m in range(len(models))], 1) for s in ss]
    return {g: torch.cat(r) for g, r in rows.items()}


def _nearest(raw: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.cdist(raw, z, compute_mode="donot_use_mm_for_euclid_dist").min(1).values


@pytest.fixture(scope="module")
def resnet_setup():
    models = _models("resnet20x1", 2, input_shape=(3, 8, 8))
    spec = symmerge.trace(models[0], _batches(models[0], 1)[0][:2])
    return spec, models, _batches(models[0], 3)


def test_flatten_round_trip() -> None:
    for shape, dim in [((2, 5, 3, 4), 1), ((2, 7, 6), 2), ((4, 9), 1), ((3, 6, 2), 1)]:
        x = torch.randn(shape)
        z = flatten_units(x, dim)
        assert z.shape == (x.numel() // shape[dim], shape[dim])
        assert torch.equal(z[:, 2], x.select(dim, 2).reshape(-1))
        assert torch.equal(unflatten_units(z, shape, dim), x)


def test_statistics_equal_direct_computation(resnet_setup) -> None:
    spec, models, batches = resnet_setup
    stats = collect_statistics(spec, models, [(x, torch.zeros(len(x))) for x in batches])
    assert set(stats.groups) == set(spec.groups)
    direct = _direct(models, stats.sites, batches)
    for g in stats.groups:
        z = direct[g]
        assert stats.count(g) == z.shape[0]
        assert stats.mean(g).shape == (2 * spec.groups[g].size,)
        torch.testing.assert_close(stats.mean(g), z.mean(0), rtol=0, atol=1e-12)
        torch.testing.assert_close(stats.second_moment(g), z.T @ z / len(z), rtol=1e-10, atol=1e-12)
        cov = torch.from_numpy(np.cov(z.numpy().T, bias=True))
        torch.testing.assert_close(stats.covariance(g), cov, rtol=1e-9, atol=1e-12)
        live = z.std(0) > 0
        corr = torch.from_numpy(np.corrcoef(z[:, live].numpy().T))
        torch.testing.assert_close(stats.correlation(g)[live][:, live], corr, rtol=1e-8, atol=1e-10)
    # the residual stream is observed at the stem ReLU and after every block of stage 1
    stream = spec.groups["conv1.out"]
    assert [s.module for s in stats.sites["conv1.out"]] == [
        "relu", "layer1.0.relu2", "layer1.1.relu2", "layer1.2.relu2",
    ]  # fmt: skip
    assert stats.count("conv1.out") == 4 * 3 * 8 * 8 * 8
    assert stream.size == 16


def test_one_pass_of_n_models_equals_separate_passes(resnet_setup) -> None:
    spec, models, batches = resnet_setup
    third = _models("resnet20x1", 1, seed=5, input_shape=(3, 8, 8))[0]
    joint = collect_statistics(spec, [*models, third], batches)
    alone = [collect_statistics(spec, [m], batches) for m in (*models, third)]
    for g in joint.groups:
        for m in range(3):
            sl = joint.units(g, m)
            torch.testing.assert_close(joint.mean(g)[sl], alone[m].mean(g), rtol=0, atol=1e-12)
            torch.testing.assert_close(
                joint.covariance(g)[sl, sl], alone[m].covariance(g), rtol=1e-9, atol=1e-12
            )


def test_mlp_groups_use_post_relu_and_dead_units_are_safe() -> None:
    torch.manual_seed(0)
    models = [create_model("mlp", width=16, depth=2)[0].double() for _ in range(2)]
    with torch.no_grad():  # unit 3 of the first hidden layer of model 0 never fires
        models[0].layers[1].weight[3] = 0
        models[0].layers[1].bias[3] = -1
    batches = _batches(models[0], 2, size=16)
    spec = symmerge.trace(models[0], batches[0][:2])
    stats = collect_statistics(spec, models, batches)
    g = "layers.1.out"
    assert [s.op for s in stats.sites[g]] == ["relu"]
    corr = stats.correlation(g)
    assert torch.isfinite(corr).all() and corr.abs().max() <= 1.0
    assert corr[3].abs().max() == 0 and corr[:, 3].abs().max() == 0
    assert stats.variance(g)[3] == 0
    torch.testing.assert_close(corr.diagonal()[:3], torch.ones(3, dtype=torch.float64))


def test_site_choice() -> None:
    linear = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2))
    spec = symmerge.trace(linear, torch.randn(2, 4))
    for group in spec.groups.values():  # no nonlinearity: the last module output is used
        assert default_sites(group) == [s for s in group.sites if s.module_output][-1:]
    g = Group("g", 4, sites=[ActivationSite("a", "m", 1, "conv2d", True)])
    assert default_sites(g)[0].node == "a"
    mlp = _models("mlp", 1, width=8, depth=1)[0]
    spec = symmerge.trace(mlp, torch.randn(2, 1, 28, 28, dtype=torch.float64))
    x = [torch.randn(4, 1, 28, 28, dtype=torch.float64)]
    pre = collect_statistics(spec, [mlp], x, sites="all")
    assert [s.op for s in pre.sites["layers.1.out"]] == ["linear", "relu"]
    assert pre.count("layers.1.out") == 8
    with pytest.raises(ValueError, match="sites"):
        collect_statistics(spec, [mlp], x, sites="bogus")
    with pytest.raises(KeyError, match="unknown groups"):
        collect_statistics(spec, [mlp], x, groups=["nope"])
    with pytest.raises(KeyError, match="collected groups"):
        pre.mean("nope")


class _Inline(nn.Module):
    """A hidden layer computed inside one module: its units are never a module's output."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(5, 4))
        self.w2 = nn.Parameter(torch.randn(3, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.w1.T) @ self.w2.T


def test_groups_without_hookable_sites_are_reported() -> None:
    model = nn.Sequential(_Inline(), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(4, 4)
    spec = symmerge.trace(model, x[:2])
    hidden = next(g for g, grp in spec.groups.items() if grp.size == 5)
    stats = collect_statistics(spec, [model], [x])
    assert stats.unobserved == [hidden] and hidden not in stats.groups
    assert stats.count(next(iter(stats.groups))) == 4
    with pytest.raises(ValueError, match="no module-output site"):
        collect_statistics(spec, [model], [x], groups=[hidden])


def test_large_mean_is_not_cancelled() -> None:
    """float32 activations with mean 1e4 and std 1: E[zzᵀ] − μμᵀ would lose every digit."""

    class Offset(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 5)
            self.act = nn.ReLU()
            self.out = nn.Linear(5, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.act(self.fc(x)))

    torch.manual_seed(0)
    model = Offset()
    with torch.no_grad():
        model.fc.bias.fill_(1e4)
    spec = symmerge.trace(model, torch.randn(2, 3))
    batches = [torch.randn(256, 3) for _ in range(4)]
    stats = collect_statistics(spec, [model], batches)
    g = next(iter(stats.groups))
    z = _direct([model.double()], stats.sites, [b.double() for b in batches])[g]
    cov = torch.from_numpy(np.cov(z.numpy().T, bias=True))
    torch.testing.assert_close(stats.covariance(g), cov, rtol=1e-4, atol=1e-4)


def test_raw_buffer_is_a_sample_of_rows(resnet_setup) -> None:
    spec, models, batches = resnet_setup
    groups = ["layer3.0.conv1.out", "layer1.0.conv1.out"]  # rows and native buffer layouts
    stats = collect_statistics(spec, models, batches, groups=groups, raw_samples=40)
    assert stats.groups == groups
    direct = _direct(models, stats.sites, batches)
    for g in groups:
        raw = stats.raw(g)
        assert raw.shape == (40, 2 * spec.groups[g].size)
        assert _nearest(raw, direct[g]).max() < 1e-12  # every kept row is a real sample
        assert len({tuple(r.tolist()) for r in raw}) == 40  # no duplicates
    small = collect_statistics(
        spec, models, batches[:1], groups=["layer3.0.conv1.out"], raw_samples=10**6
    )
    assert small.raw("layer3.0.conv1.out").shape[0] == small.count("layer3.0.conv1.out")


def test_modes_and_devices_are_restored(resnet_setup) -> None:
    spec, models, batches = resnet_setup
    models[0].train()
    collect_statistics(spec, models, batches[:1])
    assert models[0].training and not models[1].training
    assert all(m.training for m in models[0].modules())
    models[0].eval()
    assert not any(h for m in models[0].modules() for h in m._forward_hooks.values())


# ---- data parallel: two gloo processes, each with half the batches ------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, spec, models, batches, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        stats = collect_statistics(spec, models, batches[rank::world], raw_samples=30)
        stats.all_reduce()
        if rank == 0:
            torch.save(stats, out)
    finally:
        dist.destroy_process_group()


def test_all_reduce_equals_single_process(resnet_setup, tmp_path: Path) -> None:
    spec, models, batches = resnet_setup
    batches = batches + _batches(models[0], 1, seed=7)
    out = str(tmp_path / "stats.pt")
    mp.spawn(_worker, args=(2, _free_port(), spec, models, batches, out), nprocs=2)
    reduced: ActivationStats = torch.load(out, weights_only=False)
    single = collect_statistics(spec, models, batches)
    for g in single.groups:
        assert reduced.count(g) == single.count(g)
        torch.testing.assert_close(reduced.mean(g), single.mean(g), rtol=0, atol=1e-12)
        torch.testing.assert_close(
            reduced.second_moment(g), single.second_moment(g), rtol=1e-10, atol=1e-12
        )
        torch.testing.assert_close(
            reduced.covariance(g), single.covariance(g), rtol=1e-9, atol=1e-12
        )
    g = "layer3.0.conv1.out"
    z = _direct(models, {g: single.sites[g]}, batches)[g]
    assert reduced.raw(g).shape == (30, 128)
    assert _nearest(reduced.raw(g), z).max() < 1e-12
