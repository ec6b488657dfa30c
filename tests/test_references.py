"""Model references (``timm:NAME=FILE``, ``torchvision:``, ``module:``, ``hf:DIR``): each
loads the model a test saved, merges with itself from the CLI and reloads; pickled modules
load only when trusted; state dicts that do not fit say which keys."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from symmerge.cli import main
from symmerge.io import CheckpointError, load_checkpoint
from symmerge.resolve import parse_reference, resolve_model

needs_data = pytest.mark.skipif(
    not os.environ.get("SYMMERGE_DATA"), reason="needs SYMMERGE_DATA (CI sets it)"
)

#: The user's own architecture, as a module they would write (imported by path).
USER_MODULE = '''
import torch
from torch import nn


class Net(nn.Module):
    """An MNIST-shaped MLP, so `symmerge eval -d mnist` can run it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 16)
        self.fc2 = nn.Linear(16, 10)
        self.input_shape = (1, 28, 28)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def make() -> Net:
    return Net()
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    """``user_arch`` importable from tmp_path (fresh for every test)."""
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "user_arch.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "user_arch", raising=False)
    importlib.invalidate_caches()
    yield importlib.import_module("user_arch")
    sys.modules.pop("user_arch", None)


def _timm(tmp_path: Path, suffix: str = "safetensors") -> tuple[str, nn.Module]:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=5)  # not 1000
    _perturb_batchnorm(model)
    file = tmp_path / f"timm.{suffix}"
    _save_state(model, file)
    return f"timm:test_resnet={file}", model


def _torchvision(tmp_path: Path) -> tuple[str, nn.Module]:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", weights=None, num_classes=4)
    _perturb_batchnorm(model)
    file = tmp_path / "tv.pth"
    _save_state(model, file)
    return f"torchvision:resnet18={file}", model


def _module(tmp_path: Path, user_module: object) -> tuple[str, nn.Module]:
    torch.manual_seed(0)
    model = user_module.make()  # type: ignore[attr-defined]
    file = tmp_path / "user.safetensors"
    _save_state(model, file)
    return f"module:user_arch:make={file}", model


def _hf(tmp_path: Path, sharded: bool = False) -> tuple[str, nn.Module]:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    folder = tmp_path / ("bert-sharded" if sharded else "bert")
    model.save_pretrained(folder, **({"max_shard_size": "30KB"} if sharded else {}))
    if sharded:
        assert (folder / "model.safetensors.index.json").exists()
    return f"hf:{folder}", model


