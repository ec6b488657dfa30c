"""Checkpoint round trips, overwrite protection and the error messages users will see."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import symmerge
from symmerge import models
from symmerge.io import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
    sidecar_path,
)


@pytest.fixture
def mlp() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    return models.create_model("mlp", width=16, depth=2)


META = {
    "dataset": "mnist",
    "classes": [0, 1, 2, 3, 4],
    "seed": 3,
    "epochs": 2,
    "test_accuracy": 0.9731,
    "train_time_s": 12.5,
    "device": "cpu",
}


def _outputs(model: nn.Module) -> torch.Tensor:
    x = torch.randn(8, *model.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x)


def test_round_trip_outputs_and_metadata(tmp_path: Path, mlp: tuple[nn.Module, dict]) -> None:
    model, config = mlp
    path = save_checkpoint(tmp_path / "m.safetensors", model, config, META)
    loaded, meta = load_checkpoint(path)

    assert type(loaded) is type(model)
    assert not loaded.training
    assert torch.equal(_outputs(loaded), _outputs(model))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)

    assert meta["config"] == config
    for key, value in META.items():
        assert meta[key] == value
    assert meta["symmerge_version"] == symmerge.__version__
    assert meta["torch_version"] == torch.__version__
    assert meta["date"]
    assert read_checkpoint_metadata(path) == meta

    # the header (authoritative) and the sidecar carry the same document
    with safe_open(str(path), framework="pt") as f:
        header_doc = json.loads(f.metadata()["symmerge"])
    assert json.loads(sidecar_path(path).read_text()) == header_doc
    assert header_doc["format_version"] == 2


def test_refuses_to_overwrite(tmp_path: Path, mlp: tuple[nn.Module, dict]) -> None:
    model, config = mlp
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, config, META)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        save_checkpoint(path, model, config, META)
    assert path.read_bytes() == before

    # a leftover sidecar alone also blocks, so metadata is never mismatched silently
    path.unlink()
    with pytest.raises(FileExistsError, match="json"):
        save_checkpoint(path, model, config, META)

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    save_checkpoint(path, model, config, {**META, "seed": 4}, overwrite=True)
    loaded, meta = load_checkpoint(path)
    assert meta["seed"] == 4
    assert torch.equal(_outputs(loaded), _outputs(model))
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_plain_safetensors_without_metadata(tmp_path: Path, mlp: tuple[nn.Module, dict]) -> None:
    model, _ = mlp
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="no symmerge metadata"):
        load_checkpoint(path)


def test_sidecar_is_used_when_header_lacks_metadata(
    tmp_path: Path, mlp: tuple[nn.Module, dict]
) -> None:
    model, config = mlp
    path = save_checkpoint(tmp_path / "m.safetensors", model, config, META)
    # rewrite the weights without header metadata, keeping the sidecar
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded, meta = load_checkpoint(path)
    assert meta["seed"] == META["seed"]
    assert torch.equal(_outputs(loaded), _outputs(model))


def test_invalid_metadata(tmp_path: Path, mlp: tuple[nn.Module, dict]) -> None:
    model, _ = mlp
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={"symmerge": "{not json"})
    with pytest.raises(CheckpointError, match="invalid symmerge metadata JSON"):
        load_checkpoint(path)
    save_file(tensors, str(path), metadata={"symmerge": json.dumps({"format": "other"})})
    with pytest.raises(CheckpointError, match="does not contain a symmerge checkpoint"):
        load_checkpoint(path)
    doc = {"format": "symmerge.checkpoint", "format_version": 99, "config": {"arch": "mlp"}}
    save_file(tensors, str(path), metadata={"symmerge": json.dumps(doc)})
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(path)
    doc = {"format": "symmerge.checkpoint", "format_version": 1, "config": {"arch": "nope"}}
    save_file(tensors, str(path), metadata={"symmerge": json.dumps(doc)})
    with pytest.raises(CheckpointError, match="cannot rebuild architecture 'nope'"):
        load_checkpoint(path)


def test_state_dict_mismatch(tmp_path: Path, mlp: tuple[nn.Module, dict]) -> None:
    model, config = mlp
    wrong = {"arch": "mlp", "kwargs": {**config["kwargs"], "width": 32}}
    path = save_checkpoint(tmp_path / "m.safetensors", model, wrong, META)
    with pytest.raises(CheckpointError, match=r"do not match.*shape.*\(16, 784\) vs model \(32"):
        load_checkpoint(path)
    deeper = {"arch": "mlp", "kwargs": {**config["kwargs"], "depth": 3}}
    path = save_checkpoint(tmp_path / "d.safetensors", model, deeper, META)
    with pytest.raises(CheckpointError, match="missing: layers.7.weight, layers.7.bias"):
        load_checkpoint(path)


def test_metadata_must_be_json(tmp_path: Path, mlp: tuple[nn.Module, dict]) -> None:
    model, config = mlp
    with pytest.raises(ValueError, match="'when'"):
        save_checkpoint(tmp_path / "m.safetensors", model, config, {"when": object()})
    assert not (tmp_path / "m.safetensors").exists()


class _Tied(nn.Module):
    """Embedding reused as the output projection, plus two buffers viewing one storage."""

    input_shape = (1, 1, 4)

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.embed.weight
        base = torch.arange(10.0)
        self.register_buffer("low", base[:4])
        self.register_buffer("high", base[4:])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(idx)) + self.low.sum() + self.high.sum()


def test_tied_and_shared_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "build_model", lambda arch, **kw: _Tied())
    torch.manual_seed(0)
    model = _Tied()
    path = save_checkpoint(tmp_path / "tied.safetensors", model, {"arch": "tied"}, {})
    with safe_open(str(path), framework="pt") as f:
        stored = set(f.keys())
    assert "out.weight" not in stored and "embed.weight" in stored  # tied weight stored once
    doc = json.loads(sidecar_path(path).read_text())
    assert doc["aliases"] == {"out.weight": "embed.weight"}

    torch.manual_seed(1)
    loaded, _ = load_checkpoint(path)
    assert loaded.out.weight is loaded.embed.weight
    idx = torch.tensor([0, 3, 4])
    assert torch.equal(loaded(idx), model(idx))
    assert torch.equal(loaded.high, torch.arange(4.0, 10.0))


def test_torch_saved_module(tmp_path: Path, mlp: tuple[nn.Module, dict]) -> None:
    model, _ = mlp
    path = tmp_path / "user.pt"
    torch.save(model, path)
    with pytest.raises(CheckpointError, match="trust"):
        load_checkpoint(path)  # unpickling runs code from the file: only when asked
    loaded, meta = load_checkpoint(path, trust_pickle=True)
    assert meta == {}
    assert torch.equal(_outputs(loaded), _outputs(model))
    assert read_checkpoint_metadata(path) == {}

    torch.save(model.state_dict(), tmp_path / "sd.pth")
    with pytest.raises(CheckpointError, match="state_dict"):
        load_checkpoint(tmp_path / "sd.pth")

    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="neither a safetensors"):
        load_checkpoint(tmp_path / "junk.pt")
