"""MuDSC: identity recovery on plain, GroupNorm and attention models, the alpha = 0 / alpha = 1
limits, parameter validation and determinism (algorithms.md §4, §6.4), for the permute and the
zip variant, and the alpha search (alpha="auto") on held-out training batches."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import symmerge
from symmerge.merging import build_model
from symmerge.methods import get_method, method_info
from symmerge.methods.mudsc import ALPHA_GRID
from symmerge.models import create_model
from symmerge.similarity import WeightSimilarity, activation_similarity
from symmerge.solvers import lap_objective
from symmerge.solvers.coordinate import weight_matching
from symmerge.spec import SymmetrySpec, _jitter_
from symmerge.stats import collect_statistics

pytestmark = pytest.mark.usefixtures("one_thread")

mudsc = get_method("mudsc")


@functools.cache
def _spec(name: str) -> SymmetrySpec:
    model = create_model(name)[0].eval()
    return symmerge.trace(model, torch.randn(2, *model.input_shape))


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name)[0].eval()


def _batches(model: nn.Module, n: int = 2, size: int = 8) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(size, *model.input_shape, generator=gen) for _ in range(n)]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in b)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[g], b[g]) for g in a)


# ---- identity recovery (§6.4 item 2) --------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "resnet20x1-gn", "vit-tiny"])
def test_mudsc_recovers_a_permuted_copy(name: str) -> None:
    spec, model = _spec(name), _model(name)
    applied = spec.random_permutations(seed=7)
    perm_model = spec.permuted(model, applied)
    blocked = {g: grp.blocks for g, grp in spec.groups.items() if grp.blocks}
    moved = [
        g
        for g, b in blocked.items()
        if spec.block_permutation(g, applied[g]).tolist() != [*range(b)]
    ]
    if name != "mlp":  # whole GroupNorm groups / heads really are moved
        assert len(blocked) == 12 and len(moved) >= 6
    data = _batches(model)
    res = mudsc(spec, [model, perm_model], data=data, seed=0)
    assert res.method == "mudsc" and 1 <= res.iterations <= 100
    found = res.perms(1)
    for g, grp in spec.groups.items():
        assert torch.equal(found[g], torch.argsort(applied[g])), g
        assert grp.is_valid_permutation(found[g]), g  # never across GN groups or heads
    assert _max_diff(res.state_dict, model.state_dict()) == 0.0
    merged = copy.deepcopy(model)
    merged.load_state_dict(res.state_dict)
    with torch.no_grad():
        assert torch.equal(merged(data[0]), model(data[0]))
    assert set(res.objective) == set(spec.groups)
    # aligned units correlate 1 in weight space, 1 in activation space unless constant on the
    # data (then 0): each scores 0.5 + 0.5 * (0 or 1) at alpha = 0.5 (heads score their dims')
    for g, grp in spec.groups.items():
        if grp.block_group is None and grp.members:
            assert 0.5 * grp.size - 1e-4 <= res.objective[g] <= grp.size * (1 + 1e-6), g
            live = 2 * res.objective[g] - grp.size
            assert live == pytest.approx(round(live), abs=1e-3) and live >= 0.9 * grp.size, g


def test_weights_fix_what_activations_cannot_see() -> None:
    """On 16 random inputs some MLP units never fire: activation matching (alpha=0) misplaces
    them, the weight share (alpha=0.5) puts them back."""
    spec, model = _spec("mlp"), _model("mlp")
    applied = spec.random_permutations(seed=7)
    models = [model, spec.permuted(model, applied)]
    stats = collect_statistics(spec, models, _batches(model))
    want = {g: torch.argsort(p) for g, p in applied.items()}
    act_only = mudsc(spec, models, stats=stats, alpha=0.0)
    assert not _same(act_only.perms(1), want) and act_only.iterations == 1
    assert _max_diff(act_only.state_dict, model.state_dict()) > 1e-2
    dual = mudsc(spec, models, stats=stats, alpha=0.5)
    assert _same(dual.perms(1), want) and dual.iterations == 2


def test_merge_front_door() -> None:
    spec, model = _spec("mlp"), _model("mlp")
    perm_model = spec.permuted(model, spec.random_permutations(seed=3))
    data = _batches(model, n=4, size=16)
    merged, res = symmerge.merge([model, perm_model], "mudsc", data=data, alpha=0.3)
    assert res.method == "mudsc"
    with torch.no_grad():
        assert torch.equal(merged(data[0]), model(data[0]))


# ---- limits: alpha = 0 is activation matching, alpha = 1 weight matching -----------------------


def _pair(seed: int) -> list[nn.Module]:
    return [_model("mlp", 100 + seed), _model("mlp", 200 + seed)]


@pytest.mark.parametrize("seed", [0, 1, 4])
def test_alpha_zero_is_activation_matching(seed: int) -> None:
    spec, models = _spec("mlp"), _pair(seed)
    stats = collect_statistics(spec, models, _batches(models[0], size=32))
    act = get_method("activation")(spec, models, stats=stats)
    res = mudsc(spec, models, stats=stats, alpha=0.0, seed=seed)
    assert _same(res.perms(1), act.perms(1))
    assert res.iterations == 1 and "total" not in " ".join(res.log)
    assert sum(res.objective.values()) == pytest.approx(sum(act.objective.values()), rel=1e-12)
    assert _max_diff(res.state_dict, act.state_dict) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 4])
def test_alpha_one_is_weight_matching_with_correlations(seed: int) -> None:
    spec, models = _spec("mlp"), _pair(seed)
    sds = [m.state_dict() for m in models]  # alpha = 1 needs neither data nor modules
    wm = get_method("weight")(spec, models, kind="corr", seed=seed)
    res = mudsc(spec, sds, alpha=1.0, seed=seed, patience=None)
    assert _same(res.perms(1), wm.perms(1)) and res.iterations == wm.iterations
    assert res.objective == pytest.approx(wm.objective, rel=1e-12)
    assert _max_diff(res.state_dict, wm.state_dict) == 0.0
    paper = mudsc(spec, sds, alpha=1.0, seed=seed)  # the paper's patience: same search here
    with_patience = weight_matching(spec, sds[0], sds[1], kind="corr", seed=seed, patience=5)
    assert _same(paper.perms(1), with_patience.perms)
    # patience keeps the best sweep: the same path while the sweep totals rise (pair 0); from
    # the identity, pairs 1 and 4 dip (at sweep 9 on pair 1), go back and end higher
    ident = spec.identity_permutations()
    plain = weight_matching(spec, sds[0], sds[1], kind="corr", seed=seed, init=ident)
    best = weight_matching(spec, sds[0], sds[1], kind="corr", seed=seed, init=ident, patience=5)
    dips = [line for line in best.log if "<= best" in line]
    assert _same(best.perms, plain.perms) == (not dips)
    assert bool(dips) == (seed in (1, 4))
    if seed == 1:
        assert dips[0].startswith("sweep 9:")
        assert sum(best.objective.values()) > sum(plain.objective.values()) + 0.1


def test_dual_objective_is_the_mixed_similarity_and_beats_the_start() -> None:
    spec, models = _spec("mlp"), _pair(2)
    stats = collect_statistics(spec, models, _batches(models[0], size=32))
    start = get_method("activation")(spec, models, stats=stats).perms(1)
    res = mudsc(spec, models, stats=stats, alpha=0.5, seed=2)
    found = res.perms(1)
    assert not _same(found, start) and res.iterations >= 2
    sds = [m.state_dict() for m in models]
    w_sim = WeightSimilarity(spec, sds[0], sds[1], kind="corr")

    def total(perms: dict[str, torch.Tensor]) -> float:
        out = 0.0
        for g in spec.groups:
            c = 0.5 * w_sim(g, perms).double() + 0.5 * activation_similarity(stats, g, 0, 1)
            out += lap_objective(c, perms[g])
        return out

    assert sum(res.objective.values()) == pytest.approx(total(found), rel=1e-9)
    assert total(found) > total(start) + 1.0
    for g, grp in spec.groups.items():  # every correlation is in [-1, 1]
        assert abs(res.objective[g]) <= grp.size


# ---- validation, registry, determinism --------------------------------------------------------


def test_bad_input_is_a_clear_error() -> None:
    spec, model = _spec("mlp"), _model("mlp")
    data, models = _batches(model), [model, model]
    for alpha in (1.5, -0.1, math.nan, True, "0.5", "Auto", None):
        with pytest.raises(ValueError, match=r"'alpha' parameter of mudsc .* \[0, 1\] or 'auto'"):
            mudsc(spec, models, data=data, alpha=alpha)
    with pytest.raises(ValueError, match=r"'variant' parameter .*\('permute', 'zip'\)"):
        mudsc(spec, models, data=data, variant="align")
    for name in ("max_sweeps", "patience"):
        with pytest.raises(ValueError, match=f"'{name}' parameter of mudsc must be an int >= 1"):
            mudsc(spec, models, data=data, **{name: 0})
    with pytest.raises(ValueError, match="merges 2 models, got 3"):
        mudsc(spec, [model] * 3, data=data)
    with pytest.raises(ValueError, match="needs data"):
        mudsc(spec, models)
    with pytest.raises(ValueError, match="nn.Modules"):
        mudsc(spec, [model.state_dict()] * 2, data=data)
    with pytest.raises(ValueError, match="needs data"):
        symmerge.merge(models, "mudsc")


def test_registry_entry() -> None:
    info = method_info("mudsc")
    assert info.needs_data and info.max_models == 2 and not info.unequal_widths
    assert info.target_width  # the zip variant's width=
    assert info.url == "https://arxiv.org/abs/2403.01753" and "MuDSC" in (info.paper or "")
    assert info.summary.startswith("MuDSC: align model 1 to model 0")


def test_deterministic_under_a_seed() -> None:
    spec, models = _spec("mlp"), _pair(3)
    stats = collect_statistics(spec, models, _batches(models[0], size=32))
    runs = [mudsc(spec, models, stats=stats, alpha=0.5, seed=s) for s in (5, 5, 6)]
    assert _same(runs[0].perms(1), runs[1].perms(1))
    assert runs[0].objective == runs[1].objective and runs[0].log == runs[1].log
    assert _max_diff(runs[0].state_dict, runs[1].state_dict) == 0.0
    assert runs[0].log != runs[2].log  # the seed sets the visiting order


# ---- the zip variant (MuDSC-Zip) ------------------------------------------------------------


def _small(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("mlp", width=32, depth=2)[0].eval()


@functools.cache
def _small_spec() -> SymmetrySpec:
    return symmerge.trace(_small(0), torch.randn(2, 1, 28, 28))


def _partner(gm: symmerge.GroupMap) -> torch.Tensor:
    """For a map whose merged units each hold one unit of each of two models: the unit of
    model 1 merged with unit i of model 0."""
    lab0, lab1 = gm.unmerge_matrix(0).argmax(1), gm.unmerge_matrix(1).argmax(1)
    for lab in (lab0, lab1):
        assert torch.equal(lab.sort().values, torch.arange(gm.n_out))
    return torch.argsort(lab1)[lab0]


@pytest.mark.parametrize(("stop", "width", "n_out"), [(None, None, [32, 32]), (1, None, [32, 64]),
                                                      (None, 40, [40, 40])])  # fmt: skip
def test_zip_variant_alpha_zero_is_the_zip_method(stop: int, width: int, n_out: list) -> None:
    models = [_small(0), _small(1)]
    data, x = _batches(models[0], size=16), _batches(models[0], 1, 4)[0]
    want, zipped = symmerge.merge(models, "zip", data=data, stop=stop, width=width)
    got, res = symmerge.merge(models, "mudsc", data=data, variant="zip", alpha=0.0, stop=stop,
                              width=width)  # fmt: skip
    assert res.iterations == 0 and res.objective == zipped.objective
    assert [gm.n_out for gm in res.maps.values()] == n_out
    for g, gm in zipped.maps.items():
        for m in range(2):
            assert torch.equal(res.maps[g].merge_matrix(m), gm.merge_matrix(m)), g
            assert torch.equal(res.maps[g].unmerge_matrix(m), gm.unmerge_matrix(m)), g
    assert _max_diff(res.state_dict, zipped.state_dict) == 0.0
    with torch.no_grad():
        assert torch.equal(got(x), want(x))


@pytest.mark.parametrize("name", ["mlp", "resnet20x1-gn", "vit-tiny"])
def test_zip_variant_recovers_a_permuted_copy(name: str) -> None:
    """Post-ReLU statistics alone: 2 units of the MLP's second layer never fire on the data,
    so the zip method (alpha=0) merges wrong pairs; the weight share pairs every unit with its
    copy (GroupNorm groups and heads too) and gives the model back."""
    if name == "mlp":
        spec, model = _small_spec(), _small(0)
    else:
        spec, model = _spec(name), _model(name, 1)
        _jitter_(model, 1)
    applied = spec.random_permutations(seed=3)
    copy_ = spec.permuted(model, applied)
    stats = collect_statistics(spec, [model, copy_], _batches(model, size=16))
    res = mudsc(spec, [model, copy_], stats=stats, variant="zip", alpha=0.5)
    assert res.method == "mudsc" and res.iterations >= 1
    assert _max_diff(res.state_dict, model.state_dict()) < 1e-5
    for g, gm in res.maps.items():
        assert gm.n_out == spec.groups[g].size
        assert torch.equal(_partner(gm), torch.argsort(applied[g])), g
    for g, v in res.objective.items():  # weight correlation 1, activations 1 or 0 (dead)
        assert 0.75 <= v <= 1.0 + 1e-9, g
    if name == "mlp":
        assert res.objective["layers.1.out"] == pytest.approx(1.0)
        assert res.objective["layers.3.out"] == pytest.approx(31 / 32)  # 2 dead pairs at 0.5
        act = mudsc(spec, [model, copy_], stats=stats, variant="zip", alpha=0.0)
        assert _max_diff(act.state_dict, model.state_dict()) > 1e-2


def test_zip_variant_weights_read_neighbours_in_merged_units() -> None:
    """C_w of the first layer's units: their incoming weights and bias as they are, their
    outgoing weights summed over the second layer's clusters (U^T), Pearson across entries."""
    from symmerge.methods.mudsc import _weight_corr

    spec, models = _small_spec(), [_small(0), _small(1)]
    sds = [m.state_dict() for m in models]
    zipped = get_method("zip")(spec, models, data=_batches(models[0], size=16))
    layouts = {mem.tensor: {} for mem in spec.members()}
    for mem in spec.members():
        layouts[mem.tensor][mem.axis] = mem
    maps = {"layers.3.out": zipped.maps["layers.3.out"]}
    got = _weight_corr(spec, layouts, sds, "layers.1.out", maps)
    rows = []
    for m, sd in enumerate(sds):
        out = maps["layers.3.out"].unmerge_matrix(m).T @ sd["layers.3.weight"].double()
        w, b = sd["layers.1.weight"].double(), sd["layers.1.bias"].double()
        rows.append(torch.cat([w, b[:, None], out.T], 1))
    want = torch.corrcoef(torch.cat(rows))
    assert got.shape == (64, 64) and torch.allclose(got, want, atol=1e-12)
    # a neighbour left unzipped (no map): its tensors are left out
    alone = _weight_corr(spec, layouts, sds, "layers.1.out", {})
    assert torch.allclose(alone, torch.corrcoef(torch.cat([r[:, :785] for r in rows])), atol=1e-12)