def _perturb_batchnorm(model: nn.Module) -> None:
    """Non-trivial running statistics, so a reload that drops buffers would show."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)


def _save_state(model: nn.Module, file: Path) -> None:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if file.suffix == ".safetensors":
        save_file(state, str(file))
    else:
        torch.save(state, file)


def _outputs(model: nn.Module, inputs: tuple, hf: bool = False) -> torch.Tensor:
    with torch.no_grad():
        if hf:
            return model.eval()(input_ids=inputs[0]).logits
        out = model.eval()(*inputs)
        return out[0] if isinstance(out, tuple) else out


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a bug: bad input must be a clean error
    return result.exit_code, result.output


KINDS: dict[str, Callable[..., tuple[str, nn.Module]]] = {
    "timm-safetensors": lambda tmp, um: _timm(tmp),
    "timm-pth": lambda tmp, um: _timm(tmp, "pth"),
    "torchvision": lambda tmp, um: _torchvision(tmp),
    "module": _module,
    "hf": lambda tmp, um: _hf(tmp),
    "hf-sharded": lambda tmp, um: _hf(tmp, sharded=True),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_reference_kind_loads_the_saved_model(
    tmp_path: Path, user_module: object, kind: str
) -> None:
    ref, original = KINDS[kind](tmp_path, user_module)
    shape = (3, 32, 32) if kind == "torchvision" else None
    resolved = resolve_model(ref, input_shape=shape, seed=1)
    hf = kind.startswith("hf")
    expected = _outputs(original, resolved.example_inputs, hf=hf)
    assert torch.equal(_outputs(resolved.model, resolved.example_inputs), expected)
    assert not resolved.model.training
    config = resolved.metadata["config"]
    if kind.startswith("timm"):
        assert config == {"arch": "timm:test_resnet", "kwargs": {"num_classes": 5}}
        assert resolved.example_inputs[0].shape == (2, 3, 160, 160)  # timm's input_size
    elif kind == "torchvision":
        assert config["kwargs"] == {"input_shape": [3, 32, 32], "num_classes": 4}
    elif kind == "module":
        assert config == {"arch": "module:user_arch:make", "kwargs": {}}
    else:
        assert config["arch"] == "hf:BertForSequenceClassification"
        ids = resolved.example_inputs[0]
        assert ids.dtype == torch.long and int(ids.max()) < 100  # from the config's vocab


@pytest.mark.parametrize("kind", ["timm-safetensors", "torchvision", "module"])
def test_merge_a_reference_with_itself_from_the_cli(
    tmp_path: Path, user_module: object, kind: str
) -> None:
    ref, original = KINDS[kind](tmp_path, user_module)
    out = tmp_path / "merged.safetensors"
    extra = ["--input-shape", "3,32,32"] if kind == "torchvision" else []
    code, text = _run("merge", ref, ref, "-m", "weight", "-o", out, *extra)
    assert code == 0, text
    assert "not evaluated" in text  # these models record no dataset
    merged, meta = load_checkpoint(out)
    resolved = resolve_model(ref, input_shape=(3, 32, 32) if kind == "torchvision" else None)
    assert meta["inputs"] == [ref, ref] and meta["config"] == resolved.metadata["config"]
    inputs = resolved.example_inputs
    expected = _outputs(original, inputs)
    torch.testing.assert_close(_outputs(merged, inputs), expected, rtol=1e-5, atol=1e-5)


def test_merge_a_hugging_face_directory_with_itself_from_the_cli(tmp_path: Path) -> None:
    """The merge is a save_pretrained directory (tests/test_export.py covers the rest)."""
    ref, original = _hf(tmp_path)
    out = tmp_path / "merged"
    code, text = _run("merge", ref, ref, "-m", "weight", "-o", out)
    assert code == 0, text
    merged = type(original).from_pretrained(out)
    inputs = resolve_model(ref).example_inputs
    expected = _outputs(original, inputs, hf=True)
    torch.testing.assert_close(_outputs(merged, inputs, hf=True), expected, rtol=1e-5, atol=1e-5)


@needs_data
def test_user_module_merges_evaluates_and_interpolates(tmp_path: Path, user_module: object) -> None:
    ref, _ = _module(tmp_path, user_module)
    out = tmp_path / "merged.safetensors"
    code, text = _run("merge", ref, ref, "-o", out, "--eval-dataset", "mnist",
                      "--eval-limit", "50")  # fmt: skip
    assert code == 0, text
    assert "merged (weight)" in text
    for model in (str(out), ref):  # the saved merge, and a reference, both evaluate
        code, text = _run("eval", model, "-d", "mnist", "--limit", "50")
        assert code == 0, text
        assert "mnist" in text
    code, text = _run("interpolate", ref, ref, "--steps", "2", "--eval-dataset", "mnist",
                      "--eval-limit", "50")  # fmt: skip
    assert code == 0, text
    assert "loss barrier" in text


def test_a_pickled_module_loads_only_when_trusted(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    pickled = tmp_path / "own.pt"
    torch.save(model, pickled)
    with pytest.raises(CheckpointError, match="runs code from the file"):
        load_checkpoint(pickled)
    loaded, meta = load_checkpoint(pickled, trust_pickle=True)
    x = torch.randn(3, 5)
    assert meta == {} and torch.equal(loaded(x), model(x))

    out = tmp_path / "merged.safetensors"
    code, text = _run("merge", pickled, pickled, "-o", out)
    assert code != 0 and "--trust-pickle" in text and "runs code" in text
    assert not out.exists()
    code, text = _run("eval", pickled, "-d", "mnist")
    assert code != 0 and "--trust-pickle" in text
    code, text = _run("check-symmetry", pickled, "--input-shape", "5")
    assert code != 0 and "--trust-pickle" in text
    code, text = _run("check-symmetry", pickled, "--input-shape", "5", "--trust-pickle")
    assert code == 0, text
    assert "function preserved" in text
    # trusted, it loads, but a merge of it could not be saved: refused before merging
    code, text = _run("merge", pickled, pickled, "-o", out, "--trust-pickle",
                      "--input-shape", "5")  # fmt: skip
    assert code != 0 and "records no architecture" in text and not out.exists()


def test_a_state_dict_that_does_not_fit_names_the_keys(tmp_path: Path, user_module: object) -> None:
    model = user_module.make()  # type: ignore[attr-defined]
    state = model.state_dict()
    renamed = {k.replace("fc1.", "hidden."): v for k, v in state.items()}
    file = tmp_path / "renamed.pth"
    torch.save(renamed, file)
    ref = f"module:user_arch:make={file}"
    with pytest.raises(CheckpointError) as caught:
        resolve_model(ref)
    message = str(caught.value)
    assert "missing keys: fc1.weight, fc1.bias" in message
    assert "unexpected keys: hidden.weight, hidden.bias" in message

    out = tmp_path / "merged.safetensors"
    code, text = _run("merge", ref, ref, "-o", out)
    assert code != 0 and "missing keys: fc1.weight" in text and not out.exists()

    wrong_shape = {**state, "fc2.weight": torch.zeros(10, 8)}
    torch.save(wrong_shape, file)
    with pytest.raises(CheckpointError, match=r"shape mismatches: fc2.weight \(file \(10, 8\)"):
        resolve_model(ref)


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_a_bare_state_dict_says_to_name_its_architecture(tmp_path: Path, suffix: str) -> None:
    file = tmp_path / f"sd.{suffix}"
    _save_state(nn.Linear(3, 2), file)
    with pytest.raises(CheckpointError, match="module:package.module:factory=FILE"):
        resolve_model(str(file))
    out = tmp_path / "merged.safetensors"
    code, text = _run("merge", file, file, "-o", out)
    assert code != 0 and "timm:NAME=FILE" in text and not out.exists()


def test_training_checkpoints_nest_the_state_dict(tmp_path: Path, user_module: object) -> None:
    model = user_module.make()  # type: ignore[attr-defined]
    file = tmp_path / "run.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 3, "lr": 0.1}, file)
    resolved = resolve_model(f"module:user_arch:make={file}")
    x = resolved.example_inputs[0]
    assert torch.equal(_outputs(resolved.model, (x,)), _outputs(model, (x,)))


def test_malformed_references_and_non_models(tmp_path: Path) -> None:
    for ref in ("timm:", "timm:resnet18=", "module:just_a_module=x.pth", "module::f=x.pth"):
        with pytest.raises(ValueError, match="must read"):
            parse_reference(ref)
    assert parse_reference("module:pkg.mod:make=a=b.pth").file == Path("a=b.pth")
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(ValueError, match="not a Hugging Face model"):
        resolve_model(f"hf:{empty}")
    code, text = _run("merge", empty, empty, "-o", tmp_path / "m.safetensors")
    assert code == 2 and f"hf:{empty}" in text  # a bare directory: says to write hf:DIR
    code, text = _run("merge", f"hf:{empty}", f"hf:{empty}", "-o", tmp_path / "m.safetensors")
    assert code == 2 and "not a Hugging Face model" in text
    code, text = _run("eval", tmp_path / "missing.pth")
    assert code == 2 and "does not exist" in text


#: A user's module that checks its state-dict format version on load, as torchvision's MNASNet
#: does: a state dict that records no version (safetensors, or one rebuilt tensor by tensor) is
#: refused unless the loader supplies the model's own.
VERSIONED_MODULE = """
import torch
from torch import nn


