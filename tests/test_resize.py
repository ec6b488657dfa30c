"""Resized models and the engine's two exact identities (side by side, duplication).

A merge whose widths differ from its inputs' (zip, partial merge, clustering, the ensemble)
is built by :func:`symmerge.resize.resize` plus the one weight builder. These tests pin the
limits every such method must reach: the side-by-side map is the ensemble (logits averaged,
or each model's own head kept), splitting every unit into two half-weight copies is the same
function, and both survive a checkpoint round trip.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import symmerge
from symmerge.groupmap import GroupMap, build_state_dict
from symmerge.io import CheckpointError, load_checkpoint, save_checkpoint
from symmerge.merging import build_model, merge
from symmerge.models import create_model
from symmerge.resize import ResizeError, resize
from symmerge.spec import _jitter_


def _zoo(name: str, seed: int) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    model, config = create_model(name)
    _jitter_(model, seed)  # non-trivial norms and heads
    return model.eval(), config


def _timm(seed: int) -> tuple[nn.Module, dict]:
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    kwargs = {"num_classes": 10}
    model = timm.create_model("resnet18", pretrained=False, **kwargs)
    model.input_shape = (3, 32, 32)
    _jitter_(model, seed)
    return model.eval(), {"arch": "timm:resnet18", "kwargs": kwargs}


def _models(name: str, n: int = 2) -> tuple[list[nn.Module], dict]:
    pairs = [_timm(s) if name == "timm:resnet18" else _zoo(name, s) for s in range(n)]
    return [m for m, _ in pairs], pairs[0][1]


def _inputs(model: nn.Module) -> torch.Tensor:
    return torch.randn(4, *model.input_shape, generator=torch.Generator().manual_seed(7))


def _reloaded(tmp_path, model: nn.Module, config: dict, meta: dict | None = None) -> nn.Module:
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, config, meta or {}, overwrite=True)
    return load_checkpoint(path)[0]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = float(b.abs().max())
    assert float((a - b).abs().max()) <= 1e-5 * max(1.0, scale), float((a - b).abs().max())


SIDE_BY_SIDE = ["mlp", "resnet20x1", "resnet20x1-gn", "timm:resnet18"]
DUPLICATION = ["mlp", "resnet20x1", "resnet20x1-gn", "vit-tiny", "timm:resnet18"]


@pytest.mark.parametrize("name", [*SIDE_BY_SIDE, "vit-tiny", "resnet20x1-ln", "vgg11"])
def test_resize_to_own_widths_is_the_model(name: str) -> None:
    (model, *_), _ = _models(name, 1)
    x = _inputs(model)
    spec = symmerge.trace(model, (x,))
    same = resize(model, spec, {g.name: g.size for g in spec.groups.values()})
    assert same is not model
    for (k, a), (k2, b) in zip(model.state_dict().items(), same.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(same(x), model(x))


@pytest.mark.parametrize("name", SIDE_BY_SIDE)
def test_side_by_side_is_the_ensemble_after_reload(tmp_path, name: str) -> None:
    models, config = _models(name)
    x = _inputs(models[0])
    merged, result = merge(models, "ensemble", example_inputs=(x,))
    assert all(gm.n_out == 2 * n for gm, n in zip(
        result.maps.values(), [len(gm.merges[0].index) // 2 for gm in result.maps.values()],
        strict=True))  # fmt: skip
    with torch.no_grad():
        want = (models[0](x) + models[1](x)) / 2
        _close(merged(x), want)
        _close(_reloaded(tmp_path, merged, config)(x), want)


@pytest.mark.parametrize("name", ["mlp", "resnet20x1-gn"])
def test_per_task_heads_on_the_side_by_side_trunk_are_the_sources(tmp_path, name: str) -> None:
    models, config = _models(name)
    x = _inputs(models[0])
    merged, _ = merge(models, "ensemble", heads="per-task", example_inputs=(x,))
    with torch.no_grad():
        want = torch.cat([m(x) for m in models], 1)
        _close(merged(x), want)
        reloaded = _reloaded(tmp_path, merged, config)
        _close(reloaded(x), want)
        # each head's argmax is its source model's prediction
        for k, m in enumerate(models):
            assert torch.equal(reloaded(x)[:, 10 * k : 10 * (k + 1)].argmax(1), m(x).argmax(1))


def _duplicate_maps(spec: symmerge.SymmetrySpec) -> dict[str, GroupMap]:
    """Every group with members split into two copies (heads x head dims left as they are)."""
    maps = {}
    for name, g in spec.groups.items():
        if g.members and g.block_group is None:
            maps[name] = GroupMap.duplicate(g.size, blocks=g.blocks)
    return maps


@pytest.mark.parametrize("name", DUPLICATION)
def test_duplication_keeps_the_function_after_reload(tmp_path, name: str) -> None:
    (model, *_), config = _models(name, 1)
    x = _inputs(model)
    spec = symmerge.trace(model, (x,))
    maps = _duplicate_maps(spec)
    state = build_state_dict(spec, [model.state_dict()], maps)
    wide = build_model(model, spec, maps, state, example_inputs=(x,))
    wide_spec = symmerge.trace(wide, (x,))
    for g, gm in maps.items():
        assert wide_spec.groups[g].size == 2 * spec.groups[g].size == gm.n_out
    assert wide_spec.check(wide, x).ok  # the resized model re-traces and passes the check
    with torch.no_grad():
        want = model(x)
        _close(wide(x), want)
        _close(_reloaded(tmp_path, wide, config)(x), want)


def test_side_by_side_with_layernorm_is_not_the_ensemble() -> None:
    """The documented limit: a LayerNorm over the joined width mixes the models' units."""
    models, _ = _models("resnet20x1-ln")
    x = _inputs(models[0])
    merged, _ = merge(models, "ensemble", example_inputs=(x,))
    with torch.no_grad():
        gap = float((merged(x) - (models[0](x) + models[1](x)) / 2).abs().max())
    assert gap > 1e-3


