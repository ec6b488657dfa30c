"""The ``symmerge`` command line: class specs, train/eval round trip, demo, clean errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from symmerge.cli import format_table, main, parse_class_spec
from symmerge.io import read_checkpoint_metadata

needs_data = pytest.mark.skipif(
    not os.environ.get("SYMMERGE_DATA"),
    reason="set SYMMERGE_DATA to a folder with MNIST/FashionMNIST/CIFAR-10 (see README)",
)


def _run(args: list[str], env: dict[str, str] | None = None):
    result = CliRunner().invoke(main, args, env=env)
    # errors must be reported by click (exit 1/2 and a message), never as a traceback
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0-4", [0, 1, 2, 3, 4]),
        ("5-9", [5, 6, 7, 8, 9]),
        ("0,2,4", [0, 2, 4]),
        (" 4, 0-1 ,4", [0, 1, 4]),
        ("7", [7]),
        ("all", None),
        ("ALL", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_class_spec(spec: str | None, expected: list[int] | None) -> None:
    assert parse_class_spec(spec) == expected


@pytest.mark.parametrize("spec", ["a", "3-1", "-1", "1,,2", "0-", "1.5", "0-4-5"])
def test_parse_class_spec_rejects(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_class_spec(spec)


def test_format_table() -> None:
    text = format_table(["name", "acc"], [["a", 0.5], ["longer", None]])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "acc"]
    assert lines[2].split() == ["a", "0.5000"]
    assert lines[3].split() == ["longer", "-"]
    assert len({len(line) for line in lines[:3]}) == 1


def test_help_lists_commands() -> None:
    result = _run(["--help"])
    assert result.exit_code == 0
    for command in ("train", "eval", "demo"):
        assert command in result.output
    assert "SYMMERGE_DATA" in _run(["train", "--help"]).output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "transformer", "-d", "mnist", "-o", "x.safetensors"], "unknown model name"),
        (["train", "mlp", "-d", "imagenet", "-o", "x.safetensors"], "unknown dataset"),
        (["train", "mlp", "-d", "mnist", "--classes", "9-2", "-o", "x.st"], "bad class range"),
        (["train", "mlp", "-d", "mnist", "--classes", "8-12", "-o", "x.st"], "classes 0-9"),
        (["train", "mlp", "-d", "mnist"], "Missing option '-o'"),
    ],
)
def test_usage_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    result = _run(args)
    assert result.exit_code == 2
    assert message in result.output
    assert not list(tmp_path.iterdir())


def test_eval_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    result = _run(["eval", str(bad), "-d", "mnist"])
    assert result.exit_code == 1
    assert "Error:" in result.output and "neither a safetensors" in result.output
    result = _run(["eval", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


@needs_data
def test_train_then_eval(tmp_path: Path) -> None:
    ckpt = tmp_path / "m.safetensors"
    base = ["train", "mlp", "-d", "mnist", "--classes", "0-4", "--epochs", "1"]
    base += ["--limit-train", "512", "--batch-size", "64", "--seed", "3", "--no-progress"]
    result = _run([*base, "-o", str(ckpt)])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and str(ckpt) in result.output
    meta = read_checkpoint_metadata(ckpt)
    assert meta["dataset"] == "mnist"
    assert meta["classes"] == [0, 1, 2, 3, 4]
    assert meta["seed"] == 3 and meta["epochs"] == 1 and meta["n_train"] == 512
    assert meta["test_accuracy"] > 0.5  # 5 classes: chance 0.2
    assert meta["config"]["arch"] == "mlp"

    # no silent overwrite; --overwrite replaces
    before = ckpt.read_bytes()
    again = _run([*base, "-o", str(ckpt)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert ckpt.read_bytes() == before
    assert _run([*base, "-o", str(ckpt), "--overwrite"]).exit_code == 0

    out = tmp_path / "eval.json"
    result = _run(["eval", str(ckpt), "-d", "mnist", "-d", "fashion-mnist", "--json", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if line.startswith("dataset"))
    assert "accuracy" in header and "loss" in header and " n " in f" {header} "
    rows = {r["dataset"]: r for r in json.loads(out.read_text())["results"]}
    # by default the training class subset is used on the training dataset, all classes elsewhere
    assert rows["mnist"]["classes"] == [0, 1, 2, 3, 4]
    assert rows["mnist"]["accuracy"] == pytest.approx(meta["test_accuracy"])
    assert rows["fashion-mnist"]["classes"] is None and rows["fashion-mnist"]["n"] == 10_000

    result = _run(["eval", str(ckpt), "--classes", "all", "--json", "-"])
    assert result.exit_code == 0, result.output
    assert '"n": 10000' in result.output


@needs_data
def test_missing_data_root_is_a_clean_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"SYMMERGE_NO_DOWNLOAD": "1"}
    args = ["train", "mlp", "-d", "mnist", "--epochs", "1", "-o", str(tmp_path / "m.st")]
    result = _run([*args, "--data-root", str(empty), "--no-progress"], env=env)
    assert result.exit_code == 1
    assert "not found" in result.output


@needs_data
def test_demo_tiny_budget(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--epochs", "2", "--width", "64", "--limit-train", "3000", "--no-progress"]
    result = _run([*args, "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "mnist.safetensors").exists() and (out / "fashion-mnist.safetensors").exists()
    text = result.output
    assert "MLP trained on MNIST" in text and "MLP trained on Fashion-MNIST" in text
    assert "mean" in text and "merg" in text.lower()
    results = json.loads((out / "results.json").read_text())["test_accuracy"]
    assert results["mnist"]["mnist"] > 0.5  # in-domain accuracy well above chance (0.1)
    assert results["fashion-mnist"]["fashion-mnist"] > 0.4
    assert results["mnist"]["mnist"] > results["mnist"]["fashion-mnist"]
    many = json.loads((out / "results.json").read_text())["three_mnist_models"]
    assert "Three MNIST MLPs" in text and set(many) == {
        "naive average", "MergeMany", "MergeMany + REPAIR", "C2M3", "C2M3 + REPAIR"
    }  # fmt: skip
    assert many["C2M3"]["objective"] > many["naive average"]["objective"]
    assert many["C2M3 + REPAIR"]["accuracy"] > 0.5
    # the baseline beside STE: naive averaging + REPAIR on the same data, in table and headline
    assert "merged: naive average + REPAIR " in text
    assert "merged: naive average + REPAIR on the 200-image coreset" in text
    cross = json.loads((out / "results.json").read_text())["cross_dataset"]
    assert {"weight_no_data", "ste_coreset", "gain_points"} <= set(cross)  # the old keys
    assert (
        f"naive averaging + REPAIR on the same images {100 * cross['naive_repair_coreset']:.2f}%"
        in text
    )

    # same settings again: checkpoints are reused, not retrained or clobbered
    stamp = (out / "mnist.safetensors").stat().st_mtime_ns
    again = _run([*args, "--out-dir", str(out)])
    assert again.exit_code == 0 and "reusing" in again.output
    assert (out / "mnist.safetensors").stat().st_mtime_ns == stamp

    # different settings: a fresh folder next to it, said out loud
    other = _run(["demo", "--epochs", "0", "--width", "64", "--no-progress", "--out-dir", str(out)])
    assert other.exit_code == 0, other.output
    assert "demo-2" in other.output and (tmp_path / "demo-2" / "mnist.safetensors").exists()
    assert (out / "mnist.safetensors").stat().st_mtime_ns == stamp


@needs_data
def test_run_demo_is_callable_without_click(tmp_path: Path) -> None:
    """``symmerge.demo.run_demo`` is the demo: it runs with click unimportable, prints
    through ``echo``, and returns what it writes to results.json."""
    out = tmp_path / "demo"
    code = (
        "import json, sys\n"
        "sys.modules['click'] = None  # any import of click now fails\n"
        "from symmerge.demo import run_demo\n"
        "lines = []\n"
        f"payload = run_demo(epochs=1, width=16, out_dir={str(out)!r}, limit_train=500,\n"
        "                   progress=False, echo=lines.append)\n"
        "print(json.dumps({'payload': payload, 'lines': lines}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    got = json.loads(run.stdout.splitlines()[-1])
    payload, text = got["payload"], "\n".join(got["lines"])
    assert payload == json.loads((out / "results.json").read_text())
    accs = payload["test_accuracy"]
    for label in ("naive average + REPAIR", "naive average + REPAIR on the 200-image coreset"):
        assert f"merged: {label}" in text and set(accs[f"merged: {label}"]) == {
            "mnist", "fashion-mnist"
        }  # fmt: skip
    cross = payload["cross_dataset"]
    coreset = accs["merged: naive average + REPAIR on the 200-image coreset"]
    assert cross["naive_repair_coreset"] == pytest.approx(sum(coreset.values()) / 2)
    assert cross["naive_repair_sample"] == pytest.approx(
        sum(accs["merged: naive average + REPAIR"].values()) / 2
    )
    assert set(payload) == {
        "test_accuracy", "cross_dataset", "three_mnist_models", "settings", "merge_data",
        "checkpoints",
    }  # fmt: skip
