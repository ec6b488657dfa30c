"""Training-set splits for fusion parents (algorithms.md §5(a) "Regimes"): iid, dirichlet,
shards. Mostly synthetic labels; one tiny CLI run checks the recorded class counts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from symmerge import data as D
from symmerge.cli import main
from symmerge.io import read_checkpoint_metadata

needs_data = pytest.mark.skipif(
    not os.environ.get("SYMMERGE_DATA"),
    reason="set SYMMERGE_DATA to a folder with MNIST/FashionMNIST/CIFAR-10 (see README)",
)

KINDS = ("iid", "dirichlet", "shards")


def _labels(num_classes: int = 10, per_class: int = 60, seed: int = 0) -> torch.Tensor:
    """Balanced labels in a random order (as real training sets are)."""
    y = torch.arange(num_classes).repeat_interleave(per_class)
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]


def _counts(y: torch.Tensor, parts: list[torch.Tensor], num_classes: int) -> np.ndarray:
    """(n_parts, num_classes) matrix of per-class sample counts."""
    return np.stack([torch.bincount(y[p], minlength=num_classes).numpy() for p in parts])


def _run(args: list[str]):
    result = CliRunner().invoke(main, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_parts", [2, 3, 7])
def test_parts_are_disjoint_and_cover(kind: str, n_parts: int) -> None:
    y = _labels()
    parts = D.split_indices(y, kind, n_parts, seed=5)
    assert len(parts) == n_parts
    assert all(p.dtype == torch.int64 and torch.equal(p, p.sort().values) for p in parts)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(len(y)))
    # numpy labels give the same parts
    again = D.split_indices(y.numpy(), kind, n_parts, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(parts, again, strict=True))


@pytest.mark.parametrize("kind", KINDS)
def test_seed_fixes_the_parts(kind: str) -> None:
    y = _labels()
    a = D.split_indices(y, kind, 3, seed=1)
    b = D.split_indices(y, kind, 3, seed=1)
    c = D.split_indices(y, kind, 3, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))


def test_iid_parts_are_equal_sized_and_mixed() -> None:
    y = _labels(per_class=61)  # 610 samples: 3 parts of 204/203/203
    parts = D.split_indices(y, "iid", 3, seed=0)
    assert sorted(len(p) for p in parts) == [203, 203, 204]
    assert (_counts(y, parts, 10) > 0).all()  # every part sees every class


@pytest.mark.parametrize("n_parts", [2, 3, 4, 10])
def test_shards_hold_whole_classes_each_once(n_parts: int) -> None:
    y = _labels()
    parts = D.split_indices(y, "shards", n_parts, seed=3)
    counts = _counts(y, parts, 10)
    # a class is in exactly one part, with all of its samples
    assert ((counts == 0) | (counts == 60)).all()
    assert (counts.astype(bool).sum(0) == 1).all()
    # classes spread as evenly as numpy.array_split does
    sizes = sorted(counts.astype(bool).sum(1).tolist())
    assert sizes == sorted(len(g) for g in np.array_split(np.arange(10), n_parts))
    # the classes are shuffled, not cut in label order
    orders = {
        tuple(
            tuple(sorted(torch.unique(y[p]).tolist()))
            for p in D.split_indices(y, "shards", 2, seed=s)
        )
        for s in range(5)
    }
    assert len(orders) > 1


def test_shards_of_a_class_subset() -> None:
    y = torch.tensor([3, 7, 7, 9, 3, 9, 9])
    parts = D.split_indices(y, "shards", 3, seed=0)
    assert sorted(tuple(torch.unique(y[p]).tolist()) for p in parts) == [(3,), (7,), (9,)]


def test_dirichlet_default_concentrations_are_shuffled_linspace() -> None:
    for n_parts in (2, 3, 5):
        conc = D.dirichlet_concentrations(40, n_parts, seed=4)
        assert conc.shape == (40, n_parts)
        expected = torch.linspace(1, 5, n_parts, dtype=conc.dtype)
        assert all(torch.allclose(row.sort().values, expected) for row in conc)
        assert len({tuple(row.tolist()) for row in conc}) > 1  # shuffled per class
        assert conc.min() / conc.max() == pytest.approx(0.2)
    fixed = D.dirichlet_concentrations(4, 3, alpha=0.3)
    assert torch.equal(fixed, torch.full((4, 3), 0.3, dtype=fixed.dtype))


def test_dirichlet_proportions_follow_the_concentrations() -> None:
    """Proportions vary across parts per class, and favour each class's larger concentration."""
    num_classes, n_parts, seed = 50, 3, 11
    y = _labels(num_classes, per_class=400)
    parts = D.split_indices(y, "dirichlet", n_parts, seed=seed)
    shares = _counts(y, parts, num_classes).T / 400.0  # (classes, parts), rows sum to 1
    assert np.allclose(shares.sum(1), 1.0)
    assert (shares.std(1) > 0.02).all()  # not an even split for any class
    conc = D.dirichlet_concentrations(num_classes, n_parts, seed=seed).numpy()
    # expected shares are 1/9, 3/9, 5/9; 50 classes make the means tight (sd ~0.02)
    top = shares[np.arange(num_classes), conc.argmax(1)].mean()
    low = shares[np.arange(num_classes), conc.argmin(1)].mean()
    assert top == pytest.approx(5 / 9, abs=0.08)
    assert low == pytest.approx(1 / 9, abs=0.06)
    # which part a class favours changes from class to class
    assert len(set(shares.argmax(1).tolist())) == n_parts