def test_resize_heads_and_head_dims_of_attention() -> None:
    (model, *_), _ = _models("vit-tiny", 1)
    x = _inputs(model)
    spec = symmerge.trace(model, (x,))
    heads = [g for g in spec.groups.values() if not g.members and not g.blocks][0].name
    qk, vo = [g.name for g in spec.groups.values() if g.block_group == heads]
    more_heads = resize(model, spec, {heads: 6}, example_inputs=(x,))
    s2 = symmerge.trace(more_heads, (x,))
    assert s2.groups[heads].size == 6 and s2.groups[qk].size == 6 * 64
    narrow_heads = resize(model, spec, {qk: 3 * 32, vo: 3 * 32}, example_inputs=(x,))
    s3 = symmerge.trace(narrow_heads, (x,))
    assert s3.groups[qk].size == s3.groups[vo].size == 96 and s3.groups[heads].size == 3
    # this ViT's fused qkv reshape needs equal q/k and v/o head dims: refused, naming it
    with pytest.raises(ResizeError, match="blocks.0.attn"):
        resize(model, spec, {qk: 3 * 32}, example_inputs=(x,))
    with pytest.raises(ResizeError, match="split one of its 3 heads"):
        resize(model, spec, {qk: 100})


def test_resize_errors_name_the_problem() -> None:
    (model, *_), _ = _models("resnet20x1-gn", 1)
    spec = symmerge.trace(model, (_inputs(model),))
    with pytest.raises(ResizeError, match="no group 'nope'"):
        resize(model, spec, {"nope": 8})
    with pytest.raises(ResizeError, match="positive integer"):
        resize(model, spec, {"conv1.out": 0})
    with pytest.raises(ResizeError, match="split one of its 4 blocks"):
        resize(model, spec, {"conv1.out": 18})
    assert model.conv1.weight.shape[0] == 16  # the input is never touched


class _HardCoded(nn.Module):
    """Its forward reshapes to a constant width: resizing that width must be refused."""

    input_shape = (8,)

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x)).reshape(-1, 16)
        return self.fc2(h)