class Block(nn.Module):
    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 16)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") != 2:
            raise ValueError(f"version should be 2, not {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(16, 10)
        self.input_shape = (1, 28, 28)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.block.fc(x.flatten(1))))
"""


@needs_data
def test_a_module_that_checks_its_version_loads_permutes_and_merges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "versioned_arch.py").write_text(VERSIONED_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "versioned_arch", raising=False)
    importlib.invalidate_caches()
    net = importlib.import_module("versioned_arch").Net()
    with pytest.raises(ValueError, match="version should be 2"):  # the check is live
        net.load_state_dict(dict(net.state_dict()))
    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        files.append(tmp_path / f"v{seed}.safetensors")
        _save_state(importlib.import_module("versioned_arch").Net(), files[-1])
    refs = [f"module:versioned_arch:Net={f}" for f in files]
    code, text = _run("check-symmetry", refs[0])  # a permuted copy, checked
    assert code == 0 and "function preserved" in text, text
    out = tmp_path / "merged.safetensors"
    code, text = _run("merge", *refs, "-m", "weight", "-o", out)
    assert code == 0, text
    merged, _ = load_checkpoint(out)
    code, text = _run("interpolate", *refs, "--steps", "2", "--eval-dataset", "mnist",
                      "--eval-limit", "50")  # fmt: skip
    assert code == 0 and "loss barrier" in text, text
    # the merge reloads from its own file, and it differs from both inputs
    x = torch.randn(3, 1, 28, 28)
    first = resolve_model(refs[0]).model
    assert not torch.allclose(merged(x), first(x))


def test_a_hugging_face_image_model_merges_on_its_own_images(tmp_path: Path) -> None:
    """An ``hf:DIR`` image classifier is called on pixel values: a permuted copy is matched
    back (weight and activation matching, the latter on an image folder preprocessed by the
    directory's image processor), and the merge reloads with ``from_pretrained``."""
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    from symmerge.spec import trace

    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=3,
    )  # fmt: skip
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    torch.manual_seed(0)
    original = transformers.ViTForImageClassification(config).eval()
    a, b = tmp_path / "vit-a", tmp_path / "vit-b"
    original.save_pretrained(a)
    resolved = resolve_model(f"hf:{a}")
    assert resolved.example_inputs[0].shape == (2, 3, 32, 32)
    spec = trace(resolved.model, resolved.example_inputs)
    permuted = spec.permuted(resolved.model, spec.random_permutations(1))
    permuted.model.save_pretrained(b)
    for folder in (a, b):
        processor.save_pretrained(folder)
    for label, colour in (("cat", (200, 120, 40)), ("dog", (40, 90, 200))):
        (tmp_path / "photos" / label).mkdir(parents=True)
        for i in range(4):
            shade = tuple(c + 9 * i for c in colour)
            Image.new("RGB", (40, 48), shade).save(tmp_path / "photos" / label / f"{i}.png")
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = original(pixel_values=pixels).logits
        same = permuted.model(pixel_values=pixels).logits  # a permutation keeps the function
    torch.testing.assert_close(same, expected, rtol=1e-4, atol=1e-4)
    theirs, ours = original.state_dict(), permuted.model.state_dict()
    assert any(not torch.equal(theirs[k], ours[k]) for k in theirs)  # its weights differ
    photos = f"imagefolder:{tmp_path / 'photos'}"
    for method, extra in (("weight", []), ("activation", ["--data", photos])):
        out = tmp_path / f"merged-{method}"
        code, text = _run("merge", f"hf:{a}", f"hf:{b}", "-m", method, *extra, "-o", out)
        assert code == 0, text
        assert (out / "preprocessor_config.json").is_file()
        merged = transformers.ViTForImageClassification.from_pretrained(out).eval()
        with torch.no_grad():
            got = merged(pixel_values=pixels).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # eval on the same folder: the accuracy of the merge's argmax on the processor's pixels
    from symmerge.sources import data_source_batches

    ref = f"hf:{tmp_path / 'merged-weight'}"
    wrapped = resolve_model(ref).model
    ((x, y),) = data_source_batches(photos, model=wrapped, reference=ref)
    with torch.no_grad():
        accuracy = (wrapped(x)[0].argmax(1) == y).double().mean().item()
    code, text = _run("eval", ref, "--data", photos)
    assert code == 0, text
    assert f"{accuracy:.2%}" in text and " 8 " in text, text
    code, text = _run("eval", ref, "--data", photos, "--dataset", "mnist")
    assert code != 0 and "--data takes no --dataset" in text


