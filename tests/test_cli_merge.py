"""`symmerge merge` / `interpolate`: results, and bad input that must write nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from symmerge.cli import main
from symmerge.io import save_checkpoint
from symmerge.models import create_model

pytestmark = pytest.mark.skipif(
    not os.environ.get("SYMMERGE_DATA"), reason="needs SYMMERGE_DATA (CI sets it)"
)


def _ckpt(path: Path, seed: int, width: int = 32, nan: bool = False) -> Path:
    torch.manual_seed(seed)
    model, config = create_model("mlp", depth=2, width=width)
    if nan:
        with torch.no_grad():
            next(model.parameters())[0, 0] = float("nan")
    save_checkpoint(path, model, config, {"dataset": "mnist", "classes": None, "seed": seed})
    return path


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_merge_writes_a_checkpoint_and_a_table(tmp_path: Path) -> None:
    a, b = _ckpt(tmp_path / "a.safetensors", 0), _ckpt(tmp_path / "b.safetensors", 1)
    out = tmp_path / "ab.safetensors"
    code, text = _run("merge", str(a), str(b), "--method", "weight", "-o", str(out),
                      "--eval-limit", "200", "--json", str(tmp_path / "r.json"))  # fmt: skip
    assert code == 0, text
    assert out.exists() and "merged (weight)" in text and (tmp_path / "r.json").exists()
    code, text = _run("merge", str(a), str(b), "--method", "weight", "-o", str(out))
    assert code != 0 and "exists" in text  # never overwritten silently


def test_merging_batchnorm_models_without_renormalisation_says_how_to_fix_it(
    tmp_path: Path,
) -> None:
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model, config = create_model("resnet20", width=1, input_shape=[1, 28, 28])
        paths.append(tmp_path / f"r{seed}.safetensors")
        save_checkpoint(paths[-1], model, config, {"dataset": "mnist", "classes": None})
    common = ["merge", *map(str, paths), "--method", "weight", "--eval-limit", "50"]
    code, text = _run(*common, "-o", str(tmp_path / "plain.safetensors"))
    assert code == 0, text
    assert "BatchNorm statistics are averages" in text and "--reset-bn" in text
    code, text = _run(*common, "-o", str(tmp_path / "reset.safetensors"), "--reset-bn",
                      "--data", "mnist", "--data-samples", "100")  # fmt: skip
    assert code == 0, text
    assert "BatchNorm statistics are averages" not in text
    mlps = [str(_ckpt(tmp_path / f"m{k}.safetensors", k)) for k in (0, 1)]
    code, text = _run("merge", *mlps, "-o", str(tmp_path / "m.safetensors"))
    assert code == 0 and "BatchNorm" not in text  # no BatchNorm, no note


@pytest.mark.parametrize(
    "case, expected",
    [("same-as-input", "one of the inputs"), ("widths", "different width"),
     ("nan", "non-finite"), ("no-data", "needs data"), ("truncated", "")],
)  # fmt: skip
def test_bad_input_writes_nothing(tmp_path: Path, case: str, expected: str) -> None:
    a, b = _ckpt(tmp_path / "a.safetensors", 0), _ckpt(tmp_path / "b.safetensors", 1)
    out = tmp_path / "out.safetensors"
    method = "weight"
    if case == "same-as-input":
        out = a
    elif case == "widths":  # a method that needs equal widths
        b = _ckpt(tmp_path / "c.safetensors", 1, width=16)
        method = "naive"
    elif case == "nan":
        b = _ckpt(tmp_path / "n.safetensors", 1, nan=True)
    elif case == "no-data":
        method = "activation"
    elif case == "truncated":
        b = tmp_path / "t.safetensors"
        b.write_bytes(a.read_bytes()[:100])
    before = a.read_bytes()
    code, text = _run("merge", str(a), str(b), "--method", method, "-o", str(out))
    assert code != 0 and expected in text
    assert a.read_bytes() == before
    if out != a:
        assert not out.exists()


def test_interpolate_plots_and_reports_barriers(tmp_path: Path) -> None:
    a, b = _ckpt(tmp_path / "a.safetensors", 0), _ckpt(tmp_path / "b.safetensors", 1)
    png = tmp_path / "curve.png"
    code, text = _run("interpolate", str(a), str(b), "--steps", "3", "--eval-limit", "200",
                      "--plot", str(png))  # fmt: skip
    assert code == 0, text
    assert "loss barrier" in text and png.read_bytes()[:4] == b"\x89PNG"


def _subset_ckpt(path: Path, seed: int, classes: list[int]) -> Path:
    """A briefly trained MNIST MLP on a class subset (10-way head, as `train --classes`)."""
    from symmerge.train import train_model

    config = {"arch": "mlp", "kwargs": {"depth": 2, "width": 32}}
    net, info = train_model(config, "mnist", epochs=1, seed=seed, classes=classes,
                            limit_train=2000, limit_test=300, progress=False)  # fmt: skip
    _, config = create_model("mlp", depth=2, width=32)
    save_checkpoint(path, net, config, {**info, "dataset": "mnist", "classes": classes})
    return path


def test_per_task_heads_record_the_label_space_and_reload(tmp_path: Path) -> None:
    a = _subset_ckpt(tmp_path / "a.safetensors", 0, [0, 1, 2, 3, 4])
    b = _subset_ckpt(tmp_path / "b.safetensors", 1, [5, 6, 7, 8, 9])
    out = tmp_path / "ens.safetensors"
    code, text = _run("merge", str(a), str(b), "--method", "ensemble", "--heads", "per-task",
                      "-o", str(out), "--eval-limit", "200")  # fmt: skip
    assert code == 0, text
    assert "joint" in text and "10:20" in text
    from symmerge.evaluate import task_accuracy
    from symmerge.io import load_checkpoint

    merged, meta = load_checkpoint(out)
    assert meta["classes"] == list(range(10)) and meta["config"]["resize"]["num_outputs"] == 20
    assert [t["logits"] for t in meta["tasks"]] == [[0, 10], [10, 20]]
    # the side-by-side trunk with per-task heads is each source on its own task
    res = task_accuracy(merged, "mnist", meta["tasks"], limit=200)
    for k, path in enumerate((a, b)):
        source, smeta = load_checkpoint(path)
        own = task_accuracy(source, "mnist", [{"classes": smeta["classes"], "logits": [0, 10]}],
                            limit=200)  # fmt: skip
        assert res["tasks"][k]["accuracy"] == own["tasks"][0]["accuracy"]
    code, text = _run("eval", str(out), "--limit", "100", "--probe", "20")  # recorded tasks
    assert code == 0 and "joint" in text and "task 1" in text, text
    assert "linear probe on the input of" in text and "fit" in text
    # a merged (resized) checkpoint merges again: the result reloads with its recorded widths
    again = tmp_path / "again.safetensors"
    code, text = _run("merge", str(out), str(out), "--method", "weight", "-o", str(again),
                      "--eval-limit", "50")  # fmt: skip
    assert code == 0, text
    reloaded, meta2 = load_checkpoint(again)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), merged(x), atol=1e-5)
    assert [t["logits"] for t in meta2["tasks"]] == [[0, 10], [10, 20]]


def test_pleas_block_sparse_checkpoint_reloads_with_the_budgeted_compute(tmp_path: Path) -> None:
    """`merge -m pleas -p budget=1.5 --block-sparse`: the saved model computes only its
    non-zero blocks (1.5x one model's multiply-adds, counted), reloads, and computes what the
    dense merge does; a budget outside [1, 2] writes nothing."""
    from symmerge.blocksparse import masks_of
    from symmerge.flops import count_compute
    from symmerge.io import load_checkpoint

    a, b = _ckpt(tmp_path / "a.safetensors", 0), _ckpt(tmp_path / "b.safetensors", 1)
    common = [str(a), str(b), "-m", "pleas", "--data", "mnist", "--data-samples", "256",
              "--eval-limit", "200"]  # fmt: skip
    sparse, dense = tmp_path / "sparse.safetensors", tmp_path / "dense.safetensors"
    code, text = _run("merge", *common, "-p", "budget=1.5", "--block-sparse", "-o", str(sparse))
    assert code == 0, text
    code, text = _run("merge", *common, "-p", "budget=1.5", "-o", str(dense))
    assert code == 0, text
    m_sparse, meta = load_checkpoint(sparse)
    m_dense, _ = load_checkpoint(dense)
    assert masks_of(m_sparse) and not masks_of(m_dense)
    x = torch.randn(4, *m_dense.input_shape)
    one = count_compute(create_model("mlp", depth=2, width=32)[0], (x,)).macs
    assert count_compute(m_sparse, (x,)).macs / one == pytest.approx(
        meta["result"]["details"]["budget"]
    )
    assert abs(meta["result"]["details"]["budget"] - 1.5) < 0.015
    with torch.no_grad():
        torch.testing.assert_close(m_sparse(x), m_dense(x), rtol=1e-5, atol=1e-5)
    bad = tmp_path / "bad.safetensors"
    code, text = _run("merge", *common, "-p", "budget=2.5", "-o", str(bad))
    assert code != 0 and "budget" in text and not bad.exists()


@pytest.mark.parametrize(
    ("param", "wants"),
    [
        ("steps=abc", "takes steps as int | none; got 'abc'"),
        ("lr=true", "takes lr as float; got 'true'"),
        ("keep=3", "takes keep as str; got '3'"),
        ("init=sinkhorn", "takes init as Mapping (from Python only) | none"),
        ("finetune=x", "takes finetune as int; got 'x'"),
    ],
)
def test_a_param_of_the_wrong_type_is_a_usage_error(tmp_path: Path, param: str, wants: str) -> None:
    a, b = _ckpt(tmp_path / "a.safetensors", 0), _ckpt(tmp_path / "b.safetensors", 1)
    out = tmp_path / "ab.safetensors"
    code, text = _run("merge", str(a), str(b), "-m", "ste", "-p", param, "--data", "mnist",
                      "--data-samples", "50", "-o", str(out))  # fmt: skip
    assert code == 2 and wants in " ".join(text.split()), text
    assert not out.exists()
