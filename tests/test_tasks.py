"""Label spaces: per-task and joint accuracy with logit slices, ``eval --task``, linear probes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from symmerge.cli import main
from symmerge.evaluate import (
    check_tasks,
    final_linear,
    joint_accuracy,
    linear_probe,
    task_accuracy,
    tasks_from_classes,
)
from symmerge.io import load_checkpoint, save_checkpoint
from symmerge.models import create_model
from symmerge.train import evaluate as train_evaluate

pytestmark = pytest.mark.usefixtures("one_thread")

needs_data = pytest.mark.skipif(
    not os.environ.get("SYMMERGE_DATA"), reason="set SYMMERGE_DATA (see README)"
)


def _reference_checkpoints() -> Path | None:
    """The shared CIFAR-10 class-subset checkpoints, beside the datasets folder."""
    for base in (Path(os.environ.get("SYMMERGE_DATA", "/nonexistent")).parent,
                 Path(__file__).resolve().parents[2] / "shared"):  # fmt: skip
        folder = base / "checkpoints"
        if (folder / "resnet20-cifar10-c0-4-s0.safetensors").exists():
            return folder
    return None


CKPTS = _reference_checkpoints()
needs_checkpoints = pytest.mark.skipif(
    CKPTS is None or not os.environ.get("SYMMERGE_DATA"),
    reason="needs SYMMERGE_DATA and the reference checkpoints in ../shared/checkpoints",
)

A, B = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
Y = torch.tensor([0, 1, 3, 6, 9, 2])


def _logits(width: int, entries: dict[tuple[int, int], float]) -> torch.Tensor:
    x = torch.zeros(len(Y), width)
    for (i, j), v in entries.items():
        x[i, j] = v
    return x


# Multi-head layout: task A reads columns 0:10, task B 10:20 (class c of B is column 10 + c).
#   sample 0 (y 0): A says 0, B's class 5 lower          -> A right, joint right
#   sample 1 (y 1): A says 2; column 5 is A's slice but not A's class (ignored) -> both wrong
#   sample 2 (y 3): A says 3, B's class 7 higher         -> A right, joint wrong (7)
#   sample 3 (y 6): B says 6; A-slice column 6 is not A's class (ignored) -> B right, joint right
#   sample 4 (y 9): B says 8                             -> B wrong, joint wrong
#   sample 5 (y 2): A says 2; B-slice column 12 is not B's class (ignored) -> A right, joint right
MULTI = _logits(20, {(0, 0): 3, (0, 15): 1, (1, 2): 2, (1, 1): 1, (1, 5): 9, (2, 3): 2,
                     (2, 17): 5, (3, 16): 4, (3, 4): 1, (3, 6): 10, (4, 19): 1, (4, 18): 2,
                     (5, 2): 1, (5, 12): 7})  # fmt: skip
MULTI_TASKS = [{"classes": A, "logits": [0, 10]}, {"classes": B, "logits": [10, 20]}]

# The same decisions on one shared 12-wide head (class c is column c for both tasks); column
# 11 belongs to no class and wins sample 5 over the whole head only.
SHARED = _logits(12, {(0, 0): 3, (0, 5): 1, (1, 2): 2, (1, 1): 1, (2, 3): 2, (2, 7): 5,
                      (3, 6): 4, (3, 4): 1, (4, 9): 1, (4, 8): 2,
                      (5, 2): 1, (5, 11): 5})  # fmt: skip


def test_multi_head_layout_exact() -> None:
    res = task_accuracy(nn.Identity(), (MULTI, Y), MULTI_TASKS)
    ta, tb = res["tasks"]
    assert (ta["n"], ta["accuracy"]) == (4, 0.75)  # samples 0, 2, 5 of 0, 1, 2, 5
    assert (tb["n"], tb["accuracy"]) == (2, 0.5)  # sample 3 of 3, 4
    assert ta["logits"] == [0, 10] and tb["logits"] == [10, 20]
    assert ta["loss"] == pytest.approx(
        F.cross_entropy(MULTI[[0, 1, 2, 5], :10], Y[[0, 1, 2, 5]]).item()
    )
    assert tb["loss"] == pytest.approx(F.cross_entropy(MULTI[[3, 4], 10:], Y[[3, 4]]).item())
    joint = res["joint"]
    assert joint["n"] == 6 and joint["classes"] == list(range(10))
    assert joint["accuracy"] == 0.5  # samples 0, 3, 5
    assert joint["accuracy_all_logits"] is None and joint["loss"] is None  # no one head
    assert res["mean_task_accuracy"] == pytest.approx(0.625)


def test_shared_head_exact_and_joint_accuracy_is_a_thin_call() -> None:
    tasks = tasks_from_classes([A, B], 12)
    assert tasks == [{"classes": A, "logits": [0, 12]}, {"classes": B, "logits": [0, 12]}]
    res = task_accuracy(nn.Identity(), (SHARED, Y), tasks)
    ta, tb = res["tasks"]
    assert (ta["n"], ta["accuracy"], tb["n"], tb["accuracy"]) == (4, 0.75, 2, 0.5)
    assert ta["loss"] == pytest.approx(
        F.cross_entropy(SHARED[[0, 1, 2, 5]], Y[[0, 1, 2, 5]]).item()
    )
    joint = res["joint"]
    assert joint["accuracy"] == 0.5
    assert joint["accuracy_all_logits"] == pytest.approx(2 / 6)  # column 11 wins sample 5
    assert joint["loss"] == pytest.approx(F.cross_entropy(SHARED, Y).item())
    assert joint_accuracy(nn.Identity(), (SHARED, Y), [A, B]) == res
    # limit: the first sample of each task (0 and 3), as a limited single-task evaluation
    lim = task_accuracy(nn.Identity(), (SHARED, Y), tasks, limit=1, batch_size=1)
    assert [t["n"] for t in lim["tasks"]] == [1, 1] and lim["joint"]["n"] == 2
    assert lim["joint"]["accuracy"] == 1.0
    single = train_evaluate(nn.Identity(), (SHARED[Y >= 5], Y[Y >= 5]), classes=B, limit=1)
    assert lim["tasks"][1]["accuracy"] == single["subset_accuracy"]


def test_task_validation_errors() -> None:
    with pytest.raises(ValueError, match="tasks 0 and 1 share classes \\[4\\]"):
        check_tasks([{"classes": A, "logits": [0, 10]}, {"classes": [4, 5], "logits": [10, 20]}])
    with pytest.raises(ValueError, match="class 10 does not fit its logits \\[0, 10\\]"):
        check_tasks([{"classes": [9, 10], "logits": [0, 10]}])
    with pytest.raises(ValueError, match="go beyond the model's 10 outputs"):
        check_tasks(MULTI_TASKS, num_outputs=10)
    with pytest.raises(ValueError, match="must be"):
        check_tasks([{"classes": A}])
    with pytest.raises(ValueError, match="need at least one task"):
        check_tasks([])
    with pytest.raises(ValueError, match="class 5 does not fit"):
        tasks_from_classes([A, [5]], 5)
    model = nn.Identity().train()
    with pytest.raises(ValueError, match="logits up to 20 but the model outputs shape \\(6, 12\\)"):
        task_accuracy(model, (SHARED, Y), MULTI_TASKS)
    assert model.training  # restored although the pass stopped mid-way
    with pytest.raises(ValueError, match="class 9 does not fit"):  # a head narrower than B
        joint_accuracy(nn.Identity(), (SHARED[:, :8], Y), [A, B])


class _TwoHeads(nn.Module):
    """Two source models side by side: a 20-logit multi-head model with known task heads."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], 1)


