"""Public stand-in data for `--data` (PLeaS-free): class subsets ``DATASET[CLASSES]``, images
converted for another dataset's models ``SOURCE@TARGET``, and Gaussian ``noise:DATASET``;
their exact pixel maths, their seeds and their errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from symmerge.cli import DATA_HELP, main
from symmerge.condense import CondensedSet, save_condensed
from symmerge.data import dataset_info
from symmerge.io import save_checkpoint
from symmerge.models import create_model
from symmerge.sources import LUMA_WEIGHTS, DataSourceError, convert_images, load_data_sources

needs_data = pytest.mark.skipif(
    not os.environ.get("SYMMERGE_DATA"), reason="needs SYMMERGE_DATA (CI sets it)"
)

VIEW = (1, -1, 1, 1)


def _stats(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    info = dataset_info(name)
    return torch.tensor(info["mean"]).view(VIEW), torch.tensor(info["std"]).view(VIEW)


def _pixels(x: torch.Tensor, name: str) -> torch.Tensor:
    """Normalised images of ``name`` back in [0, 1] pixels."""
    mean, std = _stats(name)
    return x * std + mean


def _cset(path: Path, dataset: str, ipc: int = 2) -> Path:
    """A condensed set of real-looking [0, 1] pixels stored in ``dataset``'s space."""
    info = dataset_info(dataset)
    labels = torch.arange(info["num_classes"]).repeat_interleave(ipc)
    pixels = torch.rand(
        len(labels), *info["input_shape"], generator=torch.Generator().manual_seed(0)
    )
    mean, std = _stats(dataset)
    meta = {"dataset": info["name"], "mean": list(info["mean"]), "std": list(info["std"])}
    save_condensed(CondensedSet((pixels - mean) / std, labels, meta), path)
    return path


def _mlp(num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("mlp", depth=2, width=16, num_classes=num_classes)[0]


# --- SOURCE@TARGET ---------------------------------------------------------------------------


def test_conversion_keeps_constant_images_and_renormalises_exactly() -> None:
    # a uniform grey CIFAR image stays that grey as an MNIST image: luma weights sum to 1 and
    # the antialiased resize averages pixels
    mean, std = _stats("cifar10")
    grey = (torch.full((2, 3, 32, 32), 0.25) - mean) / std
    out = convert_images(grey, "cifar10", "mnist")
    assert out.shape == (2, 1, 28, 28)
    assert torch.allclose(_pixels(out, "mnist"), torch.full_like(out, 0.25), atol=1e-6)
    # same shape: only the mean/std change; the same dataset (any spelling) is a no-op
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    want = (_pixels(x, "fashion-mnist") - 0.1307) / 0.3081
    assert torch.allclose(convert_images(x, "fmnist", "mnist"), want, atol=1e-6)
    assert convert_images(x, "mnist", "MNIST") is x
    assert sum(LUMA_WEIGHTS) == pytest.approx(1.0)


@needs_data
def test_cifar10_to_mnist_is_greyscale_resized_and_mnist_normalised() -> None:
    n = 2000
    x, y = load_data_sources("cifar10@mnist", samples=n, seed=0)
    raw, raw_y = load_data_sources("cifar10", samples=n, seed=0)  # same draw, same shuffle
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(y, raw_y)
    pixels = _pixels(x, "mnist")
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5  # valid images, exactly
    assert pixels.std() > 0.1  # not flattened
    # the reference: ITU-R 601 luma of CIFAR's [0, 1] pixels, antialiased bilinear resize
    luma = (_pixels(raw, "cifar10") * torch.tensor(LUMA_WEIGHTS).view(VIEW)).sum(1, keepdim=True)
    resized = F.interpolate(luma, size=(28, 28), mode="bilinear", antialias=True)
    assert torch.allclose(pixels, resized, atol=1e-5)
    assert pixels.mean().item() == pytest.approx(luma.mean().item(), abs=2e-3)  # area kept


@needs_data
def test_mnist_to_cifar10_copies_the_grey_channel() -> None:
    x, _ = load_data_sources("mnist@cifar10", samples=200, seed=0)
    assert x.shape == (200, 3, 32, 32)
    pixels = _pixels(x, "cifar10")
    assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-5)
    assert torch.allclose(pixels[:, 0], pixels[:, 2], atol=1e-5)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


# --- DATASET[CLASSES] --------------------------------------------------------------------------


@needs_data
def test_class_subsets_keep_their_labels() -> None:
    x, y = load_data_sources("cifar10[8-9]", samples=500, seed=0)
    assert x.shape == (500, 3, 32, 32) and sorted(torch.unique(y).tolist()) == [8, 9]
    # commas inside [...] list classes, outside they separate sources; combined with @TARGET
    x, y = load_data_sources("cifar10[0,2,5-7]@mnist, fashion-mnist[3]", samples=300, seed=0)
    assert x.shape == (600, 1, 28, 28)
    assert sorted(torch.unique(y).tolist()) == [0, 2, 3, 5, 6, 7]
    assert int((y == 3).sum()) == 300  # fashion-mnist's 300 images, all class 3
    _, y = load_data_sources("coreset:random:2:mnist[4-5]", seed=0)
    assert sorted(y.tolist()) == [4, 4, 5, 5]


