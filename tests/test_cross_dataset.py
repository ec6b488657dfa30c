"""`--data` sources for merging models of different datasets: DATASET, condensed:FILE,
coreset:METHOD:K[:DATASET]; their normalisation, their checks against the models, and the
demo's headline."""

from __future__ import annotations

import os
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from symmerge.cli import _data_batches, main
from symmerge.condense import CondensedSet, condense, save_condensed
from symmerge.data import dataset_info
from symmerge.demo import headline
from symmerge.io import save_checkpoint
from symmerge.models import create_model
from symmerge.sources import (
    DataSourceError,
    DataUnavailableError,
    data_source_batches,
    load_data_sources,
)

needs_data = pytest.mark.skipif(
    not os.environ.get("SYMMERGE_DATA"), reason="needs SYMMERGE_DATA (CI sets it)"
)


def _cset(path: Path, dataset: str = "mnist", ipc: int = 2, seed: int = 0, **meta: object) -> Path:
    info = dataset_info(dataset)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(info["num_classes"]).repeat_interleave(ipc)
    images = torch.randn(len(labels), *info["input_shape"], generator=gen)
    metadata = {"dataset": info["name"], "mean": list(info["mean"]), "std": list(info["std"])}
    metadata.update(meta)
    save_condensed(CondensedSet(images, labels, metadata), path)
    return path


def _ckpt(path: Path, seed: int, num_classes: int = 10, dataset: str | None = "mnist") -> Path:
    torch.manual_seed(seed)
    model, config = create_model("mlp", depth=2, width=16, num_classes=num_classes)
    save_checkpoint(path, model, config, {"dataset": dataset, "classes": None, "seed": seed})
    return path


