"""`symmerge check-symmetry`: zoo names, timm names, checkpoints, and a failing spec."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from symmerge import _rules
from symmerge.cli import main
from symmerge.io import save_checkpoint
from symmerge.models import create_model


def _run(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, ["check-symmetry", *args])
    return result.exit_code, result.output.strip().splitlines()


def _diff(lines: list[str]) -> float:
    assert lines[-1].startswith("max |diff| = "), lines[-1]
    return float(lines[-1].split("=")[1])


@pytest.mark.parametrize("name", ["mlp", "resnet20x1-gn", "timm:convnext_atto"])
def test_check_symmetry_passes(name: str) -> None:
    code, lines = _run(name, "--seed", "1")
    assert code == 0, lines
    assert any(line.startswith("groups: ") and int(line.split()[1]) > 0 for line in lines)
    assert _diff(lines) < 1e-4


def test_show_lists_groups_members_and_frozen_axes() -> None:
    code, lines = _run("resnet20x1-gn", "--show")
    assert code == 0
    text = "\n".join(lines)
    assert "group layer1.0.conv1.out: size 16, 4 blocks x 4" in text
    assert "frozen axes:" in text and "model input" in text


def test_checkpoint_and_pickled_module(tmp_path: Path) -> None:
    model, config = create_model("mlp", depth=2, width=16)
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, model, config, {"seed": 0})
    code, lines = _run(str(ckpt))
    assert code == 0 and _diff(lines) < 1e-4
    pickled = tmp_path / "own.pt"
    torch.save(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)), pickled)
    code, lines = _run(str(pickled), "--input-shape", "5")
    assert code != 0 and "--trust-pickle" in "\n".join(lines)
    code, lines = _run(str(pickled), "--trust-pickle")
    assert code != 0 and "--input-shape" in "\n".join(lines)
    code, lines = _run(str(pickled), "--trust-pickle", "--input-shape", "5")
    assert code == 0 and _diff(lines) < 1e-4


def test_a_wrong_rule_makes_the_check_fail(tmp_path: Path, monkeypatch) -> None:
    def disconnect(ctx):  # claims tanh's output is unrelated to its input: wrong
        return [ctx.fresh(s) for s in ctx.out_shape]

    monkeypatch.setitem(_rules._RULES, "tanh", disconnect)
    pickled = tmp_path / "own.pt"
    torch.save(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)), pickled)
    code, lines = _run(str(pickled), "--trust-pickle", "--input-shape", "5")
    assert code == 1
    assert "FUNCTION CHANGED" in "\n".join(lines) and _diff(lines) > 1e-4


def test_unknown_model_is_a_usage_error() -> None:
    code, lines = _run("not-a-model")
    assert code == 2 and "timm:NAME" in "\n".join(lines)
