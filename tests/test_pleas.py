"""PLeaS: partial matching limits, compute budgets, least squares and its block structure
(algorithms.md §2 and §6.4.5-6)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import symmerge
from symmerge.blocksparse import block_sparse
from symmerge.flops import count_compute
from symmerge.groupmap import merged_support
from symmerge.merging import merge
from symmerge.methods.zipit import group_order
from symmerge.models import create_model
from symmerge.refine.lstsq import fit_layers
from symmerge.solvers.coordinate import coordinates
from symmerge.solvers.partial import allocate, compute_model, partial_maps, resolution
from symmerge.spec import _jitter_
from symmerge.stats import collect_statistics, layer_io


def _mlp(seed: int, width: int = 32, depth: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("mlp", width=width, depth=depth)[0].eval()


def _batches(model: nn.Module, k: int = 4, size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, *model.input_shape, generator=g) for _ in range(k)]


def _inputs(model: nn.Module) -> torch.Tensor:
    return torch.randn(8, *model.input_shape, generator=torch.Generator().manual_seed(7))


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    err = float((a - b).abs().max())
    assert err <= tol * max(1.0, float(b.abs().max())), err


class _Linear(nn.Module):
    """A linear network (no nonlinearity): least squares can reproduce it exactly."""

    input_shape = (6,)

    def __init__(self, seed: int, widths: tuple[int, ...] = (6, 10, 7, 3)) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.Sequential(
            *[nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_ratio_zero_is_git_rebasin_and_ratio_one_the_ensemble() -> None:
    a, b = _mlp(0), _mlp(1)
    data = _batches(a)
    x = _inputs(a)
    zero, _ = merge([a, b], "pleas", data=data, ratios=0.0, ls="none")
    act, _ = merge([a, b], "activation", data=data, kind="neg_sqdist")
    for (k, v), (k2, v2) in zip(zero.state_dict().items(), act.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    wzero, _ = merge([a, b], "pleas", data=data, ratios=0.0, ls="none", match="weight")
    wact, _ = merge([a, b], "weight")
    with torch.no_grad():
        _close(wzero(x), wact(x), 1e-6)
    one, res = merge([a, b], "pleas", data=data, ratios=1.0, ls="none")
    with torch.no_grad():
        _close(one(x), (a(x) + b(x)) / 2, 1e-5)
    assert res.details["budget"] == pytest.approx(2.0)
    assert all(gm.n_out == 64 for gm in res.maps.values())


@pytest.mark.parametrize("name", ["resnet20x1", "resnet20x1-gn"])
def test_ratio_one_is_the_ensemble_on_resnets(name: str) -> None:
    """Side by side, every BN / GroupNorm unit keeps its own model's statistics: the merged
    logits are the mean of the two models' logits (no LayerNorm here)."""
    torch.manual_seed(0)
    a, b = create_model(name)[0].eval(), create_model(name)[0].eval()
    _jitter_(a, 1)
    _jitter_(b, 2)
    merged, res = merge([a, b], "pleas", data=_batches(a, 2, 8), ratios=1.0, ls="none")
    x = _inputs(a)
    with torch.no_grad():
        _close(merged(x), (a(x) + b(x)) / 2, 1e-4)
    assert res.details["budget"] == pytest.approx(2.0)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 1.0])
def test_a_permuted_copy_merges_into_the_same_function(ratio: float) -> None:
    model = _mlp(3)
    spec = symmerge.trace(model, (_inputs(model),))
    other = spec.permuted(model, spec.random_permutations(seed=5))
    data = _batches(model)
    x = _inputs(model)
    merged, res = merge([model, other], "pleas", data=data, ratios=ratio, ls="none")
    with torch.no_grad():
        _close(merged(x), model(x), 1e-5)
    if ratio == 0.0:
        for k, v in merged.state_dict().items():
            _close(v, model.state_dict()[k], 1e-6)
    # 784 inputs, 128 samples: the data leave most input directions free, and least squares
    # keeps the merged weights there (it corrects them, at any ridge), so the function holds
    # off the data too
    for ridge in (0.0, 1e-4):
        fitted, _ = merge([model, other], "pleas", data=data, ratios=ratio, ridge=ridge)
        with torch.no_grad():
            _close(fitted(x), model(x), 1e-5)