def test_zip_variant_sweeps_and_is_deterministic() -> None:
    spec, models = _small_spec(), [_small(2), _small(3)]
    stats = collect_statistics(spec, models, _batches(models[0], size=32))
    runs = [mudsc(spec, models, stats=stats, variant="zip", alpha=0.5, seed=s) for s in (5, 5, 6)]
    assert runs[0].log == runs[1].log and runs[0].objective == runs[1].objective
    assert _max_diff(runs[0].state_dict, runs[1].state_dict) == 0.0
    assert runs[0].log != runs[2].log  # the seed sets the visiting order
    res = runs[0]
    assert 2 <= res.iterations <= 100 and res.log[1].startswith("sweep 1:")
    start = get_method("zip")(spec, models, stats=stats)
    assert any(not torch.equal(res.maps[g].unmerge_matrix(1), start.maps[g].unmerge_matrix(1))
               for g in spec.groups)  # fmt: skip
    for gm in res.maps.values():  # a zip map: merging after unmerging is the identity
        eye = sum(gm.merge_matrix(m) @ gm.unmerge_matrix(m) for m in range(2))
        assert torch.allclose(eye, torch.eye(32, dtype=torch.float64), atol=1e-12)


# ---- alpha="auto" ---------------------------------------------------------------------------


@functools.cache
def _labelled_task() -> tuple[tuple[nn.Module, ...], tuple[tuple[torch.Tensor, torch.Tensor], ...]]:
    """Two 32-wide MLPs trained on disjoint classes (0-4, 5-9) of a random linear teacher's
    10-class problem; four training batches of 64 over all classes."""
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(10, 784, generator=gen)
    x = torch.randn(1024, 1, 28, 28, generator=gen)
    y = (x.flatten(1) @ teacher.T).argmax(1)
    models = []
    for k, keep in enumerate((y < 5, y >= 5)):
        model = _small(10 + k).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for _ in range(100):
            opt.zero_grad()
            F.cross_entropy(model(x[keep]), y[keep]).backward()
            opt.step()
        models.append(model.eval())
    return tuple(models), tuple((x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64))


