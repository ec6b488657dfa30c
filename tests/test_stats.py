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
import torch.nn.functional as F
from torch import nn

import symmerge
import symmerge.stats as stats_mod
from symmerge.models import create_model
from symmerge.spec import ActivationSite, Group
from symmerge.stats import (
    ActivationStats,
    HookSite,
    LayerProducts,
    collect_layer_products,
    collect_statistics,
    default_sites,
    flatten_units,
    hook_site,
    layer_io,
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


class _TupleBlock(nn.Module):
    """Returns ``(hidden, input)``: the value it computes last is not what a hook receives."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 7)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.relu(self.fc(x)), x


class _TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.out = _TupleBlock(), nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(x)[0])


def test_a_module_returning_a_tuple_is_no_hook_site() -> None:
    """Hugging Face blocks and models return tuples or ModelOutputs: a hook on them gets no
    tensor, so the value computed last inside them is no module output (GPT-2's final
    residual stream and Swin's pooled features used to fail activation matching)."""
    torch.manual_seed(0)
    a = _TupleNet().double().eval()
    x = torch.randn(64, 5, dtype=torch.float64)
    spec = symmerge.trace(a, x[:2])
    (hidden,) = [g for g in spec.groups.values() if g.size == 7]
    by_module = {s.module: s.module_output for s in hidden.sites}
    assert by_module == {"block.fc": True, "block": False}
    b = spec.permuted(a, spec.random_permutations(seed=1))
    merged, _ = symmerge.merge([a, b], "activation", data=[x], spec=spec)
    torch.testing.assert_close(merged(x), a(x))


class _MultiheadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj, self.out = nn.Linear(6, 8), nn.Linear(8, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return self.out(self.attn(h, h, h, need_weights=False)[0].mean(1))


def test_a_module_never_called_is_named_in_the_error() -> None:
    """nn.MultiheadAttention reads out_proj's weight without calling out_proj, so the head
    dims have no site a hook sees: activation matching says so and points to weight
    matching, which recovers a permuted copy."""
    torch.manual_seed(0)
    a = _MultiheadNet().eval()
    x = torch.randn(16, 5, 6)
    spec = symmerge.trace(a, x[:2])
    b = spec.permuted(a, spec.random_permutations(seed=1))
    with pytest.raises(RuntimeError, match="never observed: module 'attn.out_proj' was not called"):
        symmerge.merge([a, b], "activation", data=[x], spec=spec)
    merged, _ = symmerge.merge([a, b], "weight", spec=spec)
    torch.testing.assert_close(merged(x), a(x))


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
    with pytest.raises(ValueError, match="no site a forward hook can observe"):
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


# ---- parents of different widths: one spec per model --------------------------------------


def test_per_model_specs_of_different_widths() -> None:
    torch.manual_seed(0)
    wide, narrow = (create_model("mlp", width=w, depth=2)[0].double() for w in (512, 256))
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    specs = [symmerge.trace(m, (x,)) for m in (wide, narrow)]
    batches = _batches(wide, 3, size=16)
    stats = collect_statistics(specs[0], [wide, narrow], batches, specs=specs)
    g = "layers.3.out"
    assert stats.size(g, 0) == 512 and stats.size(g, 1) == 256 and stats.total_size(g) == 768
    assert stats.units(g, 1) == slice(512, 768)
    with pytest.raises(ValueError, match="different size in every model"):
        stats.size(g)
    direct = _direct([wide, narrow], stats.sites, batches)
    alone = collect_statistics(specs[1], [narrow], batches)  # the narrow model's own blocks
    for g in stats.groups:
        z = direct[g]
        assert z.shape[1] == stats.total_size(g) and stats.count(g) == len(z)
        torch.testing.assert_close(stats.mean(g), z.mean(0), rtol=0, atol=1e-12)
        torch.testing.assert_close(stats.second_moment(g), z.T @ z / len(z), rtol=1e-10, atol=1e-12)
        live = z.std(0) > 0
        corr = torch.from_numpy(np.corrcoef(z[:, live].numpy().T))
        torch.testing.assert_close(stats.correlation(g)[live][:, live], corr, rtol=1e-8, atol=1e-10)
        sl = stats.units(g, 1)
        torch.testing.assert_close(
            stats.covariance(g)[sl, sl], alone.covariance(g), rtol=1e-9, atol=1e-12
        )
    deeper = create_model("mlp", width=256, depth=3)[0].double()
    with pytest.raises(ValueError, match="matched by group name"):
        collect_statistics(
            specs[0], [wide, deeper], batches, specs=[specs[0], symmerge.trace(deeper, (x,))]
        )
    with pytest.raises(ValueError, match="one per model"):
        collect_statistics(specs[0], [wide, narrow], batches, specs=specs[:1])


def test_per_model_specs_give_per_model_slices() -> None:
    """ViTs of widths 48 and 24: q/k are slices [0:48], [48:96] of one qkv, [0:24], [24:48]
    of the other."""
    torch.manual_seed(0)
    models = [create_model("vit-tiny", dim=d, depth=1)[0].double().eval() for d in (48, 24)]
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    specs = [symmerge.trace(m, (x[:2],)) for m in models]
    g = "blocks.0.attn.qkv.qk"
    stats = collect_statistics(specs[0], models, [x], groups=[g], specs=specs)
    assert stats.model_sizes[g] == (48, 24) and stats.units(g, 1) == slice(48, 72)
    outs = []
    for model in models:
        h = model.blocks[0].attn.qkv.register_forward_hook(lambda mod, a, o: outs.append(o))
        with torch.no_grad():
            model(x)
        h.remove()
    # per model: q rows, then k rows (the sites' order); models side by side
    qk = [
        torch.cat([y[..., :d], y[..., d : 2 * d]]).reshape(-1, d)
        for y, d in zip(outs, (48, 24), strict=True)
    ]
    z = torch.cat(qk, 1)
    assert stats.count(g) == len(z) == 2 * 3 * 65
    torch.testing.assert_close(stats.mean(g), z.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(stats.second_moment(g), z.T @ z / len(z), rtol=1e-10, atol=1e-12)


# ---- sites on module inputs and on slices of an axis --------------------------------------


@pytest.fixture(scope="module")
def vit_setup():
    torch.manual_seed(0)
    models = [create_model("vit-tiny")[0].double().eval() for _ in range(2)]
    spec = symmerge.trace(models[0], (torch.randn(2, 3, 32, 32, dtype=torch.float64),))
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64) for _ in range(2)]
    return spec, models, batches


def test_vit_head_dim_groups_are_observed_on_qkv_slices(vit_setup) -> None:
    spec, models, batches = vit_setup
    qk, vo, heads = "blocks.1.attn.qkv.qk", "blocks.1.attn.qkv.vo", "blocks.1.attn.qkv.heads"
    stats = collect_statistics(spec, models, batches)
    assert qk in stats.groups and vo in stats.groups and heads in stats.unobserved
    assert [(s.module, s.offset, s.size) for s in stats.sites[qk]] == [
        ("blocks.1.attn.qkv", 0, 192), ("blocks.1.attn.qkv", 192, 192),
    ]  # fmt: skip
    # manual: the fused qkv output of every model, q and k rows stacked, models side by side
    outs: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for m, model in enumerate(models):
        h = model.blocks[1].attn.qkv.register_forward_hook(lambda mod, a, o, m=m: outs[m].append(o))
        with torch.no_grad():
            for x in batches:
                model(x)
        h.remove()
    qkv = [torch.cat(outs[m]).reshape(-1, 576) for m in range(2)]
    z_qk = torch.cat([torch.cat([y[:, :192], y[:, 192:384]]) for y in qkv], 1)
    z_vo = torch.cat([y[:, 384:] for y in qkv], 1)
    assert stats.count(qk) == len(z_qk) == 2 * 2 * 2 * 65
    for g, z in ((qk, z_qk), (vo, z_vo)):
        torch.testing.assert_close(stats.mean(g), z.mean(0), rtol=0, atol=1e-12)
        cov = torch.from_numpy(np.cov(z.numpy().T, bias=True))
        torch.testing.assert_close(stats.covariance(g), cov, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="no site a forward hook can observe"):
        collect_statistics(spec, models, batches, groups=[heads])


def test_input_sites_and_slice_sizes() -> None:
    mlp = _models("mlp", 2, width=8, depth=2)
    spec = symmerge.trace(mlp[0], torch.randn(2, 1, 28, 28, dtype=torch.float64))
    batches = _batches(mlp[0], 2)
    g = "layers.1.out"  # observed after its ReLU (layers.2), i.e. at the input of layers.3
    at_input = hook_site("layers.3", -1, at_input=True)
    assert isinstance(at_input, HookSite) and not at_input.module_output
    ref = collect_statistics(spec, mlp, batches, groups=[g])
    pre = collect_statistics(spec, mlp, batches, groups=[g], sites={g: [at_input]})
    assert [s.module for s in ref.sites[g]] == ["layers.2"] and pre.count(g) == ref.count(g)
    torch.testing.assert_close(pre.mean(g), ref.mean(g), rtol=0, atol=0)
    torch.testing.assert_close(pre.second_moment(g), ref.second_moment(g), rtol=0, atol=0)
    with pytest.raises(ValueError, match="slice"):  # a slice must hold the group's units
        collect_statistics(
            spec, mlp, batches, groups=[g], sites={g: [hook_site("layers.3", -1, size=4)]}
        )


# ---- least-squares products ---------------------------------------------------------------


def _tanh_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()


def _layer_io(model: nn.Module, layer: str, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's inputs and outputs over all batches, caught by a plain forward hook."""
    xs, ys = [], []

    def keep(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        xs.append(args[0])
        ys.append(out)

    h = model.get_submodule(layer).register_forward_hook(keep)
    with torch.no_grad():
        for x in batches:
            model(x)
    h.remove()
    return torch.cat(xs), torch.cat(ys)


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)


def test_layer_products_reproduce_linear_layers() -> None:
    model = _tanh_mlp(0)
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randn(3, 7, 6, generator=gen, dtype=torch.float64) for _ in range(3)
    ]  # (B, T, D)
    products = collect_layer_products([model], batches, ["0", "2"])
    for layer in ("0", "2"):
        x, y = _layer_io(model, layer, batches)
        x = _with_ones(x.reshape(-1, x.shape[-1]))
        y = y.reshape(-1, y.shape[-1])
        assert products.counts[layer] == len(x) == 63
        torch.testing.assert_close(products.xtx[layer], x.T @ x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(products.xty[layer], x.T @ y, rtol=1e-12, atol=1e-12)
        weight, bias = products.solve(layer)
        mod = model.get_submodule(layer)
        torch.testing.assert_close(weight, mod.weight, rtol=0, atol=1e-9)
        torch.testing.assert_close(bias, mod.bias, rtol=0, atol=1e-9)
    weight, _ = products.solve("2", ridge=1e3)  # a heavy ridge shrinks the solution
    assert weight.norm() < 0.5 * model[2].weight.norm()


def test_layer_products_from_a_start_keep_what_the_data_leave_free() -> None:
    """With a start θ₀, xty is Xᵀ(Y − Xθ₀) and solve gives θ₀ plus the least-norm correction:
    exact on full-rank data from any start; a heavy ridge stays at the start, not at zero; and
    with fewer samples than inputs the true weights, given as the start, are kept exactly."""
    model = _tanh_mlp(0)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 6, generator=gen, dtype=torch.float64) for _ in range(2)]
    layer = model[2]
    off = (torch.randn(4, 5, generator=gen, dtype=torch.float64), torch.ones(4).double())
    products = collect_layer_products([model], batches, ["2"], start={"2": off})
    x, y = _layer_io(model, "2", batches)
    x = _with_ones(x)
    theta0 = torch.cat([off[0].T, off[1][None]])
    torch.testing.assert_close(products.xty["2"], x.T @ (y - x @ theta0), rtol=1e-12, atol=1e-12)
    weight, bias = products.solve("2")
    torch.testing.assert_close(weight, layer.weight, rtol=0, atol=1e-9)
    torch.testing.assert_close(bias, layer.bias, rtol=0, atol=1e-9)
    weight, bias = products.solve("2", ridge=1e9)
    torch.testing.assert_close(weight, off[0], rtol=0, atol=1e-6)
    few = [batches[0][:3]]  # 3 samples, 6 columns: rank deficient
    own = (layer.weight, layer.bias)
    products = collect_layer_products([model], few, ["2"], start={"2": own})
    assert float(products.xty["2"].abs().max()) < 1e-12
    for ridge in (0.0, 1e-4):
        weight, bias = products.solve("2", ridge)
        torch.testing.assert_close(weight, layer.weight, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="not in layers"):
        collect_layer_products([model], few, ["2"], start={"0": own})


class _InPlaceAfterLinear(nn.Module):
    """A Linear whose output an inplace activation overwrites, and a residual ``+=`` on a
    Linear's output (torchvision's MobileNetV3 classifier, ResNet blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 5), nn.Hardswish(inplace=True), nn.Linear(5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act(self.fc1(x)))
        out += x
        return out


def test_layer_inputs_and_outputs_survive_in_place_ops_after_the_hook() -> None:
    torch.manual_seed(0)
    models = [_InPlaceAfterLinear(), _InPlaceAfterLinear()]
    batches = [torch.randn(4, 6) for _ in range(3)]
    seen = list(layer_io(models, batches, ["fc1", "fc2"]))
    assert len(seen) == 6
    for i, (name, _, y) in enumerate(seen):
        batch = batches[i // 2]
        expect = [m.get_submodule(name)(m.act(m.fc1(batch)) if name == "fc2" else batch)
                  for m in models]  # fmt: skip
        torch.testing.assert_close(y, torch.cat(expect, -1).detach(), rtol=0, atol=1e-6)


def _im2col(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Patches by slicing (no F.unfold): rows (b, i, j) of output positions, columns (c, kh, kw)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
    )
    xp = F.pad(x, (pw, pw, ph, ph))
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cols = [
        xp[:, :, a * dh : a * dh + sh * (ho - 1) + 1 : sh, b * dw : b * dw + sw * (wo - 1) + 1 : sw]
        for a in range(kh)
        for b in range(kw)
    ]  # each (B, C, ho, wo)
    patches = torch.stack(cols, 2)  # (B, C, kh*kw, ho, wo)
    return patches.permute(0, 3, 4, 1, 2).reshape(x.shape[0] * ho * wo, -1)


def test_layer_products_reproduce_strided_padded_convs(monkeypatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(6, 4, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1), bias=False),
    ).double()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 9, 9, generator=gen, dtype=torch.float64) for _ in range(3)]
    layers = ["0", "2"]
    products = collect_layer_products([model], batches, layers)
    for layer in layers:
        conv = model.get_submodule(layer)
        x, y = _layer_io(model, layer, batches)
        cols = _im2col(x, conv)
        cols = _with_ones(cols) if conv.bias is not None else cols
        rows = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
        assert products.counts[layer] == len(cols) == len(rows)
        torch.testing.assert_close(products.xtx[layer], cols.T @ cols, rtol=1e-12, atol=1e-11)
        torch.testing.assert_close(products.xty[layer], cols.T @ rows, rtol=1e-12, atol=1e-11)
        weight, bias = products.solve(layer)
        torch.testing.assert_close(weight, conv.weight, rtol=0, atol=1e-9)
        if conv.bias is None:
            assert bias is None
        else:
            torch.testing.assert_close(bias, conv.bias, rtol=0, atol=1e-9)
    monkeypatch.setattr(stats_mod, "_BMM_ELEMENTS", 100)  # one image per chunk
    chunked = collect_layer_products([model], batches, layers)
    for layer in layers:
        torch.testing.assert_close(chunked.xtx[layer], products.xtx[layer], rtol=1e-12, atol=1e-11)
        torch.testing.assert_close(chunked.xty[layer], products.xty[layer], rtol=1e-12, atol=1e-11)


def test_layer_products_of_several_models_and_custom_targets() -> None:
    models = [_tanh_mlp(0), _tanh_mlp(1)]
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(16, 6, generator=gen, dtype=torch.float64) for _ in range(2)]
    (x0, y0), (x1, y1) = (_layer_io(m, "2", batches) for m in models)
    both = collect_layer_products(models, batches, ["2"])  # default: models side by side
    x = _with_ones(torch.cat([x0, x1], 1))
    assert both.xtx["2"].shape == (11, 11) and both.xty["2"].shape == (11, 8)
    torch.testing.assert_close(both.xtx["2"], x.T @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(both.xty["2"], x.T @ torch.cat([y0, y1], 1), rtol=1e-12, atol=1e-12)
    mean = collect_layer_products(
        models,
        batches,
        ["2"],
        inputs={"2": lambda xs: xs[1]},
        targets={"2": lambda ys: (ys[0] + ys[1]) / 2},
    )
    x = _with_ones(x1)
    torch.testing.assert_close(mean.xty["2"], x.T @ ((y0 + y1) / 2), rtol=1e-12, atol=1e-12)
    own = collect_layer_products(
        models, batches, ["2"], inputs={"2": lambda xs: xs[1]}, targets={"2": lambda ys: ys[1]}
    )
    weight, bias = own.solve("2")
    torch.testing.assert_close(weight, models[1][2].weight, rtol=0, atol=1e-9)
    torch.testing.assert_close(bias, models[1][2].bias, rtol=0, atol=1e-9)


def test_layer_products_refuse_what_they_cannot_unfold() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ReLU())
    x = [torch.randn(2, 4, 6, 6)]
    with pytest.raises(ValueError, match="grouped conv"):
        collect_layer_products([model], x, ["0"])
    with pytest.raises(ValueError, match=r"support nn.Linear and nn.Conv2d"):
        collect_layer_products([model], x, ["1"])
    with pytest.raises(ValueError, match="not in layers"):
        collect_layer_products([model], x, ["0"], targets={"1": lambda ys: ys[0]})
    assert isinstance(collect_layer_products([model], [], []), LayerProducts)


# ---- data parallel: two gloo processes, each with half the batches ------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LS_LAYERS = ["layer2.0.conv1", "fc"]


def _worker(rank: int, world: int, port: int, spec, models, batches, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        stats = collect_statistics(spec, models, batches[rank::world], raw_samples=30)
        stats.all_reduce()
        products = collect_layer_products(models, batches[rank::world], _LS_LAYERS).all_reduce()
        if rank == 0:
            torch.save((stats, products), out)
    finally:
        dist.destroy_process_group()


def test_all_reduce_equals_single_process(resnet_setup, tmp_path: Path) -> None:
    spec, models, batches = resnet_setup
    batches = batches + _batches(models[0], 1, seed=7)
    out = str(tmp_path / "stats.pt")
    mp.spawn(_worker, args=(2, _free_port(), spec, models, batches, out), nprocs=2)
    reduced: ActivationStats
    reduced, products = torch.load(out, weights_only=False)
    single = collect_statistics(spec, models, batches)
    alone = collect_layer_products(models, batches, _LS_LAYERS)
    for layer in _LS_LAYERS:
        assert products.counts[layer] == alone.counts[layer]
        torch.testing.assert_close(products.xtx[layer], alone.xtx[layer], rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(products.xty[layer], alone.xty[layer], rtol=1e-12, atol=1e-10)
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


# ---- per-batch distances (PLeaS's matching cost) -----------------------------------------


def _batch_cdist(models: list[nn.Module], sites, batches) -> dict[str, torch.Tensor]:
    """Brute force: per batch, ``cdist`` between the unit vectors (rows = units), summed."""
    out: dict[str, torch.Tensor] = {}
    for x in batches:
        for g, z in _direct(models, sites, [x]).items():
            d = torch.cdist(z.T, z.T, compute_mode="donot_use_mm_for_euclid_dist")
            out[g] = out[g] + d if g in out else d
    return out


@pytest.fixture(scope="module")
def mlp_setup():
    models = _models("mlp", 2, width=16, depth=2)
    spec = symmerge.trace(models[0], _batches(models[0], 1)[0][:2])
    return spec, models, _batches(models[0], 4, size=16)


def test_batch_distances_equal_a_loop_of_cdist_over_batches(mlp_setup, resnet_setup) -> None:
    spec, models, batches = mlp_setup
    off = collect_statistics(spec, models, batches)
    assert not off.batch_distances and off.batch_dist == {}  # off: nothing extra is kept
    with pytest.raises(ValueError, match="batch_distances=True"):
        off.batch_distance("layers.1.out")
    stats = collect_statistics(spec, models, batches, batch_distances=True)
    brute = _batch_cdist(models, stats.sites, batches)
    for g in stats.groups:
        assert stats.batches[g] == len(batches)
        d = stats.batch_distance(g)
        assert d.dtype == torch.float64 and d.shape == (32, 32)
        torch.testing.assert_close(d, brute[g], rtol=1e-10, atol=1e-9)
        # a sum of per-batch norms, not the norm over all samples (moments give that one)
        whole = -symmerge.similarity.activation_similarity(stats, g, 1, 0, kind="neg_dist")
        cross = d[stats.units(g, 1), stats.units(g, 0)]
        assert (cross >= whole - 1e-9).all() and (cross - whole).max() > 1e-2
        sim = symmerge.similarity.activation_similarity(stats, g, 0, 1, kind="neg_batch_dist")
        torch.testing.assert_close(sim, -d[stats.units(g, 0), stats.units(g, 1)])
    # conv maps (native layout) and a residual stream observed at four sites per batch
    spec, models, batches = resnet_setup
    stats = collect_statistics(spec, models, batches, batch_distances=True)
    groups = ["conv1.out", "layer3.0.conv1.out"]
    brute = _batch_cdist(models, {g: stats.sites[g] for g in groups}, batches)
    for g in groups:
        torch.testing.assert_close(stats.batch_distance(g), brute[g], rtol=1e-9, atol=1e-7)


def test_batch_distances_add_up_over_chunks_of_the_data(mlp_setup) -> None:
    spec, models, batches = mlp_setup
    whole = collect_statistics(spec, models, batches, batch_distances=True)
    halves = [collect_statistics(spec, models, part, batch_distances=True)
              for part in (batches[:1], batches[1:])]  # fmt: skip
    for g in whole.groups:
        assert sum(h.batches[g] for h in halves) == whole.batches[g]
        total = halves[0].batch_distance(g) + halves[1].batch_distance(g)
        torch.testing.assert_close(total, whole.batch_distance(g), rtol=1e-12, atol=1e-10)


def test_batch_distances_survive_all_reduce(mlp_setup) -> None:
    """One gloo process: all_reduce reaches the accumulator and keeps it (the sum over several
    processes is the collective's, tested for the moments above)."""
    spec, models, batches = mlp_setup
    stats = collect_statistics(spec, models, batches, batch_distances=True)
    before = {g: stats.batch_distance(g).clone() for g in stats.groups}
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        stats.all_reduce()
    finally:
        dist.destroy_process_group()
    for g in stats.groups:
        assert stats.batches[g] == len(batches)
        torch.testing.assert_close(stats.batch_distance(g), before[g], rtol=1e-15, atol=0)


def test_kind_neg_batch_dist_needs_the_accumulator(mlp_setup) -> None:
    spec, models, batches = mlp_setup
    stats = collect_statistics(spec, models, batches)
    with pytest.raises(ValueError, match="batch_distances=True"):
        symmerge.similarity.activation_similarity(stats, "layers.1.out", kind="neg_batch_dist")
    with pytest.raises(ValueError, match="batch_distances=True"):
        symmerge.similarity.activation_similarity_from_moments(
            stats.mean("layers.1.out"), stats.second_moment("layers.1.out"), 2,
            kind="neg_batch_dist",
        )  # fmt: skip


def _pleas_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("mlp", width=16, depth=2)[0].eval()


def test_pleas_matches_with_per_batch_distances() -> None:
    from symmerge.merging import merge

    a, b = _pleas_mlp(0), _pleas_mlp(1)
    data = [x.float() for x in _batches(a, 3, size=16)]
    x = data[0]
    merged, res = merge([a, b], "pleas", data=data, kind="neg_batch_dist", ratios=0.5)
    with torch.no_grad():
        assert torch.isfinite(merged(x)).all()
    assert res.details["ratios"] and res.details["ls"] == "closed"
    # at ratio 0 PLeaS is activation matching on the same cost (so the kind reached matching)
    zero, _ = merge([a, b], "pleas", data=data, kind="neg_batch_dist", ratios=0.0, ls="none")
    spec = symmerge.trace(a, x[:2])
    stats = collect_statistics(spec, [a, b], data, batch_distances=True)
    act, _ = merge([a, b], "activation", data=data, stats=stats, kind="neg_batch_dist")
    for (k, v), (k2, v2) in zip(zero.state_dict().items(), act.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    other = spec.permuted(a, spec.random_permutations(seed=5))  # a permuted copy: same function
    same, _ = merge([a, other], "pleas", data=data, kind="neg_batch_dist", ratios=0.5, ls="none")
    with torch.no_grad():
        want = a(x)
        err = float((same(x) - want).abs().max())
    assert err <= 1e-5 * max(1.0, float(want.abs().max())), err


def test_a_grouped_convs_factored_channels_are_matched_whole() -> None:
    """A grouped conv's input channels are groups x channels per group (ResNeXt, RegNet), one
    channel permutation shared by all groups: no module outputs one factor, so activation
    matching matches the product, observed whole; zip and pleas say they cannot, and name the
    data-free methods."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 12, 1), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1, groups=3), nn.ReLU(),
        nn.Conv2d(12, 4, 1),
    ).eval()  # fmt: skip
    x = torch.randn(32, 3, 6, 6)
    spec = symmerge.trace(model, x[:2])
    assert any(not g.sites for g in spec.groups.values())  # the factors
    truth = spec.random_permutations(seed=1)
    other = spec.permuted(model, truth)
    merged, res = symmerge.merge([model, other], "activation", spec=spec, data=[x])
    for g, p in truth.items():
        assert torch.equal(res.maps[g].perms[1], torch.argsort(p)), g
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(x), model(x), rtol=0, atol=1e-5)
    for method in ("zip", "pleas"):
        with pytest.raises(ValueError, match="grouped convolution's channels.*weight, mergemany"):
            symmerge.merge([model, other], method, spec=spec, data=[x])