class _WithAuxHead(nn.Module):
    """An auxiliary head the forward never calls (GoogLeNet's in eval mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.aux = nn.Linear(12, 24), nn.Linear(24, 5), nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("method", ["pleas", "kf-linear"])
def test_a_layer_the_forward_never_calls_is_left_out_of_the_refit(method: str) -> None:
    torch.manual_seed(0)
    model, x = _WithAuxHead().eval(), torch.randn(64, 12)
    spec = symmerge.trace(model, (x[:2],))
    other = spec.permuted(model, spec.random_permutations(seed=3))
    merged, _ = merge([model, other], method, data=[x[:32], x[32:]], spec=spec)
    with torch.no_grad():
        _close(merged(x), model(x), 1e-3)


def _residual(spec, models, maps, layers, data, state) -> tuple[float, float]:  # noqa: ANN001
    """Summed teacher-forced mean squared error of ``state``'s layers, and of zero weights."""
    from symmerge.refine.lstsq import _teacher

    inputs, targets = _teacher(spec, maps, (0.5, 0.5), models[0], layers)
    total = energy = 0.0
    for name, x, y in layer_io(models, data, layers, inputs=inputs, targets=targets):
        w, bias = state[f"{name}.weight"], state[f"{name}.bias"]
        total += float(((x @ w.T + bias - y) ** 2).mean())
        energy += float((y**2).mean())
    return total, energy


def test_least_squares_on_a_linear_network_at_ratio_one_has_zero_residual() -> None:
    """Side by side, the block-diagonal weights solve every layer exactly: the closed form,
    from any start (here zeros), leaves no teacher-forced residual, and the merged network is
    the ensemble."""
    a, b = _Linear(0), _Linear(1)
    spec = symmerge.trace(a, (_inputs(a),))
    data = _batches(a, 4, 32)
    res = symmerge.methods.get_method("pleas")(spec, [a, b], data=data, ratios=1.0, ls="none")
    zeros = {k: torch.zeros_like(v) for k, v in res.state_dict.items()}
    fit = fit_layers(spec, [a, b], res.maps, zeros, data, ridge=0.0)
    residual, energy = _residual(spec, [a, b], res.maps, fit.layers, data, fit.state_dict)
    assert residual <= 1e-10 * energy
    merged = symmerge.merging.build_model(a, spec, res.maps, fit.state_dict)
    x = _inputs(a)
    with torch.no_grad():
        _close(merged(x), (a(x) + b(x)) / 2, 1e-5)


def test_fitting_on_the_merged_models_own_inputs() -> None:
    """``ls_inputs="merged"``: on a linear network side by side the merged model's own inputs
    are the ensemble's, so the fit is exact again; on a ReLU MLP and a permuted copy (r=0.5)
    the merged model reproduces the model on the data it was fitted on."""
    a, b = _Linear(0), _Linear(1)
    data = _batches(a, 4, 32)
    merged, _ = merge([a, b], "pleas", data=data, ratios=1.0, ls_inputs="merged", ridge=0.0)
    x = _inputs(a)
    with torch.no_grad():
        _close(merged(x), (a(x) + b(x)) / 2, 1e-5)
    model = _mlp(3, width=16)
    spec = symmerge.trace(model, (_inputs(model),))
    other = spec.permuted(model, spec.random_permutations(seed=5))
    data = _batches(model, 8, 128)
    merged, _ = merge([model, other], "pleas", data=data, ratios=0.5, ls_inputs="merged",
                      ridge=1e-9)  # fmt: skip
    with torch.no_grad():
        _close(merged(data[0]), model(data[0]), 1e-3)
    with pytest.raises(ValueError, match="closed form"):
        merge([model, other], "pleas", data=data, ls="adam", ls_inputs="merged")


