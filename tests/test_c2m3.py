"""C2M3: Frank-Wolfe universe matching of N models, and the cycle error of pairwise maps.

Invariants (algorithms.md section 3(e) and 6.4): N permuted copies of one model merge back into
that model; mapping a model into the universe leaves its function unchanged; maps to a universe
compose to the identity around every cycle. The solver's pieces are checked against autograd
(gradient) and direct evaluation (line search).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from _toy_models import Attention, Branches
from torch import nn

import symmerge
from symmerge.evaluate import cycle_error, pairwise_from_universe
from symmerge.methods import get_method
from symmerge.models import create_model
from symmerge.solvers import frank_wolfe as fw
from symmerge.solvers import weight_matching
from symmerge.spec import SymmetrySpec

pytestmark = pytest.mark.usefixtures("one_thread")


_BUILDERS = {
    "mlp": lambda: create_model("mlp", width=16)[0],
    "resnet20x1-gn": lambda: create_model("resnet20x1-gn")[0],
    "branches": Branches,
    "attention": Attention,
}


@functools.cache
def _spec(name: str) -> SymmetrySpec:
    model = _BUILDERS[name]()
    return symmerge.trace(model.eval(), torch.randn(2, *model.input_shape))


def _model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return _BUILDERS[name]().eval()


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("name", list(_BUILDERS))
def test_permuted_copies_merge_back_into_the_model(name: str) -> None:
    spec, model = _spec(name), _model(name, 0)
    applied = [spec.random_permutations(seed=s) for s in (21, 22, 23)]
    copies = [model] + [spec.permuted(model, p) for p in applied]
    res = get_method("c2m3")(spec, copies, seed=0)
    assert res.method == "c2m3"
    assert _max_diff(res.state_dict, model.state_dict()) < 1e-6
    for m, p in enumerate(applied, 1):
        for g, grp in spec.groups.items():
            assert torch.equal(res.perms(m)[g], torch.argsort(p[g])), (m, g)
            assert grp.is_valid_permutation(res.perms(m)[g])
    assert all(torch.equal(res.perms(0)[g], torch.arange(grp.size))
               for g, grp in spec.groups.items())  # fmt: skip
    assert res.iterations >= 1 and {"match_gradient", "match_lap"} <= set(res.timings)


def test_universe_maps_keep_every_model_function_and_improve_on_the_init() -> None:
    spec = _spec("resnet20x1-gn")
    models = [_model("resnet20x1-gn", s) for s in (0, 1, 2)]
    sds = [m.state_dict() for m in models]
    res = fw.frank_wolfe_matching(spec, sds, max_iter=30, seed=0)
    x = torch.randn(4, 3, 32, 32)
    for m, perms in zip(models, res.model_perms, strict=True):
        with torch.no_grad():
            assert torch.allclose(spec.permuted(m, perms)(x), m(x), atol=1e-5)
    # the result is at least as good as its start (each model weight-matched to model 0)
    start = [spec.identity_permutations()] + [
        weight_matching(spec, sds[0], sd, seed=k).perms for k, sd in enumerate(sds[1:], 1)
    ]
    f_start = fw.universe_objective(spec, sds, start)
    assert res.objective["universe"] >= f_start - 1e-6 * abs(f_start)
    naive = fw.universe_objective(spec, sds, [spec.identity_permutations()] * 3)
    assert res.objective["universe"] > naive


def test_universe_maps_are_cycle_consistent_and_pairwise_matching_is_not() -> None:
    spec = _spec("resnet20x1-gn")
    sds = [_model("resnet20x1-gn", s).state_dict() for s in (0, 1, 2)]
    res = fw.frank_wolfe_matching(spec, sds, max_iter=5, seed=0)
    assert cycle_error(pairwise_from_universe(res.model_perms))["mean"] == 0.0
    independent = {
        (i, j): weight_matching(spec, sds[i], sds[j], seed=0).perms
        for i, j in [(0, 1), (0, 2), (1, 2)]
    }
    err = cycle_error(independent)
    assert 0.0 < err["mean"] <= 1.0 and err["triangles"] == 1


def test_cycle_error_counts_the_units_that_do_not_come_back() -> None:
    ident = torch.arange(4)
    swap = torch.tensor([1, 0, 2, 3])
    pairs = {(0, 1): {"g": ident}, (1, 2): {"g": ident}, (0, 2): {"g": swap}}
    assert cycle_error(pairs) == {"mean": 0.5, "per_group": {"g": 0.5}, "triangles": 1}
    with pytest.raises(ValueError, match="at least 3 models"):
        cycle_error({(0, 1): {"g": ident}})
    with pytest.raises(ValueError, match="missing"):
        cycle_error({(0, 1): {"g": ident}, (1, 2): {"g": ident}})


def _soft_problem(name: str, n_models: int = 3):
    spec = _spec(name)
    sds = [{k: v.double() for k, v in _model(name, s).state_dict().items()}
           for s in range(n_models)]  # fmt: skip
    pieces = fw._pieces(spec, sds[0], fw.DEFAULT_IGNORE)
    groups = sorted({g for pc in pieces for _, g in pc.factors})
    with ThreadPoolExecutor(1) as pool:
        maps, _ = fw._initial_maps(
            spec, sds, groups, "sinkhorn", 0, "scipy", fw.DEFAULT_IGNORE, pool
        )
    return spec, sds, pieces, groups, maps


def _prefixes(sds, pieces, maps):
    return [[fw._apply_all(pc.view(sd[pc.key]), pc, mp) for pc in pieces]
            for sd, mp in zip(sds, maps, strict=True)]  # fmt: skip


def _pairwise_objective(sds, pieces, maps) -> torch.Tensor:
    """The paper's form: sum over pairs i < j of <W_i, P_i P_j^T W_j ...> via universe maps."""
    total = torch.zeros((), dtype=torch.float64)
    us = [[p[-1] for p in pre] for pre in _prefixes(sds, pieces, maps)]
    for i in range(len(us)):
        for j in range(i + 1, len(us)):
            total = total + sum((a * b).sum() for a, b in zip(us[i], us[j], strict=True))
    return total