def test_a_torchvision_segmentation_model_merges_offline_and_reloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its builder defaults to a pretrained backbone (a download, or a failure offline) and
    its classifier is a conv: neither may stop a merge of the user's own weights."""
    torchvision = pytest.importorskip("torchvision")
    from safetensors.torch import load_file

    def offline(*args: object, **kwargs: object) -> None:
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    build = torchvision.models.segmentation.lraspp_mobilenet_v3_large
    torch.manual_seed(0)
    model = build(weights=None, weights_backbone=None, num_classes=3).eval()
    file = tmp_path / "seg.pth"
    _save_state(model, file)
    ref = f"torchvision:lraspp_mobilenet_v3_large={file}"
    out = tmp_path / "merged.safetensors"
    code, text = _run("merge", ref, ref, "-m", "weight", "--input-shape", "3,32,32", "-o", out)
    assert code == 0, text
    reloaded = build(weights=None, weights_backbone=None, num_classes=3).eval()
    reloaded.load_state_dict(load_file(str(out)))  # what a user does with the merge
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x)["out"], model(x)["out"], rtol=1e-5, atol=1e-5)


def test_a_checkpoint_named_like_a_pickle_is_refused(tmp_path: Path) -> None:
    ref, _ = _torchvision(tmp_path)
    out = tmp_path / "merged.pt"
    code, text = _run("merge", ref, ref, "-o", out, "--input-shape", "3,32,32")
    assert code == 2 and "merged.safetensors" in text and "torch.load" in text
    assert not out.exists()