def test_class_subset_and_conversion_of_a_condensed_set(tmp_path: Path) -> None:
    path = _cset(tmp_path / "c.st", "cifar10", ipc=3)
    x, y = load_data_sources(f"condensed:{path}[0-1]@mnist", seed=0)
    assert x.shape == (6, 1, 28, 28) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    pixels = _pixels(x, "mnist")
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    x, y = load_data_sources(f"condensed:{path}[all]", seed=0)  # 'all' as in --classes
    assert x.shape == (30, 3, 32, 32) and len(torch.unique(y)) == 10


# --- noise -------------------------------------------------------------------------------------


def test_noise_is_seeded_standard_normal_with_valid_labels() -> None:
    x, y = load_data_sources("noise:mnist", samples=4000, seed=1)
    again, y_again = load_data_sources("noise:mnist", samples=4000, seed=1)
    other, _ = load_data_sources("noise:mnist", samples=4000, seed=2)
    assert torch.equal(x, again) and torch.equal(y, y_again) and not torch.equal(x, other)
    assert x.shape == (4000, 1, 28, 28) and x.dtype == torch.float32
    assert abs(x.mean().item()) < 0.01 and x.std().item() == pytest.approx(1.0, abs=0.01)
    assert y.dtype == torch.int64 and sorted(torch.unique(y).tolist()) == list(range(10))
    # bare `noise`: the models' datasets; one draw per input shape (N(0, 1) is the same there)
    bare, _ = load_data_sources("noise", samples=4000, seed=1, datasets=[None, "mnist", "fmnist"])
    assert torch.equal(bare, x)
    _, y = load_data_sources("noise:cifar10[3,7]", samples=100, seed=0)
    assert sorted(torch.unique(y).tolist()) == [3, 7]


def test_noise_and_converted_noise_fit_the_models() -> None:
    mlp = _mlp()
    x, y = load_data_sources("noise", samples=50, datasets=["mnist"], model=mlp)
    assert x.shape == (50, 1, 28, 28) and y.min() >= 0
    x, _ = load_data_sources("noise:cifar10@mnist", samples=50, model=mlp)
    assert x.shape == (50, 1, 28, 28)


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        ("cifar10@imagenet", "unknown target 'imagenet'"),
        ("cifar10@", "write SOURCE@TARGET"),
        ("@mnist", "write SOURCE@TARGET"),
        ("cifar10[]", "empty class subset"),
        ("cifar10[ ]@mnist", "empty class subset"),
        ("cifar10[10-12]", "cifar10 has classes 0-9; got 10, 11, 12"),
        ("cifar10[3-1]", "bad class range"),
        ("cifar10[a]", "bad class spec item 'a'"),
        ("cifar10[1]x", "write SOURCE\\[CLASSES\\]@TARGET"),
        ("noise", "name it, e.g. noise:mnist"),
        ("noise:", "write noise:DATASET"),
        ("noise:imagenet", "unknown dataset 'imagenet'"),
        ("noise:mnist[10]", "mnist has classes 0-9; got 10"),
    ],
)
def test_bad_specs_name_the_item(spec: str, message: str) -> None:
    with pytest.raises(DataSourceError, match=message) as info:
        load_data_sources(f"noise:mnist,{spec}", samples=5)
    assert repr(spec) in str(info.value)


def test_images_that_do_not_fit_suggest_a_conversion(tmp_path: Path) -> None:
    mlp = _mlp()
    cifar = _cset(tmp_path / "c.st", "cifar10", ipc=1)
    with pytest.raises(DataSourceError, match=r"\(3, 32, 32\).*'noise:cifar10@mnist'"):
        load_data_sources("noise:cifar10", samples=5, model=mlp)
    # the models' own dataset is preferred among those of the right shape
    with pytest.raises(DataSourceError, match=f"'condensed:{cifar}\\[0-4\\]@fashion-mnist'"):
        load_data_sources(f"condensed:{cifar}[0-4]", model=mlp, datasets=["fmnist"])
    # a wrong target is replaced in the suggestion
    with pytest.raises(DataSourceError, match="'noise:mnist@mnist'"):
        load_data_sources("noise:mnist@cifar10", samples=5, model=mlp)
    # two sources of different shapes
    with pytest.raises(DataSourceError, match="share one shape; convert them with"):
        load_data_sources("noise:mnist,noise:cifar10", samples=5)


def _ckpt(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model, config = create_model("mlp", depth=2, width=16, num_classes=10)
    save_checkpoint(path, model, config, {"dataset": "mnist", "classes": None, "seed": seed})
    return path


def test_cli_misfit_suggests_the_quoted_conversion(tmp_path: Path) -> None:
    a, b, out = _ckpt(tmp_path / "a.st", 0), _ckpt(tmp_path / "b.st", 1), tmp_path / "o.st"
    args = ["merge", str(a), str(b), "-m", "activation", "--data", "noise:cifar10", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "'noise:cifar10@mnist'" in result.output and not out.exists()
    for syntax in ("noise:DATASET", "SOURCE[CLASSES]", "SOURCE@TARGET", "'cifar10[8-9]@mnist'"):
        assert syntax in DATA_HELP


@needs_data
def test_cli_merges_mnist_models_on_public_stand_ins(tmp_path: Path) -> None:
    a, b, out = _ckpt(tmp_path / "a.st", 0), _ckpt(tmp_path / "b.st", 1), tmp_path / "o.st"
    args = ["merge", str(a), str(b), "-m", "activation", "--repair", "--data",
            "cifar10[8-9]@mnist,noise", "--data-samples", "200", "-o", str(out),
            "--eval-limit", "100"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert out.exists() and "merged (activation, repair)" in result.output
