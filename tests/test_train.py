"""Training recipe: determinism under a seed, learning well above chance, evaluation."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from symmerge.train import evaluate, recipe_for, resolve_config, train_model, warmup_cosine

needs_data = pytest.mark.skipif(
    not os.environ.get("SYMMERGE_DATA"),
    reason="set SYMMERGE_DATA to a folder with MNIST/FashionMNIST/CIFAR-10 (see README)",
)


def _small_mlp(dataset: str = "mnist", width: int = 64) -> dict:
    return resolve_config("mlp", dataset, width=width, depth=2)


def test_recipes() -> None:
    assert recipe_for("mlp")["lr"] == 0.05
    assert recipe_for("resnet20")["lr"] == 0.1
    assert recipe_for("vgg11")["lr"] == 0.05
    assert all(recipe_for(a)["batch_size"] == 128 for a in ("mlp", "resnet18", "vgg16"))


def test_warmup_cosine_schedule() -> None:
    f = warmup_cosine(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)
    assert f(99) < 0.01
    values = [f(s) for s in range(10, 100)]
    assert values == sorted(values, reverse=True)
    assert warmup_cosine(0, 0)(0) == 1.0  # degenerate budgets do not divide by zero


def test_evaluate_known_answer() -> None:
    """Identity "model" on one-hot-ish logits: exact accuracy and loss are known."""
    y = torch.tensor([1, 1, 2, 2, 1])
    x = torch.tensor(
        [[5.0, 1, 0], [0, 5, 1], [0, 1, 5], [5, 0, 1], [5, 1, 0]]
    )  # full argmax: 0 1 2 0 0
    model = nn.Identity()
    model.train()
    res = evaluate(model, (x, y), batch_size=2)
    assert res["n"] == 5
    assert res["accuracy"] == pytest.approx(2 / 5)
    expected = torch.nn.functional.cross_entropy(x, y).item()
    assert res["loss"] == pytest.approx(expected, rel=1e-6)
    assert model.training  # mode restored

    # restricted to the logits of classes 1 and 2, every sample is right
    res = evaluate(model, (x, y), classes=[1, 2])
    assert res["subset_accuracy"] == pytest.approx(1.0)
    assert res["accuracy"] == pytest.approx(2 / 5)


@needs_data
def test_training_is_deterministic_under_a_seed() -> None:
    kwargs = dict(epochs=1, limit_train=384, batch_size=64, progress=False, device="cpu")
    config = _small_mlp()
    a, info_a = train_model(config, "mnist", seed=7, **kwargs)
    b, info_b = train_model(config, "mnist", seed=7, **kwargs)
    c, _ = train_model(config, "mnist", seed=8, **kwargs)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert info_a["test_accuracy"] == info_b["test_accuracy"]
    assert info_a["history"][0]["train_loss"] == info_b["history"][0]["train_loss"]
    assert info_a["n_train"] == 384 and info_a["total_steps"] == 6
    assert not torch.are_deterministic_algorithms_enabled()  # global state restored


@needs_data
def test_mlp_learns_well_above_chance() -> None:
    model, info = train_model(
        _small_mlp(width=128), "mnist", epochs=2, limit_train=4000, progress=False, seed=0
    )
    assert info["test_accuracy"] > 0.85  # chance is 0.10
    assert info["n_test"] == 10_000
    assert info["history"][1]["train_loss"] < info["history"][0]["train_loss"]
    assert not model.training
    for key in ("config", "dataset", "seed", "epochs", "lr", "batch_size", "train_time_s"):
        assert key in info
    assert info["config"]["kwargs"]["width"] == 128
    again = evaluate(model, "mnist")
    assert again["accuracy"] == pytest.approx(info["test_accuracy"])


@needs_data
def test_class_subset_and_alias() -> None:
    model, info = train_model(
        _small_mlp("fashion-mnist"),
        "fmnist",
        classes=[1, 7],
        epochs=1,
        limit_train=512,
        progress=False,
    )
    assert info["dataset"] == "fashion-mnist"
    assert info["classes"] == [1, 7]
    assert info["n_test"] == 2000  # 1000 test images per Fashion-MNIST class
    assert info["test_subset_accuracy"] > 0.9  # trousers vs sneakers is easy
    assert info["test_accuracy"] <= info["test_subset_accuracy"]


@needs_data
def test_convnet_step_with_augmentation() -> None:
    model, info = train_model(
        "resnet20",
        "cifar10",
        epochs=1,
        limit_train=64,
        limit_test=100,
        batch_size=32,
        progress=False,
    )
    assert info["n_test"] == 100
    assert info["augment"] and "crop" in info["augment"]
    assert info["total_steps"] == 2
    assert info["lr"] == 0.1
    assert torch.isfinite(torch.tensor(info["train_loss"]))
    assert model.input_shape == (3, 32, 32)


@needs_data
def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        train_model("mlp", "imagenet-21k", epochs=0, progress=False)
    with pytest.raises(ValueError, match="unknown model"):
        train_model("transformer", "mnist", epochs=0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train_model("mlp", "mnist", epochs=1, lr=-1.0, progress=False)
    cifar_mlp = resolve_config("mlp", "cifar10", width=8, depth=1)
    with pytest.raises(ValueError, match="does not accept mnist inputs"):
        train_model(cifar_mlp, "mnist", epochs=1, limit_train=64, progress=False)