@pytest.mark.parametrize("name", ["branches", "attention"])
def test_gradient_matches_autograd(name: str) -> None:
    spec, sds, pieces, groups, maps = _soft_problem(name)
    leaf = [{g: p.clone().requires_grad_(True) for g, p in mp.items()} for mp in maps]
    _pairwise_objective(sds, pieces, leaf).backward()
    grads = fw._gradients(_prefixes(sds, pieces, maps), pieces, maps, groups)
    for mine, ref in zip(grads, leaf, strict=True):
        for g in groups:
            assert torch.allclose(mine[g], ref[g].grad, atol=1e-10), g


def test_line_search_polynomial_is_the_objective_along_the_segment() -> None:
    spec, sds, pieces, groups, maps = _soft_problem("branches")
    pre = _prefixes(sds, pieces, maps)
    grads = fw._gradients(pre, pieces, maps, groups)
    coords = fw.coordinates(spec)
    with ThreadPoolExecutor(1) as pool:
        vertices = fw._round_all(spec, coords, grads, "scipy", pool, oracle=True)
    t, value, nodes = fw._line_search(pre, pieces, maps, vertices)
    assert 0.0 < t <= 1.0

    def at(s: float) -> float:
        moved = [{g: (1 - s) * p + s * fw._one_hot(v[g]).double() for g, p in mp.items()}
                 for mp, v in zip(maps, vertices, strict=True)]  # fmt: skip
        return float(_pairwise_objective(sds, pieces, moved))

    assert value == pytest.approx(at(t), rel=1e-9)
    for s in (0.0, 0.25, 0.5, 1.0):
        assert at(s) <= value + 1e-9 * abs(value)
    # after the move, the cached universe tensors are those of the new maps
    fw._move(pre, maps, vertices, nodes, t)
    fresh = _prefixes(sds, pieces, maps)
    for a, b in zip(pre, fresh, strict=True):
        for pa, pb in zip(a, b, strict=True):
            assert all(torch.allclose(x, y, atol=1e-10) for x, y in zip(pa, pb, strict=True))


def test_sinkhorn_init_runs_and_objective_never_decreases() -> None:
    spec = _spec("mlp")
    sds = [_model("mlp", s).state_dict() for s in range(4)]
    seen: list[float] = []
    res = fw.frank_wolfe_matching(
        spec, sds, init="sinkhorn", max_iter=15, progress=lambda it, f, t: seen.append(f)
    )
    assert len(seen) == res.iterations >= 2
    assert all(b >= a - 1e-6 * abs(a) for a, b in zip(seen, seen[1:], strict=False))
    for perms in res.model_perms:
        assert all(spec.groups[g].is_valid_permutation(p) for g, p in perms.items())


def test_bad_input() -> None:
    spec = _spec("mlp")
    sd = _model("mlp", 0).state_dict()
    with pytest.raises(ValueError, match="at least 2 models"):
        fw.frank_wolfe_matching(spec, [sd])
    with pytest.raises(ValueError, match="'init'"):
        fw.frank_wolfe_matching(spec, [sd, sd], init="nope")
    with pytest.raises(ValueError, match="weights= instead"):
        get_method("c2m3")(spec, [sd, sd, sd], lam=0.3)


@pytest.mark.skipif(not os.environ.get("SYMMERGE_DATA"), reason="needs SYMMERGE_DATA (CI sets it)")
def test_cli_merges_three_checkpoints_with_c2m3_and_repair(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from symmerge.cli import main
    from symmerge.io import load_checkpoint, save_checkpoint

    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        model, config = create_model("mlp", depth=2, width=16)
        path = tmp_path / f"m{seed}.safetensors"
        save_checkpoint(path, model, config, {"dataset": "mnist", "classes": None, "seed": seed})
        paths.append(str(path))
    out = tmp_path / "merged.safetensors"
    result = CliRunner().invoke(
        main, ["merge", *paths, "--method", "c2m3", "--repair", "--data", "mnist",
               "--data-samples", "200", "--eval-limit", "200", "-p", "max_iter=5",
               "-p", "init=sinkhorn", "-o", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "merged (c2m3, repair)" in result.output and out.exists()
    merged, meta = load_checkpoint(out)
    assert meta["method"] == "c2m3" and len(meta["inputs"]) == 3
    assert meta["params"] == {"max_iter": 5, "init": "sinkhorn"}
    bad = tmp_path / "bad.safetensors"
    result = CliRunner().invoke(
        main, ["merge", *paths, "--method", "c2m3", "-p", "steps=3", "-o", str(bad)]
    )
    assert result.exit_code != 0 and "takes no 'steps'" in result.output and not bad.exists()
    assert all(torch.isfinite(v).all() for v in merged.state_dict().values())