def _run(args: list[str]):
    result = CliRunner().invoke(main, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@needs_checkpoints
def test_cli_tasks_on_reference_checkpoints(tmp_path: Path) -> None:
    assert CKPTS is not None
    paths = [CKPTS / f"resnet20-cifar10-{c}.safetensors" for c in ("c0-4-s0", "c5-9-s1")]
    own = []
    for i, path in enumerate(paths):
        plain, tasks = tmp_path / f"plain{i}.json", tmp_path / f"tasks{i}.json"
        result = _run(["eval", str(path), "--limit", "60", "--json", str(plain)])
        assert result.exit_code == 0, result.output
        (single,) = json.loads(plain.read_text())["results"]
        result = _run(["eval", str(path), "--task", "0-4", "--task", "5-9", "--limit", "60",
                       "--json", str(tasks)])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "joint" in result.output and "task 1" in result.output
        (res,) = json.loads(tasks.read_text())["results"]
        mine = res["tasks"][i]  # the checkpoint's own classes, over its whole 10-way head
        assert mine["classes"] == single["classes"] and mine["n"] == single["n"] == 60
        assert mine["logits"] == [0, 10]
        assert mine["accuracy"] == single["subset_accuracy"]
        assert mine["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert res["joint"]["n"] == 120
        own.append(single["subset_accuracy"])
    assert own[0] > 0.7 and own[1] > 0.7  # trained models (89% / 94% on the full test set)

    # kept per-task heads: the side-by-side model's task accuracies are the sources' own
    models = [load_checkpoint(p)[0] for p in paths]
    res = task_accuracy(_TwoHeads(*models), "cifar10", MULTI_TASKS, limit=60)
    assert [t["accuracy"] for t in res["tasks"]] == own
    assert res["joint"]["n"] == 120 and 0.5 < res["joint"]["accuracy"] <= max(own)

    # overlap / beyond the dataset: a click usage error and nothing written
    out = tmp_path / "never.json"
    for bad in (["0-4", "4-9"], ["0-4", "5-12"]):
        args = ["eval", str(paths[0]), "--task", bad[0], "--task", bad[1], "--json", str(out)]
        result = _run(args)
        assert result.exit_code == 2 and "--task" in result.output and not out.exists()
    assert (
        "share classes 4" in _run(["eval", str(paths[0]), "--task", "0-4", "--task", "4-9"]).output
    )


def _mnist_checkpoint(path: Path, num_classes: int, metadata: dict) -> nn.Module:
    torch.manual_seed(0)
    model, config = create_model("mlp", width=16, depth=1, num_classes=num_classes)
    save_checkpoint(path, model, config, {"dataset": "mnist", **metadata})
    return model


@needs_data
def test_cli_multi_head_checkpoint_and_narrow_head(tmp_path: Path) -> None:
    multi = tmp_path / "multi.safetensors"
    model = _mnist_checkpoint(multi, 20, {"classes": list(range(10)), "tasks": MULTI_TASKS})
    expected = task_accuracy(model, "mnist", MULTI_TASKS, limit=40)
    out = tmp_path / "multi.json"
    result = _run(["eval", str(multi), "--limit", "40", "--json", str(out)])  # recorded tasks
    assert result.exit_code == 0, result.output
    (res,) = json.loads(out.read_text())["results"]
    assert res["tasks"] == expected["tasks"] and res["joint"] == expected["joint"]
    assert res["tasks"][1]["logits"] == [10, 20] and res["joint"]["n"] == 80
    result = _run(["eval", str(multi), "--task", "5-9", "--limit", "40", "--json", str(out)])
    assert result.exit_code == 0, result.output
    (res,) = json.loads(out.read_text())["results"]
    assert res["tasks"] == expected["tasks"][1:]  # the recorded slice 10:20, not the whole head
    result = _run(["eval", str(multi), "--task", "0-3"])
    assert (
        result.exit_code == 2 and "not one of this multi-head checkpoint's tasks" in result.output
    )

    narrow = tmp_path / "narrow.safetensors"
    _mnist_checkpoint(narrow, 5, {"classes": A})
    out = tmp_path / "narrow.json"
    result = _run(["eval", str(narrow), "--task", "0-4", "--task", "5-9", "--json", str(out)])
    assert result.exit_code == 1 and "class 9 does not fit its logits [0, 5]" in result.output
    assert not out.exists()


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four Gaussian clusters in 8-d: linearly separable classes 0-3."""
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.eye(8)[:4]
    y = torch.arange(n) % 4
    return centers[y] + 0.5 * torch.randn(n, 8, generator=g), y


def test_linear_probe_fits_good_features_under_a_poor_head() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    nn.init.zeros_(model[2].weight)  # a useless head: every logit equal
    nn.init.zeros_(model[2].bias)
    train, test = _blobs(400, 1), _blobs(200, 2)
    tasks = [[0, 1], [2, 3]]
    head = joint_accuracy(model, test, tasks)
    assert head["tasks"][0]["accuracy"] == 0.5  # ties go to the first class
    res = linear_probe(model, (train, test), tasks, steps=50, seed=0)
    assert res["layer"] == "2" and res["feature_dim"] == 32
    assert [t["n"] for t in res["tasks"]] == [100, 100] and res["joint"]["n"] == 200
    assert all(t["accuracy"] > 0.95 and t["train_n"] == 200 for t in res["tasks"])
    # the probes were fitted apart, so their logits are not calibrated against each other:
    # joint is well above chance (1/4) but below the per-task numbers
    assert 0.5 < res["joint"]["accuracy"] < 0.95 and res["fit_time_s"] > 0
    again = linear_probe(model, (train, test), tasks, steps=50, seed=0)
    drop = ("fit_time_s",)
    assert {k: v for k, v in again.items() if k not in drop} == {
        k: v for k, v in res.items() if k not in drop
    }
    lim = linear_probe(model, (train, test), tasks, steps=50, limit=10, train_limit=20)
    assert [t["n"] for t in lim["tasks"]] == [10, 10] and lim["tasks"][0]["train_n"] == 20


def test_final_linear_must_give_the_output() -> None:
    x = torch.randn(2, 8)
    assert final_linear(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3)), x) == "2"
    with pytest.raises(ValueError, match="needs a model whose output comes from a final"):
        final_linear(nn.Sequential(nn.Linear(8, 4), nn.ReLU()), x)
    with pytest.raises(ValueError, match="needs a model whose output comes from a final"):
        linear_probe(
            nn.Sequential(nn.Linear(8, 4), nn.Tanh()), (_blobs(8, 0), _blobs(8, 1)), [[0, 1]]
        )
