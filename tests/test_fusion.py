"""Neuron-interpolation fusion, linear variants (kf-linear, hf-linear): algorithms.md §5."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import symmerge
from symmerge.merging import merge
from symmerge.models import create_model
from symmerge.spec import _jitter_


def _mlp(seed: int, width: int = 16, depth: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("mlp", width=width, depth=depth)[0].eval()
    _jitter_(model, seed)
    return model


def _data(model: nn.Module, n: int = 1024, size: int = 128) -> list[torch.Tensor]:
    """More samples than inputs (784 + 1), so every least-squares fit is determined."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *model.input_shape, generator=g)
    return list(x.split(size))


def _copies(model: nn.Module, k: int) -> list[nn.Module]:
    spec = symmerge.trace(model, (torch.randn(2, *model.input_shape),))
    return [model] + [spec.permuted(model, spec.random_permutations(seed=s)) for s in range(k)]


@pytest.mark.parametrize(
    ("method", "copies"), [("kf-linear", 1), ("kf-linear", 2), ("hf-linear", 1)]
)
def test_fusing_permuted_copies_returns_the_model(method: str, copies: int) -> None:
    model = _mlp(0)
    data = _data(model)
    fused, res = merge(_copies(model, copies), method, data=data, ridge=1e-10)
    x = torch.randn(16, *model.input_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
    assert all(v == pytest.approx(0.0, abs=1e-8) for v in res.objective.values())


def test_hf_recovers_a_random_permutation() -> None:
    model = _mlp(1)
    spec = symmerge.trace(model, (torch.randn(2, *model.input_shape),))
    applied = spec.random_permutations(seed=4)
    other = spec.permuted(model, applied)
    _, res = merge([model, other], "hf-linear", data=_data(model))
    for g, gm in res.maps.items():
        partner = gm.unmerge_matrix(1).argmax(0)  # the unit of model 1 in each fused unit
        assert torch.equal(partner, torch.argsort(applied[g])), g


def test_different_widths_fuse_to_any_width_and_results_repeat() -> None:
    a, b = _mlp(0, width=32), _mlp(1, width=16)
    data = _data(a)
    x = data[0][:8]
    for width in (24, 32, 48):
        fused, res = merge([a, b], "kf-linear", data=data, width=width, restarts=2)
        assert all(gm.n_out == width for gm in res.maps.values())
        with torch.no_grad():
            assert torch.isfinite(fused(x)).all()
    again, _ = merge([a, b], "kf-linear", data=data, width=24, restarts=2)
    first, _ = merge([a, b], "kf-linear", data=data, width=24, restarts=2)
    for (k, v), w in zip(first.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_bad_input_is_refused() -> None:
    a, b = _mlp(0, width=32), _mlp(1, width=16)
    data = _data(a, 256)
    with pytest.raises(ValueError, match="kf-linear"):
        merge([a, b], "hf-linear", data=data)
    with pytest.raises(ValueError, match="kf-linear"):
        merge([a, a, a], "hf-linear", data=data)
    with pytest.raises(ValueError, match=r"\[1, 48\]"):
        merge([a, b], "kf-linear", data=data, width=49)
    with pytest.raises(ValueError, match="uniform"):
        merge([a, b], "kf-linear", data=data, importance="conductance")
    with pytest.raises(ValueError, match="data"):
        merge([a, b], "kf-linear")


def test_class_share_head_weights_each_class_by_the_parents_data() -> None:
    """Parent 0 saw classes 0-4 only, parent 1 classes 5-9 (and both saw class 9 equally):
    the head's target takes each class's logit from the parents that saw it."""
    from symmerge.methods.fusion import _head_targets

    model = _mlp(0)
    spec = symmerge.trace(model, (torch.randn(2, *model.input_shape),))
    counts = [[10] * 5 + [0] * 4 + [5], [0] * 5 + [10] * 4 + [5]]
    goals, used = _head_targets(spec, model, "auto", counts, 2, "kf-linear")
    assert used == "class-share" and len(goals) == 1
    (target,) = goals.values()
    ya, yb = torch.randn(3, 10), torch.randn(3, 10)
    want = torch.cat([ya[:, :5], yb[:, 5:9], (ya[:, 9:] + yb[:, 9:]) / 2], 1)
    torch.testing.assert_close(target([ya, yb]), want)
    assert _head_targets(spec, model, "auto", None, 2, "kf-linear") == ({}, "mean")
    with pytest.raises(ValueError, match="class_counts"):
        _head_targets(spec, model, "class-share", None, 2, "kf-linear")
    with pytest.raises(ValueError, match="classes"):
        _head_targets(spec, model, "class-share", [[1] * 9, [1] * 9], 2, "kf-linear")
    # fused permuted copies stay the model with any class shares
    data = _data(model)
    fused, res = merge(_copies(model, 1), "kf-linear", data=data, ridge=1e-10,
                       class_counts=counts)  # fmt: skip
    assert "class-share" in res.log[0]
    with torch.no_grad():
        torch.testing.assert_close(fused(data[0]), model(data[0]), rtol=1e-4, atol=1e-4)


def test_logit_kd_refits_only_the_head() -> None:
    """Model 0's trunk is kept; its head is refitted to the parents' averaged logits: with a
    permuted copy (the same logits) the model comes back, with another parent only the head
    changes."""
    model = _mlp(0)
    data = _data(model)
    fused, res = merge(_copies(model, 1), "logit-kd", data=data, ridge=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(fused(data[0]), model(data[0]), rtol=1e-4, atol=1e-4)
    other = _mlp(1)
    fused, res = merge([model, other], "logit-kd", data=data)
    changed = {
        k for k, v in fused.state_dict().items() if not torch.equal(v, model.state_dict()[k])
    }
    assert changed == {"layers.5.weight", "layers.5.bias"}, changed


def test_cached_parent_targets_give_the_same_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parents' layer targets, kept between layers, fit what recomputing them fits."""
    import symmerge.refine.lstsq as lstsq

    models = [_mlp(0), _mlp(1), _mlp(2)]
    data = _data(models[0], n=512)
    cached, _ = merge(models, "kf-linear", data=data, restarts=2)
    monkeypatch.setattr(lstsq, "TARGET_CACHE_BYTES", 0)  # too small: every layer reruns parents
    rerun, _ = merge(models, "kf-linear", data=data, restarts=2)
    for (k, v), w in zip(cached.state_dict().items(), rerun.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6, msg=k)


def test_parents_of_other_depth_or_layer_types_are_refused() -> None:
    a, deeper = _mlp(0, depth=2), _mlp(1, depth=3)
    data = _data(a, 256)
    for method in ("kf-linear", "kf-gradient", "otfusion"):
        with pytest.raises(ValueError, match="another depth"):
            merge([a, deeper], method, data=data)
    gelu = _mlp(2)
    gelu.layers[2] = nn.GELU()  # same parameters, another layer type
    with pytest.raises(ValueError, match="other layer types.*GELU"):
        merge([a, gelu], "kf-linear", data=data)


def test_fusion_fits_dense_layers() -> None:
    """The paper's layer fit is unconstrained least squares: no weight is held at zero where
    a cluster holds one parent's units only (PLeaS keeps that support; fusion does not)."""
    models = [_mlp(0, width=32), _mlp(1, width=32)]
    fused, res = merge(models, "kf-linear", data=_data(models[0], 512), restarts=2)
    one_parent = [  # clusters with members from one parent only exist, so a mask would bite
        g
        for g, gm in res.maps.items()
        if bool(((gm.merge_matrix(0) != 0).any(1) ^ (gm.merge_matrix(1) != 0).any(1)).any())
    ]
    assert one_parent
    hidden = [v for k, v in fused.state_dict().items() if k.endswith("weight")][1:-1]
    assert all(int((w == 0).sum()) == 0 for w in hidden)
