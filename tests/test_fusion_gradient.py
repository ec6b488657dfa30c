"""Neuron-interpolation fusion, gradient variant (kf-gradient) and the levels it fits
(algorithms.md §5)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import symmerge
from symmerge.merging import merge
from symmerge.methods.fusion_gradient import fit_level
from symmerge.models import create_model
from symmerge.refine.levels import levels, run_until
from symmerge.spec import _jitter_

pytestmark = pytest.mark.usefixtures("one_thread")

ZOO = {
    "mlp": ("mlp-w8-d2", {}, 3),
    "vgg11": ("vgg11", {}, 9),  # 8 convs (with their norms) and the classifier, as the paper
    "resnet20": ("resnet20", {"input_shape": (3, 8, 8)}, 11),  # stem, 9 blocks, head
}


def _zoo(key: str, seed: int = 0) -> nn.Module:
    name, kwargs, _ = ZOO[key]
    torch.manual_seed(seed)
    model = create_model(name, **kwargs)[0].eval()
    _jitter_(model, seed)  # non-trivial norms and heads
    return model


def _spec(model: nn.Module) -> symmerge.SymmetrySpec:
    return symmerge.trace(model, (torch.randn(2, *model.input_shape),))


def _mlp(seed: int, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("mlp", width=width, depth=2)[0].eval()
    _jitter_(model, seed)
    return model


def _data(model: nn.Module, n: int = 256, size: int = 64) -> list[torch.Tensor]:
    x = torch.randn(n, *model.input_shape, generator=torch.Generator().manual_seed(0))
    return list(x.split(size))


def _copies(model: nn.Module, k: int) -> list[nn.Module]:
    spec = _spec(model)
    return [model] + [spec.permuted(model, spec.random_permutations(seed=s)) for s in range(k)]


# ---- levels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(ZOO))
def test_levels_cover_every_parameterised_module_once_in_forward_order(key: str) -> None:
    model = _zoo(key)
    found = levels(model, _spec(model))
    owned = [n for n, m in model.named_modules() if next(m.parameters(False), None) is not None]
    assert [n for lv in found for n in lv.modules] == owned  # the zoo's modules run in order
    assert len(found) == ZOO[key][2] and [lv.index for lv in found] == list(range(len(found)))
    assert found[-1].group is None and all(lv.group for lv in found[:-1])
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert {n for lv in found for n in lv.layers} == layers
    if key == "resnet20":  # a block is one level, its shortcut included, ending at its sum
        block = found[4]
        assert block.modules[0] == "layer2.0.conv1" and "layer2.0.shortcut.0" in block.modules
        assert block.group == "layer2.0.conv2.out" and block.exit == ("layer2.0.relu2", 0, True)
    else:  # one level per layer (with its norm)
        assert all(len(lv.layers) == 1 for lv in found)


@pytest.mark.parametrize("key", list(ZOO))
def test_run_until_reproduces_the_models_intermediate_outputs(key: str) -> None:
    model = _zoo(key)
    found = levels(model, _spec(model))
    x = torch.randn(3, *model.input_shape, generator=torch.Generator().manual_seed(1))
    head_calls = []
    head = model.get_submodule(found[-1].layers[-1])
    handle = head.register_forward_hook(lambda *_: head_calls.append(1))
    with torch.no_grad():
        runs = [run_until(model, lv, x) for lv in found[:-1]]
        assert not head_calls  # every level before the head stopped the model early
        handle.remove()
        runs.append(run_until(model, found[-1], x))
        for lv, (inp, out) in zip(found, runs, strict=True):
            if key == "resnet20" and len(lv.layers) > 1:
                b = model.get_submodule(lv.modules[0].rsplit(".", 1)[0])
                want = b.norm2(b.conv2(b.relu1(b.norm1(b.conv1(inp))))) + b.shortcut(inp)
            else:
                want = inp
                for name in lv.modules:  # a layer and its norm, in order
                    want = model.get_submodule(name)(want)
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        for (_, out), (nxt, _) in zip(runs[:-1], runs[1:], strict=True):
            act = torch.relu(out)  # what the next level reads: the activation (and pooling)
            if key == "vgg11" and act.shape[-1] != nxt.shape[-1]:
                act = nn.functional.max_pool2d(act, 2)
            if key != "vgg11" and nxt.dim() == 2 and act.dim() == 4:
                act = act.mean((2, 3))  # resnet: global pool before the head
            torch.testing.assert_close(nxt, act.flatten(1) if nxt.dim() == 2 else act)
        torch.testing.assert_close(runs[-1][1], model(x), rtol=0, atol=0)


class _GatedMLP(nn.Module):
    """SwiGLU: gate and value read the same input; their product feeds the down projection."""

    input_shape = (6,)

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.value = nn.Linear(6, 12, bias=False), nn.Linear(6, 12, bias=False)
        self.down, self.head = nn.Linear(12, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.silu(self.gate(x)) * self.value(x)
        return self.head(torch.relu(self.down(h)))


class _Concat(nn.Module):
    """Two convs on the input, concatenated, normalised, then one conv reads both."""

    input_shape = (3, 6, 6)

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 5, 3, padding=1)
        self.norm, self.c, self.head = nn.BatchNorm2d(9), nn.Conv2d(9, 6, 3), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu(self.norm(torch.cat([self.a(x), self.b(x)], 1)))
        return self.head(nn.functional.relu(self.c(x)).mean((2, 3)))


@pytest.mark.parametrize("cls", [_GatedMLP, _Concat])
def test_parallel_branches_share_a_level_and_fuse_back(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    _jitter_(model, 0)
    found = levels(model, _spec(model))
    first = found[0]  # both branches, and the layer that reads what they make together
    assert set(first.layers) == ({"gate", "value"} if cls is _GatedMLP else {"a", "b", "c"})
    assert [lv.layers for lv in found[1:]] == ([("down",), ("head",)] if cls is _GatedMLP
                                               else [("head",)])  # fmt: skip
    data = _data(model, 128)
    fused, res = merge(_copies(model, 1), "kf-gradient", data=data, epochs=2, patience=1)
    with torch.no_grad():
        torch.testing.assert_close(fused(data[0]), model(data[0]), rtol=1e-4, atol=1e-4)


# ---- kf-gradient ----------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "copies"), [("mlp", 2), ("resnet20", 1)])
def test_fusing_permuted_copies_returns_the_model(key: str, copies: int) -> None:
    model = _mlp(0) if key == "mlp" else _zoo(key)
    data = _data(model, 128 if key == "mlp" else 64)
    fused, res = merge(_copies(model, copies), "kf-gradient", data=data, epochs=4, patience=2)
    with torch.no_grad():
        torch.testing.assert_close(fused(data[0]), model(data[0]), rtol=1e-4, atol=1e-4)
    assert all(v == pytest.approx(0.0, abs=1e-8) for v in res.objective.values())
    assert all(lv["best_epoch"] == 0 for lv in res.details["levels"])  # nothing to improve


def test_a_level_with_reachable_targets_is_fitted_and_stops_early() -> None:
    """The model's own level-1 outputs are the targets of a perturbed copy: Adam drives the
    held-out loss far down, then early stopping ends the level before ``epochs``."""
    model = _mlp(0)
    found = levels(model, _spec(model))
    x = torch.cat(_data(model, 512))
    with torch.no_grad():
        targets = run_until(model, found[1], x)[1]
        other = copy.deepcopy(model)
        other.get_submodule("layers.3").weight.add_(0.3 * torch.randn(16, 16))
    fit = fit_level(other, found[1], x, targets, lr=3e-2, epochs=400, patience=3,
                    batch_size=128)  # fmt: skip
    assert fit.stopped_early and fit.epochs < 400
    assert min(fit.val_loss) < 1e-3 * fit.val_loss[0]
    assert fit.train_loss[-1] < fit.train_loss[0]
    assert fit.val_loss[fit.best_epoch] == min(fit.val_loss)
    with torch.no_grad():  # the best parameters are kept, and only level 1's changed
        got = run_until(other, found[1], x)[1]
        assert float((got - targets).square().mean()) < 1e-3 * fit.val_loss[0]
        assert torch.equal(other.layers[1].weight, model.layers[1].weight)


def test_kf_gradient_is_deterministic_and_fits_each_level() -> None:
    a, b = _mlp(0), _mlp(1, width=24)  # parents of different widths, a fused width of 20
    data = _data(a)
    kwargs = {"width": 20, "epochs": 6, "patience": 2, "loss": "weighted", "seed": 3}
    first, res = merge([a, b], "kf-gradient", data=data, **kwargs)
    again, _ = merge([a, b], "kf-gradient", data=data, **kwargs)
    for (k, v), w in zip(first.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    assert all(gm.n_out == 20 for gm in res.maps.values())
    fits = res.details["levels"]
    assert [f["modules"] for f in fits] == [["layers.1"], ["layers.3"], ["layers.5"]]
    assert all(f["best_loss"] <= f["start_loss"] for f in fits)
    assert any(f["best_loss"] < f["start_loss"] for f in fits[1:])
    assert res.iterations == sum(f["epochs"] for f in fits) and "weighted" in res.log[0]


def test_kl_head_runs_with_its_temperature() -> None:
    a, b = _mlp(0), _mlp(1)
    data = _data(a)
    counts = [[10] * 5 + [1] * 5, [1] * 5 + [10] * 5]
    fused, res = merge([a, b], "kf-gradient", data=data, head="kl", tau=1.5, epochs=3,
                       patience=1, class_counts=counts)  # fmt: skip
    assert res.details["head"] == "kl (tau 1.5, teacher class-share)"
    with torch.no_grad():
        assert torch.isfinite(fused(data[0])).all()
    for tau in (0, -1.0, float("inf"), "2"):
        with pytest.raises(ValueError, match=r"The 'tau' parameter of kf-gradient must be a float"):
            merge([a, b], "kf-gradient", data=data, head="kl", tau=tau)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [({"loss": "l1"}, "loss"), ({"lr": 0}, "lr"), ({"lr": -1e-3}, "lr"),
     ({"epochs": 0}, "epochs"), ({"epochs": 2.5}, "epochs"), ({"tau": 0.0}, "tau"),
     ({"head": "softmax"}, "head"), ({"patience": 0}, "patience"),
     ({"batch_size": 0}, "batch_size"), ({"weight_decay": -1}, "weight_decay"),
     ({"kmeans_init": "random"}, "kmeans_init")],
)  # fmt: skip
def test_bad_options_are_refused_before_any_work(kwargs: dict, param: str) -> None:
    a, b = _mlp(0), _mlp(1)
    with pytest.raises(ValueError, match=f"The '{param}' parameter of kf-gradient must be"):
        merge([a, b], "kf-gradient", data=iter(()), **kwargs)  # no data is ever read
    with pytest.raises(ValueError, match="needs data"):
        merge([a, b], "kf-gradient")


@pytest.mark.skipif(not os.environ.get("SYMMERGE_DATA"), reason="needs SYMMERGE_DATA")
def test_cli_merge_with_kf_gradient(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from symmerge.cli import main
    from symmerge.io import save_checkpoint

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model, config = create_model("mlp", depth=2, width=16)
        paths.append(tmp_path / f"m{seed}.safetensors")
        save_checkpoint(paths[-1], model, config, {"dataset": "mnist", "classes": None})
    out = tmp_path / "fused.safetensors"
    result = CliRunner().invoke(main, ["merge", *map(str, paths), "-m", "kf-gradient",
                                       "--data", "mnist", "--data-samples", "128", "-p",
                                       "epochs=2", "-p", "loss=weighted", "--eval-limit", "100",
                                       "-o", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert out.exists() and "merged (kf-gradient)" in result.output
    bad = CliRunner().invoke(main, ["merge", *map(str, paths), "-m", "kf-gradient", "--data",
                                    "mnist", "-p", "lr=0", "-o", str(tmp_path / "no")])  # fmt: skip
    assert bad.exit_code != 0 and "'lr' parameter of kf-gradient" in bad.output


def test_cli_refuses_parents_of_other_classes_without_class_counts(tmp_path: Path) -> None:
    """Parents of different class sets without class metadata, or of different depths: a
    clear error and nothing written."""
    from click.testing import CliRunner

    from symmerge.cli import main
    from symmerge.io import save_checkpoint

    paths = []
    for seed, classes, depth in (
        (0, [0, 1, 2, 3, 4], 2),
        (1, [5, 6, 7, 8, 9], 2),
        (2, [0, 1, 2, 3, 4], 3),
    ):
        torch.manual_seed(seed)
        model, config = create_model("mlp", depth=depth, width=16)
        paths.append(tmp_path / f"m{seed}.safetensors")
        save_checkpoint(paths[-1], model, config, {"dataset": "mnist", "classes": classes})
    out = tmp_path / "fused.safetensors"
    for method in ("kf-linear", "kf-gradient", "logit-kd"):
        result = CliRunner().invoke(main, ["merge", *map(str, paths[:2]), "-m", method,
                                           "--data", "mnist", "-o", str(out)])  # fmt: skip
        assert result.exit_code != 0 and "class_counts" in result.output, result.output
        assert "-p head=mean" in result.output or method == "logit-kd"
    assert not out.exists()
    if not os.environ.get("SYMMERGE_DATA"):
        return  # the depth check runs in merge(), after the data is loaded
    deeper = CliRunner().invoke(main, ["merge", str(paths[0]), str(paths[2]), "-m",
                                       "kf-linear", "--data", "mnist", "-o", str(out)])  # fmt: skip
    assert deeper.exit_code != 0 and "another depth" in deeper.output, deeper.output
    assert not out.exists()