def test_closed_form_and_adam_agree_and_adam_keeps_zero_blocks() -> None:
    """Widths 6 -> 10 -> 7 -> 3 (n_in != n_out everywhere), half of each group kept apart."""
    a, b = _Linear(0), _Linear(1)
    spec = symmerge.trace(a, (_inputs(a),))
    data = _batches(a, 4, 64)
    res = symmerge.methods.get_method("pleas")(spec, [a, b], data=data, ratios=0.5, ls="none")
    closed = fit_layers(spec, [a, b], res.maps, res.state_dict, data, ridge=0.0)
    adam = fit_layers(spec, [a, b], res.maps, res.state_dict, data, solver="adam", steps=3000,
                      lr=1e-2)  # fmt: skip
    masks = merged_support(spec, [a.state_dict(), b.state_dict()], res.maps,
                    [f"{n}.weight" for n in closed.layers])  # fmt: skip
    assert any(not bool(m.all()) for m in masks.values())  # there are zero blocks
    for key, mask in masks.items():
        assert bool((adam.state_dict[key][~mask] == 0).all()), key
        assert bool((closed.state_dict[key][~mask] == 0).all()), key

    def loss(state: dict[str, torch.Tensor]) -> float:
        return _residual(spec, [a, b], res.maps, closed.layers, data, state)[0]

    best, reached = loss(closed.state_dict), loss(adam.state_dict)
    start = loss(res.state_dict)
    assert best <= reached + 1e-9 and best < start
    assert reached - best <= 0.02 * (start - best)


