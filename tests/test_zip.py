"""ZipIt!: the greedy zip solver against a brute-force greedy, its maps' invariants
(algorithms.md §6.4 item 4), and the 'zip' method's limits: identity recovery, the ensemble
at stop=0 and at full width, per-task heads, checkpoints, N=3, blocked groups, bad input."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

import symmerge
from symmerge.io import load_checkpoint, save_checkpoint
from symmerge.merging import merge
from symmerge.methods import get_method, method_info
from symmerge.methods.zipit import group_order, legal_stops
from symmerge.models import create_model
from symmerge.solvers.lap import lap_objective
from symmerge.solvers.zipit import greedy_zip, zip_labels, zip_map, zip_match
from symmerge.spec import _jitter_
from symmerge.stats import collect_statistics

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- helpers --------------------------------------------------------------------------------


def _corr(t: int, seed: int) -> np.ndarray:
    """A random correlation matrix (continuous values: no ties)."""
    x = np.random.default_rng(seed).normal(size=(t, 3 * t))
    return np.corrcoef(x)


def _brute_greedy(
    corr: np.ndarray, sizes: list[int], width: int, alpha: float, beta: float
) -> tuple[np.ndarray, list[float], list[int]] | None:
    """The zip by its definition: sets of units, every pair of clusters scanned at every step
    (row-major over the clusters' lowest units; a cluster belongs to its lowest unit's model),
    None when no allowed pair is left."""
    n_models = len(sizes)
    model = [m for m, n in enumerate(sizes) for _ in range(n)]
    clusters = {u: {u} for u in range(len(model))}
    sim: dict[tuple[int, int], float | None] = {
        (i, j): float(corr[i, j]) for i in clusters for j in clusters if i != j
    }
    merges = len(model) - width
    budget = int(beta * (merges // n_models) + 1e-4)
    within = [0] * n_models
    values = []
    for _ in range(merges):
        best = None
        for i in sorted(clusters):
            for j in sorted(clusters):
                v = sim.get((i, j))
                if i == j or v is None or (model[i] == model[j] and within[model[i]] >= budget):
                    continue
                if best is None or v > best[0]:
                    best = (v, i, j)
        if best is None:
            return None
        v, a, b = best[0], min(best[1:]), max(best[1:])
        if model[a] == model[b]:
            within[model[a]] += 1
        clusters[a] |= clusters.pop(b)
        for k in clusters:
            if k != a:
                old = (sim[(a, k)], sim[(b, k)])
                new = None if alpha <= 0 or None in old else alpha * min(old)  # type: ignore
                sim[(a, k)] = sim[(k, a)] = new
        values.append(v)
    labels = np.empty(len(model), dtype=np.int64)
    for c, r in enumerate(sorted(clusters)):
        labels[list(clusters[r])] = c
    return labels, values, within


def _mlp(seed: int, width: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("mlp", width=width, depth=2)[0].eval()


def _batches(model: nn.Module, k: int = 2, size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(size, *model.input_shape, generator=g) for _ in range(k)]


def _inputs(model: nn.Module) -> torch.Tensor:
    return torch.randn(4, *model.input_shape, generator=torch.Generator().manual_seed(7))


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    err = float((a - b).abs().max())
    assert err <= tol * max(1.0, float(b.abs().max())), err


def _permuted(model: nn.Module, seed: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    spec = symmerge.trace(model, (_inputs(model),))
    applied = spec.random_permutations(seed=seed)
    return spec.permuted(model, applied), applied


def _partner(gm: symmerge.GroupMap) -> torch.Tensor:
    """For a two-model map whose merged units each hold one unit of each model: the unit of
    model 1 merged with unit i of model 0."""
    lab0, lab1 = gm.unmerge_matrix(0).argmax(1), gm.unmerge_matrix(1).argmax(1)
    assert torch.equal(lab0.sort().values, torch.arange(gm.n_out))
    assert torch.equal(lab1.sort().values, torch.arange(gm.n_out))
    return torch.argsort(lab1)[lab0]


# ---- the solver -----------------------------------------------------------------------------

CASES = [  # (models, n, width, alpha, beta)
    (2, 5, 5, 0.5, 1.0), (2, 6, 8, 0.5, 1.0), (2, 5, 5, 1.0, 0.5), (2, 5, 5, 0.0, 1.0),
    (2, 6, 6, 0.5, 0.0), (3, 4, 4, 0.5, 1.0), (3, 4, 7, 0.3, 1.0), (3, 4, 4, 1.0, 0.0),
    (2, 4, 8, 0.5, 1.0),
]  # fmt: skip


@pytest.mark.parametrize(("n_models", "n", "width", "alpha", "beta"), CASES)
def test_greedy_zip_equals_a_brute_force_greedy(
    n_models: int, n: int, width: int, alpha: float, beta: float
) -> None:
    for seed in range(5):
        corr = _corr(n_models * n, seed)
        want = _brute_greedy(corr, [n] * n_models, width, alpha, beta)
        if want is None:
            with pytest.raises(ValueError, match="no allowed pair is left"):
                greedy_zip(corr, [n] * n_models, width, alpha=alpha, beta=beta)
            continue
        got = greedy_zip(torch.from_numpy(corr), [n] * n_models, width, alpha=alpha, beta=beta)
        assert got.labels.tolist() == want[0].tolist()
        assert np.allclose(got.values.numpy(), want[1], rtol=0, atol=1e-12)
        assert got.within.tolist() == want[2]
        assert got.objective == pytest.approx(float(np.mean(want[1])) if want[1] else 0.0)


def test_greedy_zip_stops_clearly_when_no_pair_is_allowed() -> None:
    corr = _corr(12, 0)
    assert _brute_greedy(corr, [4, 4, 4], 4, 0.0, 1.0) is None  # a unit merges at most once
    with pytest.raises(ValueError, match="cannot reach width 4: no allowed pair is left after 6"):
        greedy_zip(corr, [4, 4, 4], alpha=0.0)
    assert greedy_zip(corr, [4, 4, 4], 6, alpha=0.0).labels.max() == 5  # 6 merges reach 6


@pytest.mark.parametrize(("n_models", "width", "alpha", "beta"), [
    (2, 6, 0.5, 1.0), (2, 9, 0.5, 1.0), (3, 6, 0.5, 1.0), (2, 6, 0.5, 0.0), (2, 6, 0.0, 0.0),
    (3, 6, 0.5, 0.5), (3, 9, 0.0, 1.0),
])  # fmt: skip
def test_zip_maps_average_each_cluster_and_respect_budgets(
    n_models: int, width: int, alpha: float, beta: float
) -> None:
    n = 6
    res = greedy_zip(_corr(n_models * n, 3), [n] * n_models, width, alpha=alpha, beta=beta)
    gm = zip_map(res.labels, [n] * n_models)
    assert gm.n_out == width and gm.sizes == (n,) * n_models
    assert gm.weights == pytest.approx([1 / n_models] * n_models)
    Ms = [gm.merge_matrix(m) for m in range(n_models)]
    Us = [gm.unmerge_matrix(m) for m in range(n_models)]
    count = sum(U.sum(0) for U in Us)  # units per merged unit
    for M, U in zip(Ms, Us, strict=True):
        # every model unit reads exactly one merged unit (U_m rows one-hot, 0/1 entries)
        assert set(U.unique().tolist()) <= {0.0, 1.0} and torch.equal(U.sum(1), torch.ones(n))
        assert torch.equal(M, (U / count).T)  # merged unit = mean of its members
        # alone, M_m U_m = diag(c_m / c): not the identity when clusters span models
        assert torch.allclose(M @ U, torch.diag(U.sum(0) / count), atol=0)
    # unmerging then merging is exactly the identity on the merged units: sum_m M_m U_m = I
    assert torch.equal(sum(M @ U for M, U in zip(Ms, Us, strict=True)), torch.eye(width))
    assert torch.equal(sum(M.sum(1) for M in Ms), torch.ones(width))  # weights sum to one
    budget = int(beta * ((n_models * n - width) // n_models) + 1e-4)
    assert bool((res.within <= budget).all()) and int(res.within.sum()) <= n_models * budget
    if alpha == 0:  # every cluster is one unit or one merged pair
        assert set(count.tolist()) <= {1.0, 2.0}
    if alpha == 0 and beta == 0:  # two models matched one to one
        assert all(torch.equal(U.sum(0), torch.ones(n)) for U in Us)


def test_zip_to_full_width_merges_nothing() -> None:
    res = greedy_zip(_corr(10, 1), [5, 5], 10)
    assert res.labels.tolist() == list(range(10)) and res.values.numel() == 0
    assert res.objective == 0.0


@pytest.mark.parametrize("n_models", [2, 3])
def test_blocked_zip_never_mixes_blocks(n_models: int) -> None:
    n, blocks = 8, 4
    corr = _corr(n_models * n, 5)
    res = zip_labels(corr, [n] * n_models, alpha=0.5, beta=1.0, blocks=blocks)
    labels = res.labels.view(n_models, blocks, n // blocks)
    merged_block = labels // (n // blocks)  # (model, its block, unit) -> merged block
    assert bool((merged_block == merged_block[..., :1]).all())  # a block goes to one block
    for m in range(n_models):  # ... and model m's blocks to distinct merged blocks
        assert sorted(merged_block[m, :, 0].tolist()) == list(range(blocks))
    assert res.labels.max() == n - 1
    # a given pairing is obeyed: merged block b holds block pairing[m][b] of model m
    pairing = [torch.arange(blocks)] + [torch.tensor([2, 0, 3, 1])] * (n_models - 1)
    res = zip_labels(corr, [n] * n_models, blocks=blocks, block_pairing=pairing)
    blocks_of = res.labels.view(n_models, blocks, -1)[:, :, 0] // (n // blocks)
    for m in range(n_models):
        assert blocks_of[m][pairing[m]].tolist() == list(range(blocks))
    with pytest.raises(ValueError, match="width of a blocked group"):
        zip_labels(corr, [n] * n_models, n + 2, blocks=blocks)


def test_zip_match_docstring_example() -> None:
    corr = torch.tensor([[1.0, 0.1, 0.9, 0.0], [0.1, 1.0, 0.2, 0.8],
                         [0.9, 0.2, 1.0, 0.3], [0.0, 0.8, 0.3, 1.0]])  # fmt: skip
    gm = zip_match(corr, [2, 2])
    assert torch.equal(gm.merge_matrix(1), 0.5 * torch.eye(2, dtype=torch.float64))
    assert torch.equal(gm.unmerge_matrix(0), torch.eye(2, dtype=torch.float64))


def test_solver_rejects_bad_input() -> None:
    corr = _corr(8, 0)
    with pytest.raises(ValueError, match=r"corr must be \(8, 8\)"):
        greedy_zip(corr[:6, :6], [4, 4])
    with pytest.raises(ValueError, match="finite"):
        greedy_zip(np.where(np.eye(8) > 0, np.nan, corr), [4, 4])
    with pytest.raises(ValueError, match="at least 2 models"):
        greedy_zip(corr, [8])
    with pytest.raises(ValueError, match=r"'width' parameter of zip must be an int in \[4, 8\]"):
        greedy_zip(corr, [4, 4], 3)
    with pytest.raises(ValueError, match=r"'alpha' parameter of zip must be a float in \[0, 1\]"):
        greedy_zip(corr, [4, 4], alpha=-0.5)
    with pytest.raises(ValueError, match="block_pairing"):
        zip_labels(corr, [4, 4], blocks=2, block_pairing=[torch.arange(2), torch.tensor([0, 0])])


# ---- the method -----------------------------------------------------------------------------


def test_zip_is_registered_with_its_capabilities() -> None:
    info = method_info("zip")
    assert (info.needs_data, info.target_width, info.unequal_widths) == (True, True, False)
    assert info.max_models is None and info.url == "https://arxiv.org/abs/2305.03053"


@pytest.mark.parametrize(("seed", "sites"), [(1, "activation"), (0, "all")])
def test_zip_recovers_a_permuted_copy(seed: int, sites: str) -> None:
    """Seed 0's MLP has units that never fire on the data: their correlation is 0 to all,
    so post-ReLU statistics alone do not pair them; every module output (pre-activations
    too) does."""
    model = _mlp(seed)
    other, _ = _permuted(model, 3)
    collect = functools.partial(collect_statistics, sites=sites)
    merged, res = merge([model, other], "zip", data=_batches(model), collect=collect)
    x = _inputs(model)
    with torch.no_grad():
        _close(merged(x), model(x), 1e-6)
    assert all(gm.n_out == 32 for gm in res.maps.values())
    assert all(v == pytest.approx(1.0) for v in res.objective.values())  # merged corr 1 pairs


@pytest.mark.parametrize("name", ["resnet20x1", "resnet20x1-gn", "vit-tiny"])
def test_zip_recovers_a_permuted_blocked_or_bn_model(name: str) -> None:
    """BN ResNet-20, GroupNorm ResNet-20 (blocked groups) and a ViT (heads shared by the q/k
    and v/o head dims); every module output is observed, since post-ReLU features alone tie
    on units dead for the whole batch."""
    torch.manual_seed(1)
    model = create_model(name)[0].eval()
    _jitter_(model, 1)
    other, _ = _permuted(model, 3)
    collect = functools.partial(collect_statistics, sites="all")
    merged, _ = merge([model, other], "zip", data=_batches(model), collect=collect)
    x = _inputs(model)
    with torch.no_grad():
        _close(merged(x), model(x))


def test_zip_across_models_only_pairs_like_activation_matching() -> None:
    """With alpha=0 and beta=0 two models are matched one to one, greedily: on a noisy
    permuted copy (correlations below 1) the pairs are activation matching's (the LAP's) and
    the applied permutation's; on independent models greedy pairs can differ, never beating
    the LAP."""
    model = _mlp(1)
    other, applied = _permuted(model, 3)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * p.std() * torch.randn_like(p))
    data = _batches(model, 4)
    spec = symmerge.trace(model, (_inputs(model),))
    act = get_method("activation")(spec, [model, other], data=data)
    zipped = get_method("zip")(spec, [model, other], data=data, alpha=0.0, beta=0.0)
    for g in spec.groups:
        assert torch.equal(_partner(zipped.maps[g]), act.perms(1)[g])
        assert torch.equal(act.perms(1)[g], torch.argsort(applied[g]))
        assert 0.9 < zipped.objective[g] < 1.0
    # independent models: a matching, whose total correlation is at most the LAP's
    b = _mlp(2)
    stats = collect_statistics(spec, [model, b], data)
    act = get_method("activation")(spec, [model, b], stats=stats)
    zipped = get_method("zip")(spec, [model, b], stats=stats, beta=0.0, alpha=0.0)
    for g in spec.groups:
        cross = stats.correlation(g)[:32, 32:]
        greedy, best = (
            lap_objective(cross, _partner(zipped.maps[g])),
            lap_objective(cross, act.perms(1)[g]),
        )
        assert greedy <= best + 1e-9 and greedy > 0.5 * best


def _ensemble_check(models: list[nn.Module], tmp_path, config: dict, **kw) -> None:
    x = _inputs(models[0])
    with torch.no_grad():
        mean = sum(m(x) for m in models) / len(models)
        stacked = torch.cat([m(x) for m in models], 1)
        merged, res = merge(models, "zip", data=_batches(models[0]), **kw)
        _close(merged(x), mean)
        heads, _ = merge(models, "zip", data=_batches(models[0]), heads="per-task", **kw)
        _close(heads(x), stacked)
        path = tmp_path / "heads.safetensors"
        save_checkpoint(path, heads, config, {"note": "zip per-task heads"})
        reloaded, _ = load_checkpoint(path)
        _close(reloaded(x), stacked)
    assert all(gm.n_out == 2 * n for gm, n in zip(res.maps.values(), _sizes(models[0]),
                                                  strict=True))  # fmt: skip


def _sizes(model: nn.Module) -> list[int]:
    spec = symmerge.trace(model, (_inputs(model),))
    return [g.size for g in spec.groups.values()]


@pytest.mark.parametrize("name", ["mlp", "resnet20x1"])
def test_stop_zero_is_the_ensemble(tmp_path, name: str) -> None:
    """Nothing zipped: every group side by side, the logits averaged (or each model's head
    kept: each source's logits); the multi-head checkpoint reloads to the same outputs."""
    if name == "mlp":
        models = [_mlp(0), _mlp(1)]
        config = create_model("mlp", width=32, depth=2)[1]
    else:
        models = []
        for seed in range(2):
            torch.manual_seed(seed)
            model, config = create_model(name)
            _jitter_(model, seed)  # distinct BN statistics
            models.append(model.eval())
    _ensemble_check(models, tmp_path, config, stop=0)


def test_full_width_zip_is_the_ensemble(tmp_path) -> None:
    """width = N n merges nothing: the r = 1 limit, also the ensemble."""
    models = [_mlp(0), _mlp(1)]
    _ensemble_check(models, tmp_path, create_model("mlp", width=32, depth=2)[1], width=64)


def test_partial_zip_is_a_multi_head_model(tmp_path) -> None:
    models, x = [_mlp(0), _mlp(1)], _inputs(_mlp(0))
    merged, res = merge(models, "zip", data=_batches(models[0]), stop=1, heads="per-task")
    assert [gm.n_out for gm in res.maps.values()] == [32, 64]  # zipped, then side by side
    with torch.no_grad():
        out = merged(x)
        # the second layer keeps both models' units: each head reads its own model's units
        # computed from the zipped first layer, i.e. model m with layer 1 replaced
        for m, model in enumerate(models):
            gm = res.maps["layers.1.out"]
            h = torch.relu(_first(models, gm, x))  # zipped first layer
            own = model.layers[5](torch.relu(model.layers[3](h @ gm.unmerge_matrix(m).T.float())))
            _close(out[:, 10 * m : 10 * (m + 1)], own)
        config = create_model("mlp", width=32, depth=2)[1]
        path = tmp_path / "partial.safetensors"
        save_checkpoint(path, merged, config, {})
        _close(load_checkpoint(path)[0](x), out)


def _first(models: list[nn.Module], gm: symmerge.GroupMap, x: torch.Tensor) -> torch.Tensor:
    """The zipped first layer's pre-activations: sum_m M_m (W_m x + b_m)."""
    return sum(
        models[m].layers[1](models[m].layers[0](x)) @ gm.merge_matrix(m).T.float() for m in range(2)
    )


def test_zip_three_models() -> None:
    model = _mlp(1)  # no dead units (see test_zip_recovers_a_permuted_copy)
    copies = [model, _permuted(model, 3)[0], _permuted(model, 4)[0]]
    x = _inputs(model)
    # alpha=1 keeps a pair's correlation 1 to its third copy, so copies are zipped first
    merged, res = merge(copies, "zip", data=_batches(model), alpha=1.0)
    with torch.no_grad():
        _close(merged(x), model(x), 1e-6)
    models = [_mlp(0), _mlp(1), _mlp(2)]
    merged, res = merge(models, "zip", data=_batches(model), width=40)
    for gm in res.maps.values():
        assert gm.n_out == 40 and gm.num_models == 3 and gm.weights == pytest.approx([1 / 3] * 3)
        eye = sum(gm.merge_matrix(m) @ gm.unmerge_matrix(m) for m in range(3))
        assert torch.allclose(eye, torch.eye(40, dtype=torch.float64), atol=1e-12)
    with torch.no_grad():
        assert merged(x).shape == (4, 10) and bool(torch.isfinite(merged(x)).all())


def test_group_order_and_legal_stops() -> None:
    torch.manual_seed(0)
    resnet = create_model("resnet20x1")[0].eval()
    spec = symmerge.trace(resnet, (_inputs(resnet),))
    order = group_order(spec, list(resnet.state_dict()))
    assert order[:6] == [
        "conv1.out",
        "layer1.0.conv1.out",
        "layer1.1.conv1.out",
        "layer1.2.conv1.out",
        "layer2.0.conv1.out",
        "layer2.0.conv2.out",
    ]
    # depth cuts only: a stage's residual stream is produced by every block of the stage
    assert legal_stops(spec, order, list(resnet.state_dict())) == [0, 4, 5, 8, 9, 12]
    merged, res = merge([resnet, resnet], "zip", data=_batches(resnet), stop=5)
    assert [res.maps[g].n_out for g in order] == [16, 16, 16, 16, 32] + [
        2 * spec.groups[g].size for g in order[5:]
    ]
    vit = create_model("vit-tiny")[0].eval()
    spec = symmerge.trace(vit, (_inputs(vit),))
    order = group_order(spec, list(vit.state_dict()))
    assert order[:5] == ["patch_embed.out", "blocks.0.attn.qkv.heads", "blocks.0.attn.qkv.qk",
                         "blocks.0.attn.qkv.vo", "blocks.0.fc1.out"]  # fmt: skip
    # the residual stream runs through every block: zip all of it or none
    assert legal_stops(spec, order, list(vit.state_dict())) == [0, len(order)]
    with pytest.raises(ValueError, match=r"'stop' parameter of zip must be one of \[0, 25\]"):
        get_method("zip")(spec, [vit, vit], data=_batches(vit), stop=2)


def test_zip_rejects_bad_parameters() -> None:
    models = [_mlp(0), _mlp(1)]
    data = _batches(models[0])
    msg = "The 'alpha' parameter of zip must be a float in [0, 1]. Got 1.5 instead."
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]").replace(
            ".", r"\.")):  # fmt: skip
        merge(models, "zip", data=data, alpha=1.5)
    with pytest.raises(ValueError, match=r"'beta' parameter of zip must be a float in \[0, 1\]"):
        merge(models, "zip", data=data, beta=-0.1)
    for width in (31, 65):
        with pytest.raises(ValueError, match=r"'width' parameter of zip must be an int in \[32, "
                                             r"64\] for group 'layers.1.out'"):  # fmt: skip
            merge(models, "zip", data=data, width=width)
    with pytest.raises(ValueError, match=r"not zipped \(or are head groups\): \['layers.3.out'\]"):
        merge(models, "zip", data=data, stop=1, width={"layers.3.out": 40})
    with pytest.raises(ValueError, match=r"must be one of \[0, 1, 2\] .*Got 3 instead"):
        merge(models, "zip", data=data, stop=3)
    with pytest.raises(ValueError, match="'lam' parameter of zip must be 0.5"):
        merge(models, "zip", data=data, lam=0.3)
    with pytest.raises(ValueError, match="needs data"):
        merge(models, "zip")
    spec = symmerge.trace(models[0], (_inputs(models[0]),))
    with pytest.raises(ValueError, match="nn.Modules"):
        get_method("zip")(spec, [m.state_dict() for m in models], data=data)
    with pytest.raises(ValueError, match="different width"):
        merge([models[0], _mlp(0, width=16)], "zip", data=data)