def test_a_forward_that_hard_codes_a_width_is_refused() -> None:
    model = _HardCoded()
    spec = symmerge.trace(model, (torch.randn(2, 8),))
    (group,) = spec.groups
    with pytest.raises(ResizeError, match=r"fails in module '<model>'|16"):
        resize(model, spec, {group: 32})
    assert resize(model, spec, {group: 16})(torch.randn(2, 8)).shape == (2, 3)


def test_version_one_checkpoints_load_and_unknown_architectures_are_named(tmp_path) -> None:
    import json

    from safetensors.torch import save_file

    model, config = _zoo("mlp", 0)
    v1 = tmp_path / "v1.safetensors"  # as symmerge wrote them before resized models existed
    doc = {"format": "symmerge.checkpoint", "format_version": 1, "config": config,
           "aliases": {}, "metadata": {"dataset": "mnist"}}  # fmt: skip
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(v1), metadata={"symmerge": json.dumps(doc)})
    loaded, meta = load_checkpoint(v1)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert meta["dataset"] == "mnist" and "resize" not in meta["config"]
    bad = tmp_path / "bad.safetensors"
    save_checkpoint(bad, model, {"arch": "no-such-arch", "kwargs": {}}, {})
    with pytest.raises(CheckpointError, match="no-such-arch"):
        load_checkpoint(bad)


def test_a_timm_checkpoint_without_timm_names_timm(tmp_path, monkeypatch) -> None:
    import builtins

    (model, *_), config = _models("timm:resnet18", 1)
    path = tmp_path / "t.safetensors"
    save_checkpoint(path, model, config, {})
    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm":
            raise ImportError("no timm")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(CheckpointError, match="needs timm"):
        load_checkpoint(path)


def test_a_users_own_module_checkpoint_rebuilds_resized(tmp_path) -> None:
    from symmerge.models.mlp import MLP

    kwargs = {"depth": 2, "width": 16, "input_shape": [1, 28, 28]}
    config = {"arch": "module:symmerge.models.mlp:MLP", "kwargs": kwargs}
    torch.manual_seed(0)
    model = MLP(**kwargs).eval()
    x = torch.randn(3, 1, 28, 28)
    spec = symmerge.trace(model, (x,))
    maps = _duplicate_maps(spec)
    wide = build_model(model, spec, maps, build_state_dict(spec, [model.state_dict()], maps))
    reloaded = _reloaded(tmp_path, wide, config)
    assert reloaded.layers[1].out_features == 32
    with torch.no_grad():
        _close(reloaded(x), model(x))
    path = tmp_path / "missing.safetensors"
    save_checkpoint(path, model, {"arch": "module:no_such_pkg.models:Net", "kwargs": {}}, {})
    with pytest.raises(CheckpointError, match="no_such_pkg.models.Net"):
        load_checkpoint(path)


@pytest.mark.parametrize("model_type", ["bert", "gpt2"])
def test_resize_hugging_face_residual_stream_and_heads(model_type: str) -> None:
    """No table per architecture: BERT's attention reads head counts and sizes from module
    attributes, GPT-2's Conv1D keeps its output width in ``nf`` (equal to an unchanged width
    too, so it is settled by the check)."""
    pytest.importorskip("transformers")
    from symmerge.resolve import resolve_model

    resolved = resolve_model(f"hf:{model_type}")
    model, inputs = resolved.model, resolved.example_inputs
    spec = symmerge.trace(model, inputs)
    residual = max(spec.groups.values(), key=lambda g: len(g.members)).name
    heads = [g.name for g in spec.groups.values() if not g.members and not g.blocks]
    for widths in ({residual: 2 * spec.groups[residual].size}, {h: 8 for h in heads}):
        wide = resize(model, spec, widths, example_inputs=inputs)
        again = symmerge.trace(wide, inputs)
        for g, n in widths.items():
            assert again.groups[g].size == n
        assert again.check(wide, *inputs).ok