def test_dirichlet_alpha_controls_skew() -> None:
    y = _labels(20, per_class=300)

    def spread(alpha: float) -> float:
        shares = _counts(y, D.split_indices(y, "dirichlet", 4, seed=0, alpha=alpha), 20) / 300
        return float(shares.std(0).mean())

    assert spread(0.1) > 0.25 > 0.05 > spread(1000.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "random", "n_parts": 2}, "unknown split kind"),
        ({"kind": "iid", "n_parts": 1}, ">= 2"),
        ({"kind": "iid", "n_parts": 2.5}, ">= 2"),
        ({"kind": "dirichlet", "n_parts": 2, "alpha": 0.0}, "alpha must be"),
        ({"kind": "dirichlet", "n_parts": 2, "alpha": -1.0}, "alpha must be"),
        ({"kind": "dirichlet", "n_parts": 2, "alpha": float("nan")}, "alpha must be"),
        ({"kind": "iid", "n_parts": 2, "alpha": 1.0}, "only applies to the dirichlet"),
        ({"kind": "shards", "n_parts": 11}, "at least one class per part"),
    ],
)
def test_bad_split_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        D.split_indices(_labels(), **kwargs)


def test_bad_labels_and_parts() -> None:
    with pytest.raises(ValueError, match="integers"):
        D.split_indices(torch.rand(10), "iid", 2)
    with pytest.raises(ValueError, match="1-D"):
        D.split_indices(torch.zeros(4, 2, dtype=torch.long), "iid", 2)
    with pytest.raises(ValueError, match="cannot split 1 samples"):
        D.split_indices(torch.tensor([0]), "iid", 2)
    assert D.parse_part("2/3") == (2, 3) and D.parse_part(" 1/2 ") == (1, 2)
    for spec, message in [
        ("0/2", r"in \[1, 2\]"),
        ("3/2", r"in \[1, 2\]"),
        ("1/1", ">= 2"),
        ("1", "K/N"),
        ("a/b", "K/N"),
        ("1/2/3", "K/N"),
    ]:
        with pytest.raises(ValueError, match=message):
            D.parse_part(spec)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--split", "iid", "--part", "3/2"], "in [1, 2]"),
        (["--split", "iid", "--part", "0/2"], "in [1, 2]"),
        (["--split", "iid", "--part", "1/1"], ">= 2"),
        (["--split", "iid", "--part", "half"], "K/N"),
        (["--split", "iid"], "needs --part"),
        (["--split", "random", "--part", "1/2"], "'random' is not one of"),
        (["--split", "dirichlet", "--part", "1/2", "--alpha", "0"], "--alpha"),
        (["--split", "dirichlet", "--part", "1/2", "--alpha", "nan"], "alpha must be"),
        (["--split", "iid", "--part", "1/2", "--alpha", "1"], "only applies to the dirichlet"),
        (["--part", "1/2"], "--part given without --split"),
        (["--split-seed", "3"], "--split-seed given without --split"),
        (["--split", "shards", "--part", "1/11"], "at least 11 classes"),
        (["--split", "shards", "--part", "1/3", "--classes", "0-1"], "there are 2"),
    ],
)
def test_cli_usage_errors_write_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    result = _run(["train", "mlp", "-d", "mnist", "-o", "m.safetensors", *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not list(tmp_path.iterdir())


def test_train_model_rejects_inconsistent_split_arguments() -> None:
    from symmerge.train import train_model

    with pytest.raises(ValueError, match="need a split kind"):
        train_model("mlp", "mnist", part=1, n_parts=2)
    with pytest.raises(ValueError, match="needs part and n_parts"):
        train_model("mlp", "mnist", split="iid")
    with pytest.raises(ValueError, match=r"in \[1, 2\]"):
        train_model("mlp", "mnist", split="iid", part=0, n_parts=2)


@needs_data
@pytest.mark.parametrize("kind", ["dirichlet", "shards"])
def test_cli_train_records_split_and_class_counts(tmp_path: Path, kind: str) -> None:
    ckpt = tmp_path / "p.safetensors"
    args = ["train", "mlp-w32-d1", "-d", "mnist", "--epochs", "1", "--batch-size", "64"]
    args += ["--limit-train", "256", "--limit-test", "200", "--no-progress", "--device", "cpu"]
    args += ["--split", kind, "--part", "2/3", "--split-seed", "4", "-o", str(ckpt)]
    result = _run(args)
    assert result.exit_code == 0, result.output
    assert f"{kind} part 2/3" in result.output
    meta = read_checkpoint_metadata(ckpt)
    assert meta["split"] == {"kind": kind, "part": 2, "n_parts": 3, "alpha": None, "seed": 4}
    assert meta["seed"] == 0  # the training seed is separate from the split seed

    # recompute the part from the training labels: counts of its first 256 samples
    _, labels = D.load_arrays("mnist", "train")
    part = D.split_indices(labels, kind, 3, seed=4)[1][:256]
    expected = np.bincount(labels[part.numpy()], minlength=10).tolist()
    assert meta["class_counts"] == expected
    assert sum(meta["class_counts"]) == meta["n_train"] == 256
    if kind == "shards":
        shard = D.split_indices(labels, "shards", 3, seed=4)[1]
        assert {c for c, n in enumerate(meta["class_counts"]) if n} <= set(
            np.unique(labels[shard.numpy()]).tolist()
        )