def _cat(batches: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    return flat[torch.argsort(flat.sum(1))]


def test_condensed_sources_are_concatenated_and_kept_exact(tmp_path: Path) -> None:
    a, b = _cset(tmp_path / "a.st", seed=0), _cset(tmp_path / "b.st", seed=1, ipc=3)
    batches = _data_batches(f"condensed:{a}, condensed:{b}", None, 5, 16, seed=0)
    x, y = _cat(batches)
    assert [len(bx) for bx, _ in batches] == [16, 16, 16, 2]  # 20 + 30 images, batches of 16
    assert torch.bincount(y).tolist() == [5] * 10
    from symmerge.condense import load_condensed

    want = torch.cat([load_condensed(a).images, load_condensed(b).images])
    assert torch.equal(_sorted_rows(x), _sorted_rows(want))  # same images, shuffled, unchanged
    again = _cat(_data_batches(f"condensed:{a},condensed:{b}", None, 5, 16, seed=0))
    assert torch.equal(again[0], x)  # seeded order


def test_condensed_set_in_another_space_is_converted(tmp_path: Path) -> None:
    # a set stored in [0, 1] pixels (mean 0, std 1) comes out in MNIST's normalised space
    unit = _cset(tmp_path / "u.st", mean=[0.0], std=[1.0])
    from symmerge.condense import load_condensed

    raw = load_condensed(unit).images
    x, _ = _cat(_data_batches(f"condensed:{unit}", None, 5, 500, seed=0))
    want = (raw - 0.1307) / 0.3081
    assert torch.allclose(_sorted_rows(x), _sorted_rows(want), atol=1e-5)


@needs_data
def test_condensed_file_matches_get_dataset(tmp_path: Path) -> None:
    """A coreset saved by symmerge.condense holds exactly get_dataset's normalised images."""
    from symmerge.data import get_dataset

    cset = condense("mnist", method="random", ipc=2, seed=3, progress=False, device="cpu")
    path = save_condensed(cset, tmp_path / "r.st")
    x, y = _cat(_data_batches(f"condensed:{path}", None, 5, 500, seed=0))
    xtr, ytr = get_dataset("mnist", "train").tensors
    idx = torch.tensor(cset.metadata["indices"])
    assert torch.equal(_sorted_rows(x), _sorted_rows(xtr[idx]))
    assert sorted(y.tolist()) == sorted(ytr[idx].tolist())


@needs_data
def test_coreset_sources(tmp_path: Path) -> None:
    x, y = _cat(_data_batches("coreset:random:2:mnist", None, 5, 500, seed=0))
    assert x.shape == (20, 1, 28, 28) and torch.bincount(y).tolist() == [2] * 10
    # without a dataset: each dataset the checkpoints were trained on (repeats count once)
    both = _data_batches(
        "coreset:herding:1", None, 5, 500, seed=0, datasets=["mnist", "fmnist", "fashion-mnist"]
    )
    x, y = _cat(both)
    assert x.shape == (20, 1, 28, 28) and torch.bincount(y).tolist() == [2] * 10
    # mixed with a train split: --data-samples images of it, plus the coreset
    x, _ = _cat(_data_batches("fashion-mnist,coreset:random:1:mnist", None, 7, 500, seed=0))
    assert len(x) == 17


@pytest.mark.parametrize(
    "spec, message",
    [
        (",", "no data source"),
        (" ", "no data source"),
        ("nosuchset", "unknown dataset"),
        ("condensed:", "condensed:FILE"),
        ("condensed:{tmp}/missing.st", "does not exist"),
        ("condensed:{tmp}/junk.st", "not a safetensors"),
        ("coreset:kmeans:10", "coreset:METHOD:K"),
        ("coreset:random", "coreset:METHOD:K"),
        ("coreset:random:ten", "must be an integer"),
        ("coreset:random:0:mnist", "must be >= 1"),
        ("coreset:random:10", "do not record their dataset"),
    ],
)
def test_bad_sources_are_clear_errors(tmp_path: Path, spec: str, message: str) -> None:
    (tmp_path / "junk.st").write_bytes(b"not a file of tensors")
    with pytest.raises(click.BadParameter, match=message) as info:
        _data_batches(spec.format(tmp=tmp_path), None, 5, 500, seed=0, datasets=[None])
    assert "--data" in info.value.format_message() or info.value.param_hint == "'--data'"


def test_merge_rejects_data_that_does_not_fit_the_models(tmp_path: Path) -> None:
    a, b = _ckpt(tmp_path / "a.st", 0), _ckpt(tmp_path / "b.st", 1)
    c5, d5 = _ckpt(tmp_path / "c.st", 0, num_classes=5), _ckpt(tmp_path / "d.st", 1, num_classes=5)
    cifar, mnist = _cset(tmp_path / "cifar.st", "cifar10", ipc=1), _cset(tmp_path / "m.st")
    out = tmp_path / "out.st"
    cases = [
        ((a, b), f"condensed:{cifar}", "shape"),  # 3x32x32 images for a 1x28x28 MLP
        ((a, b), f"condensed:{mnist},condensed:{cifar}", "share one shape"),
        ((c5, d5), f"condensed:{mnist}", "5 outputs"),  # labels 0..9 for a 5-way head
    ]
    for (x, y), spec, message in cases:
        result = CliRunner().invoke(
            main, ["merge", str(x), str(y), "-m", "ste", "--data", spec, "-o", str(out)]
        )
        assert result.exit_code == 2, result.output
        assert message in result.output and "--data" in result.output
        assert not out.exists()


@needs_data
def test_merge_with_ste_on_two_condensed_sets(tmp_path: Path) -> None:
    a, b = _ckpt(tmp_path / "a.st", 0), _ckpt(tmp_path / "b.st", 1, dataset="fashion-mnist")
    m, f = _cset(tmp_path / "m.st"), _cset(tmp_path / "f.st", "fashion-mnist", seed=1)
    out = tmp_path / "ab.st"
    args = ["merge", str(a), str(b), "-m", "ste", "--repair", "--data",
            f"condensed:{m},condensed:{f}", "-o", str(out), "--eval-limit", "100"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert out.exists() and "merged (ste, repair)" in result.output
    assert "mnist" in result.output and "fashion-mnist" in result.output  # both test sets


# --- the library API (symmerge.sources), which the CLI wraps --------------------------------


def test_library_converts_a_condensed_set_from_another_space_exactly(tmp_path: Path) -> None:
    path = _cset(tmp_path / "half.st", mean=[0.5], std=[0.25])
    from symmerge.condense import load_condensed

    stored = load_condensed(path)
    view = (1, -1, 1, 1)
    mean, std = (torch.tensor(dataset_info("mnist")[k]).view(view) for k in ("mean", "std"))
    pixels = stored.images * torch.tensor([0.25]).view(view) + torch.tensor([0.5]).view(view)
    want = (pixels - mean) / std  # back to [0, 1], then into MNIST's space
    x, y = load_data_sources(f"condensed:{path}", seed=3)
    order = torch.randperm(len(want), generator=torch.Generator().manual_seed(3))
    assert torch.equal(x, want[order]) and torch.equal(y, stored.labels[order])
    # a set already in MNIST's space is returned bit for bit
    same = _cset(tmp_path / "same.st")
    x, _ = load_data_sources(f"condensed:{same}", seed=3)
    assert torch.equal(_sorted_rows(x), _sorted_rows(load_condensed(same).images))


def test_library_batches_are_the_shuffled_sources_cut_in_order(tmp_path: Path) -> None:
    path = _cset(tmp_path / "a.st", ipc=3)
    x, y = load_data_sources(f"condensed:{path}", seed=1)
    batches = data_source_batches(f"condensed:{path}", 8, seed=1)
    assert [len(b[0]) for b in batches] == [8, 8, 8, 6]
    assert torch.equal(torch.cat([b[0] for b in batches]), x)
    assert torch.equal(torch.cat([b[1] for b in batches]), y)


@needs_data
def test_library_coreset_gives_k_per_class() -> None:
    x, y = load_data_sources("coreset:herding:3:mnist")
    assert x.shape == (30, 1, 28, 28) and torch.bincount(y).tolist() == [3] * 10
    x, y = load_data_sources("coreset:random:2", datasets=[None, "fashion-mnist", "fmnist"])
    assert x.shape == (20, 1, 28, 28) and torch.bincount(y).tolist() == [2] * 10


def test_library_bad_sources_raise_data_source_error(tmp_path: Path) -> None:
    mnist, cifar = _cset(tmp_path / "m.st"), _cset(tmp_path / "c.st", "cifar10", ipc=1)
    mlp, _ = create_model("mlp", depth=2, width=16, num_classes=10)
    mlp5, _ = create_model("mlp", depth=2, width=16, num_classes=5)
    cases = [
        (" , ", {}, "no data source"),
        ("imagenet", {}, "unknown dataset 'imagenet'.*or one of condensed:FILE"),
        ("coreset:kmeans:10:mnist", {}, "METHOD one of \\('random', 'herding'\\)"),
        ("coreset:random:ten:mnist", {}, "K \\(images per class\\) must be an integer"),
        ("coreset:random:0:mnist", {}, "must be >= 1, got 0"),
        ("coreset:random:1", {}, "do not record their dataset"),
        (f"condensed:{tmp_path}/missing.st", {}, "missing.st does not exist"),
        (f"condensed:{cifar}", {"model": mlp}, "shape \\(C, H, W\\) = \\(3, 32, 32\\)"),
        (f"condensed:{mnist}", {"model": mlp5}, "labels 0..9 but the models have 5 outputs"),
    ]
    for spec, kwargs, message in cases:
        with pytest.raises(DataSourceError, match=message):
            load_data_sources(spec, **kwargs)
    assert mlp.training  # the fit check leaves the model's mode alone


def test_missing_dataset_files_are_unavailable_not_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SYMMERGE_NO_DOWNLOAD", "1")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataUnavailableError, match="data not found") as info:
        load_data_sources("mnist", root=empty)
    assert info.value.source == "mnist" and isinstance(info.value, ValueError)
    # the CLI keeps its message and exit status 1 (ClickException), and writes nothing
    a, b, out = _ckpt(tmp_path / "a.st", 0), _ckpt(tmp_path / "b.st", 1), tmp_path / "o.st"
    args = ["merge", str(a), str(b), "-m", "ste", "--data", "mnist", "-o", str(out),
            "--data-root", str(empty)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "Error: --data mnist: " in result.output and not out.exists()


def test_demo_headline_reports_the_gain() -> None:
    results = {
        "merged: weight matching (no data)": {"mnist": 0.6, "fashion-mnist": 0.4},
        "merged: STE on a 200-image coreset": {"mnist": 0.9, "fashion-mnist": 0.7},
        "merged: naive average + REPAIR": {"mnist": 0.7, "fashion-mnist": 0.5},
        "merged: naive average + REPAIR on the 200-image coreset": {
            "mnist": 0.6,
            "fashion-mnist": 0.5,
        },
    }
    text, summary = headline(results)
    assert summary["weight_no_data"] == pytest.approx(0.5)
    assert summary["ste_coreset"] == pytest.approx(0.8)
    assert summary["gain_points"] == pytest.approx(30.0)
    assert summary["naive_repair_sample"] == pytest.approx(0.6)
    assert summary["naive_repair_coreset"] == pytest.approx(0.55)
    assert summary["naive_repair_coreset_gain_points"] == pytest.approx(5.0)
    assert "50.00%" in text and "80.00%" in text and "+30.0 points" in text
    # the baseline on the same coreset stands beside STE in the sentence
    assert "naive averaging + REPAIR on the same images 55.00%, +5.0 points" in text
