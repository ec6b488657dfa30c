"""The official-C2M3 peer without the peer installed (CI never has it): a missing or broken
peer folder is recorded as "not run" with the reason and how to install it, and the name
converter between our MLP and their MLP is exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from symmerge.io import save_checkpoint
from symmerge.models import create_model
from symmerge.report import peer_c2m3, peers
from symmerge.report.checkpoints import file_sha256


def _checkpoints(tmp_path: Path, n: int = 3) -> list[Path]:
    paths = []
    for k in range(n):
        torch.manual_seed(k)
        model, config = create_model("mlp", width=8, depth=2)
        paths.append(save_checkpoint(tmp_path / f"m{k}.safetensors", model, config, {}))
    return paths


def _never(model: torch.nn.Module) -> dict:
    raise AssertionError("a peer that did not run has nothing to evaluate")


def test_missing_folder_is_not_run_with_the_reason_and_install(tmp_path: Path) -> None:
    paths = _checkpoints(tmp_path)
    folder = tmp_path / "peers" / "c2m3"
    entry = peer_c2m3.run_c2m3(paths, _never, seed=0, folder=folder, threads=1)
    assert entry["peer"] == "c2m3-official" and entry["status"] == "not run"
    assert str(folder) in entry["reason"] and entry["folder"] == str(folder)
    assert entry["metrics"] is None and entry["seconds"] is None and entry["version"] is None
    assert "crisostomi/cycle-consistent-model-merging" in entry["install"]
    assert f"archive HEAD src | tar -x -C {folder}" in entry["install"]
    assert f"--no-deps --ignore-requires-python --target {folder / 'site'} " in entry["install"]
    assert all(p in entry["install"] for p in peer_c2m3.C2M3_PACKAGES)
    assert entry["checkpoints"] == [file_sha256(p) for p in paths]
    assert "max_iter=200" in entry["call"] and "'sinkhorn'" in entry["call"]
    assert "wandb" in entry["notes"] and "scipy.misc.derivative" in entry["notes"]


def test_default_folder_is_under_the_peer_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    monkeypatch.setenv(peers.PEERS_ENV, str(tmp_path / "root"))
    entry = peer_c2m3.run_c2m3(_checkpoints(tmp_path, 2), _never, seed=0, threads=1)
    assert entry["status"] == "not run" and entry["folder"] == str(tmp_path / "root" / "c2m3")


def test_broken_source_is_not_run_with_the_import_error(tmp_path: Path) -> None:
    folder = tmp_path / "c2m3"
    (folder / "src" / "ccmm").mkdir(parents=True)
    (folder / "src" / "ccmm" / "__init__.py").write_text("raise ImportError('broken on purpose')")
    (folder / "COMMIT").write_text("0123abc\n")
    entry = peer_c2m3.run_c2m3(_checkpoints(tmp_path, 2), _never, seed=0, folder=folder)
    assert entry["status"] == "not run"
    assert entry["reason"].startswith(f"cannot import the official C2M3 from {folder}: ")
    assert entry["package"].endswith("@0123abc") and entry["version"] == "0123abc"


@pytest.mark.parametrize("depth", [1, 3])
def test_state_dict_round_trip_is_exact(depth: int) -> None:
    model, _ = create_model("mlp", width=12, depth=depth)
    ours = model.state_dict()
    theirs = peer_c2m3.to_c2m3_state_dict(ours)
    assert list(theirs) == [f"layer{k}.{p}" for k in range(depth + 1) for p in ("weight", "bias")]
    assert theirs[f"layer{depth}.weight"].shape == (10, 12)
    back = peer_c2m3.from_c2m3_state_dict(theirs)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    # their-named module (what their merger gets) holds exactly these tensors
    net = peer_c2m3._as_module(theirs)
    assert all(torch.equal(net.state_dict()[k], theirs[k]) for k in theirs)


def test_converter_refuses_other_models() -> None:
    model, _ = create_model("mlp", width=4, depth=1)
    sd = dict(model.state_dict())
    with pytest.raises(ValueError, match="not a symmerge MLP"):
        peer_c2m3.to_c2m3_state_dict({**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a C2M3 MLP"):
        peer_c2m3.from_c2m3_state_dict(sd)


def test_peer_entries_name_no_machine_paths() -> None:
    import sys

    from symmerge.report.peers import portable_entry

    home = str(Path.home())
    entry = {"install": f"{sys.executable} -m pip install --target {home}/x y", "seconds": 1.0}
    assert portable_entry(entry) == {"install": "python -m pip install --target ~/x y",
                                     "seconds": 1.0}  # fmt: skip