AUTO_CASES = [("permute", 0.9, 44 / 64, 35 / 64), ("zip", 0.4, 61 / 64, 56 / 64)]


@pytest.mark.parametrize(("variant", "chosen", "best_acc", "worst_acc"), AUTO_CASES)
def test_auto_picks_the_best_alpha_on_held_out_training_data(
    variant: str, chosen: float, best_acc: float, worst_acc: float
) -> None:
    """Joint accuracy (argmax over all 10 logits) on the held-out last batch; the zip variant
    ties at 0.4 and 0.5 and takes the smaller."""
    models, batches = _labelled_task()
    spec = _small_spec()
    res = mudsc(spec, list(models), data=list(batches), alpha="auto", variant=variant, seed=1)
    acc = {a: res.objective[f"auto/accuracy@{a:g}"] for a in ALPHA_GRID}
    best = res.objective["auto/alpha"]
    assert best == chosen == max(acc, key=acc.__getitem__)
    assert (acc[best], min(acc.values())) == (best_acc, worst_acc)  # the choice matters here
    assert res.log[0].startswith(f"alpha=auto: chosen {best:g}; accuracy on 64 held-out")
    # the fixed alpha on the first three batches' statistics, scored on the fourth
    stats = collect_statistics(spec, list(models), list(batches[:3]))
    fixed = mudsc(spec, list(models), stats=stats, alpha=best, variant=variant, seed=1)
    assert (
        _max_diff(res.state_dict, fixed.state_dict) == 0.0 and res.maps.keys() == fixed.maps.keys()
    )
    merged = build_model(models[0], spec, fixed.maps, fixed.state_dict)
    x, y = batches[3]
    with torch.no_grad():
        assert float((merged(x).argmax(1) == y).double().mean()) == acc[best]
    # deterministic under a seed; select_data= is the same split made by hand
    again = mudsc(spec, list(models), data=list(batches[:3]), select_data=list(batches[3:]),
                  alpha="auto", variant=variant, seed=1)  # fmt: skip
    assert again.objective == res.objective and again.log == res.log
    assert _max_diff(again.state_dict, res.state_dict) == 0.0


