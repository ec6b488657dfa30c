"""Evaluators: known-answer accuracy/loss, joint accuracy, interpolation paths and barriers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from symmerge.evaluate import (
    barrier,
    evaluate,
    evaluate_many,
    interpolate_state_dicts,
    interpolation_curve,
    joint_accuracy,
    plot_curve,
)
from symmerge.models import create_model
from symmerge.renorm import reset_bn
from symmerge.train import evaluate as train_evaluate

# Logits = inputs: predictions are known. Full argmax: 0 1 2 0 0 3.
X = torch.tensor(
    [[5.0, 1, 0, 0], [0, 5, 1, 0], [0, 1, 5, 0], [5, 0, 1, 4], [5, 1, 0, 0], [0, 0, 1, 6]]
)
Y = torch.tensor([1, 1, 2, 3, 0, 3])


def test_evaluate_tensors_and_batches_agree() -> None:
    model = nn.Identity()
    whole = evaluate(model, (X, Y))
    assert whole == train_evaluate(model, (X, Y))
    assert whole["n"] == 6 and whole["accuracy"] == pytest.approx(4 / 6)
    assert whole["loss"] == pytest.approx(F.cross_entropy(X, Y).item(), rel=1e-6)
    batched = evaluate(model, [(X[:4], Y[:4]), (X[4:], Y[4:])])
    assert batched["n"] == 6
    assert batched["accuracy"] == pytest.approx(whole["accuracy"])
    assert batched["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    sub = evaluate(model, [(X[:4], Y[:4]), (X[4:], Y[4:])], classes=[1, 2, 3])
    assert sub["subset_accuracy"] == pytest.approx(5 / 6)  # only sample 4 (label 0) is wrong
    with pytest.raises(TypeError, match="only apply"):
        evaluate(model, [(X, Y)], split="train")


def test_evaluate_many_takes_the_mean_over_datasets() -> None:
    res = evaluate_many(nn.Identity(), {"a": (X[:2], Y[:2]), "b": (X[2:], Y[2:])})
    a, b = res["per_dataset"]["a"], res["per_dataset"]["b"]
    assert a["accuracy"] == 0.5 and b["accuracy"] == 0.75
    assert res["accuracy"] == pytest.approx(0.625)  # per dataset, not per sample (4/6)
    assert res["loss"] == pytest.approx((a["loss"] + b["loss"]) / 2)


def test_joint_and_per_task_accuracy() -> None:
    res = joint_accuracy(nn.Identity(), (X, Y), [[0, 1], [3]])
    # union {0, 1, 3}: samples 0, 1, 3, 4, 5; argmax over logits 0, 1, 3: 0 1 0 0 3
    assert res["joint"]["n"] == 5 and res["joint"]["classes"] == [0, 1, 3]
    assert res["joint"]["accuracy"] == pytest.approx(3 / 5)
    assert res["joint"]["accuracy_all_logits"] == pytest.approx(3 / 5)
    t0, t1 = res["tasks"]
    assert (t0["n"], t0["accuracy"]) == (3, pytest.approx(2 / 3))  # samples 0, 1, 4 in {0, 1}
    assert (t1["n"], t1["accuracy"]) == (2, 1.0)  # only logit 3 competes
    assert res["mean_task_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(ValueError, match="disjoint"):
        joint_accuracy(nn.Identity(), (X, Y), [[0, 1], [1]])


def test_interpolation_endpoints_equal_endpoint_evaluations() -> None:
    torch.manual_seed(0)
    a = create_model("mlp", width=16, depth=1, input_shape=(1, 4, 4))[0]
    b = create_model("mlp", width=16, depth=1, input_shape=(1, 4, 4))[0]
    x, y = torch.randn(64, 1, 4, 4), torch.randint(0, 10, (64,))
    calls = []

    def renorm(model: nn.Module, lam: float) -> None:
        calls.append(lam)

    curve = interpolation_curve(
        a, b.state_dict(), [0.0, 0.25, 0.5, 1.0], lambda m: evaluate(m, (x, y)), renorm=renorm
    )
    assert [p["lambda"] for p in curve] == calls == [0.0, 0.25, 0.5, 1.0]
    ends = evaluate(a, (x, y)), evaluate(b, (x, y))
    for point, end in ((curve[0], ends[0]), (curve[-1], ends[1])):
        assert point["loss"] == end["loss"] and point["accuracy"] == end["accuracy"]
    mid = interpolate_state_dicts(a.state_dict(), b.state_dict(), 0.5)
    torch.testing.assert_close(
        mid["layers.1.weight"], (a.layers[1].weight + b.layers[1].weight) / 2
    )
    assert torch.equal(
        interpolate_state_dicts(a.state_dict(), b.state_dict(), 1.0)["layers.1.bias"],
        b.layers[1].bias,
    )
    # the endpoints themselves are untouched, and the midpoint is a different function
    assert curve[2]["loss"] != curve[0]["loss"]


def test_interpolation_with_bn_reset_keeps_integer_buffers() -> None:
    torch.manual_seed(0)
    a = create_model("resnet20x1", input_shape=(3, 8, 8))[0]
    b = create_model("resnet20x1", input_shape=(3, 8, 8))[0]
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)))]
    curve = interpolation_curve(
        a, b, [0.5], lambda m: {"bn_mean": float(m.norm1.running_mean.abs().sum())},
        renorm=lambda m, lam: reset_bn(m, data),
    )  # fmt: skip
    assert curve[0]["bn_mean"] > 0  # reset on data: no longer the init's zeros
    assert a.norm1.running_mean.abs().sum() == 0 and int(a.norm1.num_batches_tracked) == 0


def test_barrier() -> None:
    lams = [0.0, 0.25, 0.5, 0.75, 1.0]
    line = [{"lambda": l, "loss": 2 - l, "accuracy": 0.5 + 0.4 * l} for l in lams]
    assert barrier(line, "loss") == pytest.approx(0.0, abs=1e-12)
    assert barrier(line, "accuracy") == pytest.approx(0.0, abs=1e-12)
    bump = [
        {"lambda": l, "loss": 2 - l + 3 * l * (1 - l), "accuracy": 0.9 - 0.8 * l * (1 - l)}
        for l in lams
    ]
    assert barrier(bump, "loss") == pytest.approx(0.75)
    assert barrier(bump, "accuracy") == pytest.approx(0.2)  # drop below the line, positive
    shuffled = [bump[i] for i in (3, 0, 4, 1, 2)]
    assert barrier(shuffled, "loss") == pytest.approx(0.75)
    assert barrier(bump, "loss", higher_is_better=True) == pytest.approx(0.0)
    short_keys = [{"lam": p["lambda"], "loss": p["loss"]} for p in bump]
    assert barrier(short_keys, "loss") == pytest.approx(0.75)
    with pytest.raises(ValueError, match="two points"):
        barrier(bump[:1])


def test_plot_curve_writes_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    curves = {
        "naive": [
            {"lambda": l, "loss": 1 + math.sin(math.pi * l), "accuracy": 0.9} for l in (0, 0.5, 1)
        ],
        "aligned": [{"lambda": l, "loss": 1.0, "accuracy": 0.9} for l in (0, 0.5, 1)],
    }
    out = plot_curve(curves, tmp_path / "sub" / "curve.png", title="test")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    only_loss = plot_curve(
        {"x": [{"lambda": 0, "loss": 1}, {"lambda": 1, "loss": 2}]}, tmp_path / "l.png"
    )
    assert only_loss.exists()
    with pytest.raises(ValueError, match="no curve"):
        plot_curve(curves, tmp_path / "x.png", keys=("bogus",))
