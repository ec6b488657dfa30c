"""Model zoo: names, registry, configs and the architectural facts mergers rely on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from symmerge import models
from symmerge.models import (
    ZOO_NAMES,
    LayerNorm2d,
    build_model,
    create_model,
    format_model_name,
    gn_num_groups,
    list_models,
    parse_model_name,
    register_model,
)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_name_builds_forwards_and_rebuilds(name: str) -> None:
    torch.manual_seed(0)
    model, config = create_model(name)
    shape = model.input_shape
    assert isinstance(shape, tuple) and len(shape) == 3 and all(isinstance(s, int) for s in shape)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()

    # The config survives JSON and rebuilds the same architecture.
    config = json.loads(json.dumps(config))
    assert set(config) == {"arch", "kwargs"}
    rebuilt = build_model(config["arch"], **config["kwargs"])
    assert type(rebuilt) is type(model)
    assert _shapes(rebuilt) == _shapes(model)
    assert rebuilt.input_shape == model.input_shape
    # Loading one into the other works, so the rebuilt model computes the same function.
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        x = torch.randn(2, *shape)
        torch.testing.assert_close(rebuilt(x), model(x))


def test_list_models_has_every_arch() -> None:
    assert {"mlp", "vgg11", "vgg16", "resnet18", "resnet20"} <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mlp", ("mlp", {})),
        ("vgg11", ("vgg11", {})),
        ("vgg16", ("vgg16", {})),
        ("resnet18", ("resnet18", {})),
        ("resnet20", ("resnet20", {})),
        ("resnet20x1", ("resnet20", {"width": 1})),
        ("resnet20x16", ("resnet20", {"width": 16})),
        ("resnet20x4-ln", ("resnet20", {"width": 4, "norm": "ln"})),
        ("resnet20-gn", ("resnet20", {"norm": "gn"})),
        ("resnet20x4-bn", ("resnet20", {"width": 4, "norm": "bn"})),
        ("ResNet20x4-LN", ("resnet20", {"width": 4, "norm": "ln"})),
        ("vgg16x2", ("vgg16", {"width": 2})),
        ("vgg11x0.5", ("vgg11", {"width": 0.5})),
        ("resnet20x0.25-ln", ("resnet20", {"width": 0.25, "norm": "ln"})),
        ("vgg11x2.0", ("vgg11", {"width": 2})),
    ],
)
def test_parse_model_name(name: str, expected: tuple[str, dict]) -> None:
    assert parse_model_name(name) == expected


def test_parse_format_round_trip() -> None:
    for name in ZOO_NAMES:
        arch, kwargs = parse_model_name(name)
        assert format_model_name(arch, kwargs) == name
        assert parse_model_name(format_model_name(arch, kwargs)) == (arch, kwargs)
    # Defaults are dropped: the canonical spelling of resnet20x1-bn is resnet20.
    assert format_model_name(*parse_model_name("resnet20x1-bn")) == "resnet20"


@pytest.mark.parametrize(
    "bad",
    ["", "resnet", "resnet21", "resnet20x0", "resnet20x", "resnet20-xx", "resnet20-ln-x4",
     "resnet20x4ln", "mlpx2", "mlp-ln", "vgg19", "resnet20x-1", " vgg11 x2"],
)  # fmt: skip
def test_bad_names_rejected_with_grammar(bad: str) -> None:
    grammar = r"valid: mlp \| vit-tiny \| \(vgg11\|vgg16\|resnet18\|resnet20\)"
    with pytest.raises(ValueError, match=grammar):
        parse_model_name(bad)
    with pytest.raises(ValueError):
        create_model(bad)


def test_fractional_widths_build_and_round_trip() -> None:
    model, config = create_model("vgg11x0.5")
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [32, 64, 128, 128, 256, 256, 256, 256]
    assert config["kwargs"]["width"] == 0.5
    assert format_model_name(config["arch"], config["kwargs"]) == "vgg11x0.5"
    assert create_model("resnet20x0.25")[0].conv1.out_channels == 4
    with pytest.raises(ValueError, match="fractional or zero channel counts"):
        create_model("resnet20x0.3")


def test_create_model_overrides_and_resolved_kwargs() -> None:
    model, config = create_model("resnet20x4-ln", width=2, num_classes=7)
    assert config == {
        "arch": "resnet20",
        "kwargs": {
            "num_classes": 7,
            "in_channels": 3,
            "width": 2,
            "norm": "ln",
            "input_shape": [3, 32, 32],
        },
    }
    assert model.fc.out_features == 7
    assert model.conv1.out_channels == 32

    model, config = create_model("mlp", depth=2, width=64, input_shape=(3, 8, 8))
    assert config["kwargs"]["input_shape"] == [3, 8, 8]
    assert config["kwargs"]["in_channels"] == 3
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_build_model_unknown_arch_lists_registered() -> None:
    with pytest.raises(ValueError, match="registered: .*resnet20"):
        build_model("resnet20x4")
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("nope")


def test_register_model_duplicate_raises_and_new_name_works() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet20")
    with pytest.raises(ValueError, match="already registered"):

        @register_model("mlp")
        def _again(**kwargs: object) -> nn.Module:  # pragma: no cover - never called
            raise AssertionError

    name = "test-tiny-net"
    try:

        @register_model(name)
        def tiny(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
            net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 4, num_classes))
            net.input_shape = (in_channels, 2, 2)  # type: ignore[assignment]
            return net

        assert name in list_models()
        model, config = create_model(name, num_classes=3)
        assert config == {"arch": name, "kwargs": {"num_classes": 3, "in_channels": 1}}
        assert model(torch.randn(2, 1, 2, 2)).shape == (2, 3)
        with pytest.raises(ValueError, match="already registered"):
            register_model(name)(tiny)
    finally:
        models._REGISTRY.pop(name, None)


def test_builder_without_input_shape_is_rejected() -> None:
    name = "test-no-shape"
    try:
        register_model(name)(lambda: nn.Linear(2, 2))
        with pytest.raises(TypeError, match="input_shape"):
            build_model(name)
    finally:
        models._REGISTRY.pop(name, None)


def test_mlp_default_is_784_512_512_512_10() -> None:
    model = build_model("mlp")
    assert isinstance(model.layers[0], nn.Flatten)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    dims = [(m.in_features, m.out_features) for m in linears]
    assert dims == [(784, 512), (512, 512), (512, 512), (512, 10)]
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 3
    assert model.input_shape == (1, 28, 28)
    assert build_model("mlp", in_channels=3).input_shape == (3, 28, 28)


@pytest.mark.parametrize(("arch", "n_convs"), [("vgg11", 8), ("vgg16", 13)])
def test_vgg_structure(arch: str, n_convs: int) -> None:
    model = build_model(arch, width=2, num_classes=5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == n_convs
    assert convs[0].out_channels == 128 and convs[-1].out_channels == 1024
    assert all(m.bias is None for m in convs)  # a norm follows every conv
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_convs
    assert isinstance(model.flatten, nn.Flatten)
    # 32x32 -> five 2x2 pools -> 1x1, so the flatten yields exactly C features.
    assert model.classifier.in_features == 1024
    feats = model.features(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 1024, 1, 1)
    # Larger inputs keep a real (h*w > 1) flatten.
    big = build_model(arch, input_shape=(3, 64, 64))
    assert big.classifier.in_features == 512 * 4
    assert big(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    with pytest.raises(ValueError, match="at least 32x32"):
        build_model(arch, input_shape=(1, 28, 28))
    plain = build_model(arch, norm="none")
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("width", [1, 4])
def test_resnet20_structure(width: int) -> None:
    model = build_model("resnet20", width=width)
    assert model.conv1.out_channels == 16 * width
    for i, c in zip((1, 2, 3), (16, 32, 64), strict=True):
        stage = getattr(model, f"layer{i}")
        assert len(stage) == 3
        assert all(block.conv2.out_channels == c * width for block in stage)
    assert not hasattr(model, "layer4")
    projections = [
        block for i in (1, 2, 3) for block in getattr(model, f"layer{i}")
        if not isinstance(block.shortcut, nn.Identity)
    ]  # fmt: skip
    # Option B: 1x1 conv + norm only where the shape changes (entry of stages 2 and 3).
    assert len(projections) == 2
    for block in projections:
        conv, norm = block.shortcut
        assert conv.kernel_size == (1, 1) and conv.stride == (2, 2)
        assert isinstance(norm, nn.BatchNorm2d)
    assert model.fc.in_features == 64 * width
    if width == 1:
        # 0.27M parameters, as in He et al. (option B adds the two projections).
        assert 260_000 < sum(p.numel() for p in model.parameters()) < 290_000


def test_resnet_norm_variants() -> None:
    ln = build_model("resnet20", width=4, norm="ln")
    assert not any(isinstance(m, nn.BatchNorm2d | nn.GroupNorm) for m in ln.modules())
    lns = [m for m in ln.modules() if isinstance(m, LayerNorm2d)]
    assert len(lns) == 1 + 9 * 2 + 2
    assert all(m.weight.shape == m.normalized_shape for m in lns)

    gn = build_model("resnet20", width=4, norm="gn")
    gns = [m for m in gn.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 21
    for m in gns:
        assert m.num_groups == gn_num_groups(m.num_channels)
        assert m.num_channels % m.num_groups == 0
    assert gn_num_groups(16) == 4 and gn_num_groups(64) == 16 and gn_num_groups(256) == 32
    assert gn_num_groups(48) == 12 and gn_num_groups(2) == 1

    with pytest.raises(ValueError, match="unknown norm"):
        build_model("resnet20", norm="in")


def test_layernorm2d_normalises_over_channels_per_position() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 5) * 3 + 1
    ln = LayerNorm2d(6)
    with torch.no_grad():
        ln.weight.copy_(torch.linspace(0.5, 2.0, 6))
        ln.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + ln.eps)
    expected = expected * ln.weight.view(1, -1, 1, 1) + ln.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(ln(x), expected)
    # Not GroupNorm(1, C), which would pool over H and W too.
    assert not torch.allclose(nn.GroupNorm(1, 6)(x), LayerNorm2d(6)(x), atol=1e-3)
    # Permuting channels commutes with the layer when its affine is permuted too.
    perm = torch.randperm(6)
    ln_p = LayerNorm2d(6)
    with torch.no_grad():
        ln_p.weight.copy_(ln.weight[perm])
        ln_p.bias.copy_(ln.bias[perm])
    torch.testing.assert_close(ln_p(x[:, perm]), ln(x)[:, perm])


def test_resnet18_layouts() -> None:
    model = build_model("resnet18", num_classes=100)
    assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, nn.Identity)
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3, 4)] == [2, 2, 2, 2]
    assert model.fc.in_features == 512 and model.fc.out_features == 100
    assert 11_000_000 < sum(p.numel() for p in model.parameters()) < 11_400_000

    imagenet = build_model("resnet18", stem="imagenet", width=1)
    assert imagenet.conv1.kernel_size == (7, 7) and isinstance(imagenet.maxpool, nn.MaxPool2d)
    assert imagenet.input_shape == (3, 224, 224)
    with torch.no_grad():
        assert imagenet.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)

    narrow = build_model("resnet18", width=2)
    assert narrow.fc.in_features == 1024


def test_in_channels_and_input_shape() -> None:
    model = build_model("resnet20", in_channels=1)
    assert model.input_shape == (1, 32, 32)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)  # global pooling: any size
    assert build_model("vgg11", in_channels=1).features[0].in_channels == 1
    with pytest.raises(ValueError, match="disagrees"):
        build_model("resnet20", in_channels=1, input_shape=(3, 32, 32))
    with pytest.raises(ValueError, match="width"):
        build_model("resnet20", width=0)
    with pytest.raises(TypeError):
        build_model("resnet20", depth=3)


def test_models_are_fx_traceable() -> None:
    """Tracers see through LayerNorm2d and keep the flatten as a real op."""
    traced = torch.fx.symbolic_trace(build_model("resnet20", norm="ln"))
    targets = {str(n.target) for n in traced.graph.nodes}
    assert "permute" in targets
    vgg = torch.fx.symbolic_trace(build_model("vgg11"))
    assert any(n.op == "call_module" and n.target == "flatten" for n in vgg.graph.nodes)


# ---- MLP widths and depths in the name: mlp[-w<W>][-d<D>] ------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs", "canonical"),
    [("mlp-w256", {"width": 256}, "mlp-w256"), ("mlp-d4", {"depth": 4}, "mlp-d4"),
     ("mlp-w256-d4", {"width": 256, "depth": 4}, "mlp-w256-d4"),
     ("MLP-W1-D1", {"width": 1, "depth": 1}, "mlp-w1-d1"),
     ("mlp-w512-d3", {"width": 512, "depth": 3}, "mlp"),  # the defaults are omitted
     ("mlp-w512-d2", {"width": 512, "depth": 2}, "mlp-d2")],
)  # fmt: skip
def test_mlp_width_depth_names_round_trip(name: str, kwargs: dict, canonical: str) -> None:
    assert parse_model_name(name) == ("mlp", kwargs)
    assert format_model_name("mlp", kwargs) == canonical
    assert parse_model_name(canonical)[0] == "mlp"
    assert format_model_name(*parse_model_name(canonical)) == canonical
    model, config = create_model(name)
    resolved = {"width": 512, "depth": 3, **kwargs}
    assert {k: config["kwargs"][k] for k in resolved} == resolved
    # the resolved config (every kwarg, defaults included) formats back to the canonical name
    assert format_model_name(config["arch"], config["kwargs"]) == canonical
    hidden = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)][:-1]
    assert hidden == [resolved["width"]] * resolved["depth"]


def test_mlp_name_defaults_match_the_builder() -> None:
    import inspect

    params = inspect.signature(models.mlp).parameters
    assert models._MLP_DEFAULTS == {k: params[k].default for k in ("width", "depth")}


@pytest.mark.parametrize(
    "bad",
    ["mlp-w0", "mlp-wx", "mlp-d0", "mlp-w", "mlp-d", "mlp-w-1", "mlp-d4-w256", "mlp-w2.5",
     "mlp-w256-d4-ln", "mlp-x2", "mlp-w256d4"],
)  # fmt: skip
def test_bad_mlp_names_list_the_grammar(bad: str) -> None:
    with pytest.raises(ValueError, match=r"valid: mlp \|.*mlp-w256-d4"):
        parse_model_name(bad)
    with pytest.raises(ValueError, match="valid:"):
        create_model(bad)


@pytest.mark.skipif(not os.environ.get("SYMMERGE_DATA"), reason="needs SYMMERGE_DATA")
def test_cli_trains_an_mlp_of_a_named_width_and_depth(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from symmerge.cli import main
    from symmerge.io import load_checkpoint, read_checkpoint_metadata

    ckpt = tmp_path / "m.safetensors"
    args = ["train", "mlp-w32-d4", "-d", "mnist", "--epochs", "1", "--limit-train", "256",
            "--limit-test", "256", "--batch-size", "64", "--no-progress",
            "-o", str(ckpt)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    meta = read_checkpoint_metadata(ckpt)
    assert meta["model_name"] == "mlp-w32-d4"
    assert meta["config"]["arch"] == "mlp"
    assert (meta["config"]["kwargs"]["width"], meta["config"]["kwargs"]["depth"]) == (32, 4)
    model, _ = load_checkpoint(ckpt)
    dims = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert dims == [(784, 32), (32, 32), (32, 32), (32, 32), (32, 10)]
    bad = CliRunner().invoke(main, ["train", "mlp-w0", "-d", "mnist", "-o", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "mlp-w256-d4" in bad.output