def test_auto_and_zip_bad_input_is_a_clear_error() -> None:
    models, batches = _labelled_task()
    spec, models, batches = _small_spec(), list(models), list(batches)
    with pytest.raises(ValueError, match=r"must be labelled \(inputs, labels\) tuples"):
        mudsc(spec, models, data=[x for x, _ in batches], alpha="auto")
    stats = collect_statistics(spec, models, batches)
    with pytest.raises(ValueError, match="needs labelled training batches to pick alpha"):
        mudsc(spec, models, stats=stats, alpha="auto")
    with pytest.raises(ValueError, match=r"last quarter of data=, which has 1 batch"):
        mudsc(spec, models, data=batches[:1], alpha="auto")
    with pytest.raises(ValueError, match="pass nn.Modules"):
        mudsc(spec, [m.state_dict() for m in models], data=batches, alpha="auto")
    with pytest.raises(ValueError, match="select_data= picks alpha='auto'"):
        mudsc(spec, models, data=batches, select_data=batches, alpha=0.5)
    for name in ("zip_alpha", "beta"):
        with pytest.raises(ValueError, match=rf"'{name}' parameter of mudsc must be a float in "
                                             r"\[0, 1\]\. Got 1.5"):  # fmt: skip
            mudsc(spec, models, data=batches, variant="zip", **{name: 1.5})
    with pytest.raises(ValueError, match="'lam' parameter of mudsc must be 0.5 with variant='zip'"):
        mudsc(spec, models, data=batches, variant="zip", lam=0.3)
    with pytest.raises(ValueError, match="stop= and width= apply to mudsc's zip variant"):
        mudsc(spec, models, data=batches, stop=1)
    with pytest.raises(ValueError, match=r"'stop' parameter of mudsc must be one of \[0, 1, 2\]"):
        mudsc(spec, models, data=batches, variant="zip", stop=3)
    with pytest.raises(
        ValueError, match=r"'width' parameter of mudsc must be an int in \[32, 64\]"
    ):
        mudsc(spec, models, data=batches, variant="zip", width=70)
    with pytest.raises(ValueError, match="needs data"):
        mudsc(spec, models, variant="zip", alpha=1.0)  # the zip starts from activations