@pytest.mark.parametrize("name", ["resnet20x1", "vit-tiny"])
def test_formula_compute_equals_the_count_on_the_block_sparse_export(name: str) -> None:
    """Fused q/k/v projections, heads and residual streams included (attention's own
    products are counted by neither)."""
    torch.manual_seed(0)
    a, b = create_model(name)[0].eval(), create_model(name)[0].eval()
    spec = symmerge.trace(a, (_inputs(a),))
    data = _batches(a, 2, 8)
    merged, res = merge([a, b], "pleas", data=data, budget=1.5, ls="none")
    layers = [n for n, m in merged.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    keys = [f"{n}.weight" for n in layers]
    masks = merged_support(spec, [a.state_dict(), b.state_dict()], res.maps, keys)
    sparse = block_sparse(merged, {k[: -len(".weight")]: v for k, v in masks.items()})
    x = _inputs(a)
    counted = count_compute(sparse, (x,))
    assert counted.macs == pytest.approx(res.details["macs"], rel=1e-12)
    assert count_compute(a, (x,)).macs == pytest.approx(res.details["macs_one_model"], rel=1e-12)
    assert abs(res.details["budget"] - 1.5) <= 0.015
    with torch.no_grad():
        _close(sparse(x), merged(x), 1e-5)


@pytest.mark.parametrize("name", ["mlp", "resnet20x1", "resnet20x1-gn", "vit-tiny"])
@pytest.mark.parametrize("allocator", ["score", "stagewise", "uniform"])
def test_allocator_meets_budgets(name: str, allocator: str) -> None:
    torch.manual_seed(0)
    model = create_model(name)[0].eval()
    spec = symmerge.trace(model, (_inputs(model),))
    compute = compute_model(spec, model, (_inputs(model)[:1],))
    coords = coordinates(spec)
    steps = {c[0]: resolution(spec, c) for c in coords}
    scores = {c[0]: float(k % 5) for k, c in enumerate(coords)}
    order = [g for g in group_order(spec, list(model.state_dict())) if g in steps]
    for budget in (1.0, 1.2, 1.5, 1.8, 2.0):
        ratios = allocate(compute, budget, steps, allocator=allocator, scores=scores, order=order)
        assert abs(compute.budget(ratios) - budget) <= 0.01 * budget, (budget, ratios)
        for c, r in ratios.items():
            assert 0.0 <= r <= 1.0 and round(r * steps[c]) == pytest.approx(r * steps[c])


def test_blocked_groups_split_by_whole_blocks() -> None:
    """GroupNorm groups and attention heads are merged or kept apart whole; the merged
    models run (their GroupNorm block counts and head counts set by the maps)."""
    for name in ("resnet20x1-gn", "vit-tiny"):
        torch.manual_seed(0)
        a, b = create_model(name)[0].eval(), create_model(name)[0].eval()
        spec = symmerge.trace(a, (_inputs(a),))
        merged, res = merge([a, b], "pleas", data=_batches(a, 2, 8), ratios=0.5, ls="none",
                            collect=functools.partial(collect_statistics, sites="all"))  # fmt: skip
        for g, grp in spec.groups.items():
            gm = res.maps[g]
            if grp.blocks and grp.block_group is None:
                width = grp.size // grp.blocks
                assert gm.blocks is not None and gm.n_out == gm.blocks * width
                held = torch.stack([gm.unmerge_matrix(m).sum(0) > 0 for m in range(2)])
                pattern = held.T.reshape(gm.blocks, width, 2)
                assert bool((pattern == pattern[:, :1]).all()), g  # one pattern per block
        with torch.no_grad():
            assert torch.isfinite(merged(_inputs(a))).all()


def test_partial_maps_choose_the_best_pairs_with_deterministic_ties() -> None:
    model = _mlp(0, width=8, depth=1)
    spec = symmerge.trace(model, (_inputs(model),))
    (g,) = spec.groups
    perm = {g: torch.arange(8)}
    scores = {g: torch.tensor([0.0, 5.0, 1.0, 1.0, 1.0, 4.0, -2.0, 3.0])}
    gm = partial_maps(spec, perm, scores, {g: 0.5})[g]
    merged = gm.unmerge_matrix(0)[:, :4].argmax(0)
    assert merged.tolist() == [1, 2, 5, 7]  # the 4 best; of the tied 1.0s the lowest index
    assert gm.n_out == 12


def test_bad_input_is_refused() -> None:
    a, b = _mlp(0), _mlp(1)
    data = _batches(a)
    with pytest.raises(ValueError, match="budget"):
        merge([a, b], "pleas", data=data, budget=2.5)
    with pytest.raises(ValueError, match="budget"):
        merge([a, b], "pleas", data=data, budget=0.9)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        merge([a, b], "pleas", data=data, ratios=1.5)
    with pytest.raises(ValueError, match="unknown groups"):
        merge([a, b], "pleas", data=data, ratios={"nope": 0.5})
    with pytest.raises(ValueError, match="either budget= or ratios="):
        merge([a, b], "pleas", data=data, ratios=0.5, budget=1.5)
    with pytest.raises(ValueError, match="needs data"):
        merge([a, b], "pleas", ratios=0.5)
    with pytest.raises(ValueError, match="'ls'"):
        merge([a, b], "pleas", data=data, ls="lbfgs")
    with pytest.raises(ValueError, match="'allocator'"):
        merge([a, b], "pleas", data=data, budget=1.5, allocator="gurobi")
    spec = symmerge.trace(a, (_inputs(a),))
    with pytest.raises(ValueError, match="needs data"):
        symmerge.methods.get_method("pleas")(spec, [a, b], match="weight", ratios=0.5)
    with pytest.raises(ValueError, match="2 models"):
        merge([a, b, _mlp(2)], "pleas", data=data)


def test_interpolating_a_partial_merge_reaches_both_endpoints() -> None:
    """The partial merge's maps re-weighted along lambda (least squares is not redone): at
    lambda 0 and 1 the model computes A's and B's function, at any ratio."""
    from symmerge.merging import interpolation

    a, b = _mlp(0), _mlp(1)
    x = _inputs(a)
    points = dict(interpolation([a, b], "pleas", [0.0, 0.5, 1.0], data=_batches(a),
                                ratios=0.5, ls="none"))  # fmt: skip
    with torch.no_grad():
        _close(points[0.0](x), a(x), 1e-5)
        _close(points[1.0](x), b(x), 1e-5)
    assert points[0.5].state_dict()["layers.1.weight"].shape[0] == 48


def test_a_torchvision_mobilenet_v3_copy_merges_back() -> None:
    """MobileNetV3: its classifier's inplace Hardswish overwrote the Linear outputs least squares
    kept as targets, and its head (576 and 1024 inputs) sees fewer samples than inputs, where
    least squares shrank the weights toward zero: PLeaS missed its own permuted copy."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.mobilenet_v3_small(num_classes=10)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # BatchNorm statistics of the data, so activations keep their scale
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.momentum = None
        model.train()(torch.randn(64, 3, 64, 64, generator=gen))
    model.eval()
    x = torch.randn(4, 3, 64, 64, generator=gen)
    spec = symmerge.trace(model, (x[:2],))
    other = spec.permuted(model, spec.random_permutations(seed=3))
    data = [torch.randn(16, 3, 64, 64, generator=gen) for _ in range(2)]
    merged, res = merge([model, other], "pleas", spec=spec, data=data)
    assert any("least squares (closed) on 43 layers" in line for line in res.log)
    with torch.no_grad():
        _close(merged.eval()(x), model(x), 1e-4)
