"""The official-ZipIt! peer without the peer installed (CI never has it): a missing or broken
peer folder is recorded as "not run" with the reason and how to unpack it (a setting with one
shared head is not run either), the converter
between our ResNet-20 and theirs is exact (and their 3x3 shortcut computes our 1x1 one), and
an entry names no machine paths. One test runs the real peer on tiny random models, skipped
when its folder is absent."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _toy_models import cifar_noise

from symmerge.io import save_checkpoint
from symmerge.models import create_model
from symmerge.report import peer_zipit, peers
from symmerge.report.checkpoints import file_sha256
from symmerge.report.settings import Setting, settings_for

#: The setting the peer runs on (ZipIt!'s disjoint tasks: a head per task).
DISJOINT: Setting = settings_for("cpu")["resnet20-disjoint"]


def _resnet(seed: int, width: int = 1) -> torch.nn.Module:
    """A ResNet-20 (BatchNorm) with random weights and non-trivial running statistics."""
    torch.manual_seed(seed)
    model, _ = create_model("resnet20", width=width)
    with torch.no_grad():
        model.train()
        model(torch.randn(8, 3, 32, 32))
    return model.eval()


def _checkpoints(tmp_path: Path, n: int = 2) -> list[Path]:
    paths = []
    for k in range(n):
        _, config = create_model("resnet20", width=1)
        meta = {"dataset": "cifar10", "model_name": "resnet20", "classes": [5 * k + c for c in
                range(5)]}  # fmt: skip
        paths.append(save_checkpoint(tmp_path / f"r{k}.safetensors", _resnet(k), config, meta))
    return paths


def _data() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """Small valid merge data and its record, for runs that stop before reading it."""
    return ([(torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))],
            {"n": 2, "sha256": "0" * 64})  # fmt: skip


def _never(model: torch.nn.Module) -> dict:
    raise AssertionError("a peer that did not run has nothing to evaluate")


def test_missing_folder_is_not_run_with_the_reason_and_unpack_command(tmp_path: Path) -> None:
    paths = _checkpoints(tmp_path)
    folder = tmp_path / "peers" / "zipit"
    entry = peer_zipit.run_zipit(paths, _never, seed=0, setting=DISJOINT, data=_data(),
                                 folder=folder, threads=1)  # fmt: skip
    assert entry["peer"] == "zipit-official" and entry["status"] == "not run"
    assert entry["reason"] == (f"no official ZipIt! source in {folder} (expected "
                               f"{folder}/src/model_merger.py)")  # fmt: skip
    assert entry["metrics"] is None and entry["seconds"] is None and entry["version"] is None
    assert entry["data"] is None and entry["folder"] == str(folder)
    assert "gstoica27/ZipIt" in entry["install"]
    assert f"archive HEAD | tar -x -C {folder}/src" in entry["install"]
    assert f"rev-parse HEAD > {folder}/COMMIT" in entry["install"]
    assert entry["checkpoints"] == [file_sha256(p) for p in paths]
    assert "a=0.5, b=1.0" in entry["call"] and "stop_at=None" in entry["call"]
    assert "utils.reset_bn_stats(merge, batches)" in entry["call"]
    assert all(m in entry["notes"] for m in ("clip", "fvcore", "sklearn", "einops"))
    assert entry["params"] == {"alpha": 0.5, "beta": 1.0} and entry["heads"] == "per-task"


def test_default_folder_is_under_the_peer_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    monkeypatch.setenv(peers.PEERS_ENV, str(tmp_path / "root"))
    entry = peer_zipit.run_zipit(_checkpoints(tmp_path), _never, seed=0,
                                 setting=DISJOINT, data=_data(), threads=1)  # fmt: skip
    assert entry["status"] == "not run" and entry["folder"] == str(tmp_path / "root" / "zipit")


def test_broken_source_is_not_run_with_the_import_error(tmp_path: Path) -> None:
    folder = tmp_path / "zipit"
    (folder / "src" / "graphs").mkdir(parents=True)
    (folder / "src" / "model_merger.py").write_text("")
    (folder / "src" / "graphs" / "__init__.py").write_text("raise ImportError('broken on purpose')")
    (folder / "COMMIT").write_text("0123abc\n")
    entry = peer_zipit.run_zipit(_checkpoints(tmp_path), _never, seed=0,
                                 setting=DISJOINT, data=_data(), folder=folder)  # fmt: skip
    assert entry["status"] == "not run"
    assert entry["reason"].startswith(f"cannot import the official ZipIt! from {folder}: ")
    assert "broken on purpose" in entry["reason"]
    assert entry["package"] == "gstoica27/ZipIt@0123abc" and entry["version"] == "0123abc"


def test_a_setting_with_one_shared_head_is_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    def no_probe(folder: Path) -> Any:
        raise AssertionError("a shared-head setting is refused before the peer is looked for")

    monkeypatch.setattr(peer_zipit, "probe_zipit", no_probe)
    shared = settings_for("smoke")["same-task"]
    assert shared.heads == "shared"
    entry = peer_zipit.run_zipit(_checkpoints(tmp_path), _never, seed=0, setting=shared,
                                 data=_data(), folder=tmp_path)  # fmt: skip
    assert entry["peer"] == "zipit-official" and entry["status"] == "not run"
    assert entry["reason"] == ("the zipit-official run keeps a head per task; 'same-task' has "
                               "one shared head")  # fmt: skip
    assert "shared head" in entry["reason"]
    assert entry["metrics"] is None and entry["seconds"] is None and entry["version"] is None
    assert entry["data"] is None and entry["heads"] == "per-task"


@pytest.mark.parametrize("width", [1, 2])
def test_state_dict_round_trip_is_exact(width: int) -> None:
    ours = _resnet(0, width).state_dict()
    theirs = peer_zipit.to_zipit_state_dict(ours)
    assert len(theirs) == len(ours)
    assert not any("norm" in k or k.startswith("fc.") for k in theirs)
    assert theirs["linear.weight"].shape == (10, 64 * width)
    assert theirs["layer1.0.bn2.running_var"] is not ours["layer1.0.norm2.running_var"]
    for key in ("layer2.0.shortcut.0.weight", "layer3.0.shortcut.0.weight"):
        wide = theirs[key]
        assert wide.shape[2:] == (3, 3) and peer_zipit.off_centre(wide) == 0.0
        assert torch.equal(wide[:, :, 1, 1], ours[key][:, :, 0, 0])
    back = peer_zipit.from_zipit_state_dict(theirs)
    assert list(back) == list(ours)
    assert all(torch.equal(back[k], ours[k]) for k in ours)


def test_their_3x3_shortcut_is_our_1x1_shortcut() -> None:
    """Their shortcut conv (3x3, stride 2, padding 1) with our kernel at the centre tap gives
    our shortcut's output (1x1, stride 2, no padding) on the same input."""
    ours = _resnet(1).state_dict()["layer2.0.shortcut.0.weight"]
    theirs = peer_zipit.to_zipit_state_dict(_resnet(1).state_dict())["layer2.0.shortcut.0.weight"]
    x = torch.randn(2, 16, 32, 32)
    out = F.conv2d(x, theirs, stride=2, padding=1)
    assert out.shape == (2, 32, 16, 16)
    torch.testing.assert_close(out, F.conv2d(x, ours, stride=2), rtol=0, atol=1e-5)


def test_per_task_heads_are_stacked_in_order() -> None:
    theirs = peer_zipit.to_zipit_state_dict(_resnet(0).state_dict())
    heads = [(torch.randn(10, 64), torch.randn(10)) for _ in range(2)]
    back = peer_zipit.from_zipit_state_dict(theirs, heads)
    assert back["fc.weight"].shape == (20, 64) and back["fc.bias"].shape == (20,)
    assert torch.equal(back["fc.weight"][:10], heads[0][0])
    assert torch.equal(back["fc.weight"][10:], heads[1][0])
    assert torch.equal(back["fc.bias"][10:], heads[1][1])


def test_converters_refuse_off_centre_taps_and_other_models() -> None:
    theirs = peer_zipit.to_zipit_state_dict(_resnet(0).state_dict())
    theirs["layer3.0.shortcut.0.weight"][0, 0, 0, 2] = 0.25
    with pytest.raises(ValueError, match=r"layer3\.0\.shortcut\.0\.weight has off-centre taps"):
        peer_zipit.from_zipit_state_dict(theirs)
    mlp, _ = create_model("mlp", width=4, depth=1)
    with pytest.raises(ValueError, match="not a symmerge BatchNorm ResNet"):
        peer_zipit.to_zipit_state_dict(mlp.state_dict())
    with pytest.raises(ValueError, match="not a ZipIt ResNet"):
        peer_zipit.from_zipit_state_dict(_resnet(0).state_dict())


def test_entry_names_no_machine_paths(tmp_path: Path) -> None:
    home = str(Path.home())
    folder = Path(home) / ".cache" / "symmerge" / "peers" / "zipit-absent-for-a-test"
    assert not folder.exists()
    entry = peer_zipit.run_zipit(_checkpoints(tmp_path), _never, seed=0,
                                 setting=DISJOINT, data=_data(), folder=folder)  # fmt: skip
    texts = [v for v in entry.values() if isinstance(v, str)]
    assert entry["folder"] == "~/.cache/symmerge/peers/zipit-absent-for-a-test"
    assert not any(home + "/" in t or sys.executable in t for t in texts)
    assert "~/.cache/symmerge/peers/zipit-absent-for-a-test/src" in entry["install"]


def test_real_peer_end_to_end_on_tiny_models(tmp_path: Path) -> None:
    folder = peers.default_peer_root() / "zipit"
    if not (folder / "src" / "model_merger.py").is_file():
        pytest.skip(f"the official ZipIt! code is not unpacked in {folder} "
                    f"({peer_zipit.zipit_install_command(folder)})")  # fmt: skip
    paths = _checkpoints(tmp_path)
    data, record, x = cifar_noise()
    seen: list[torch.Tensor] = []

    def evaluate(model: torch.nn.Module) -> dict[str, Any]:
        with torch.no_grad():
            seen.append(model(x))
        return {"accuracy": 0.5}

    entry = peer_zipit.run_zipit(paths, evaluate, seed=0, setting=DISJOINT,
                                 data=(data, record), folder=folder, threads=1)  # fmt: skip
    assert entry["status"] == "ok", entry["reason"]
    assert entry["metrics"] == {"accuracy": 0.5} and entry["data"] == record
    assert seen[0].shape == (4, 20) and torch.isfinite(seen[0]).all()  # both 10-way heads
    assert entry["seconds"] == entry["timings"]["total_s"] > 0
    assert 0 <= entry["timings"]["matching_s"] <= entry["timings"]["transform_s"]
    assert {"first_call_s", "reset_bn_s", "subprocess_wall_s"} <= entry["timings"].keys()
    assert max(entry["conversion_max_abs_logit_diff"]) < 1e-4
    assert entry["shortcut_off_centre_max_abs"] == 0.0
    assert entry["merge_points"] == 12  # stem/stage streams, block insides, the pool input
    assert entry["checks"]["shared_head_vs_mean_of_heads_max_abs"] < 1e-5
    assert entry["checks"]["reset_bn_stats_vs_our_reset_bn_max_abs"] < 1e-5
    assert set(entry["stubs"]) <= set(peer_zipit.ZIPIT_STUBS)
    assert entry["version"] == (folder / "COMMIT").read_text().strip()
    assert len(entry["merged_weights_sha256"]) == 64


def test_a_checkpoint_that_does_not_load_is_failed_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    monkeypatch.setattr(peer_zipit, "probe_zipit", lambda folder: ("abc", "src", None))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    entry = peer_zipit.run_zipit([bad, bad], _never, seed=0, setting=DISJOINT, data=_data(),
                                 folder=tmp_path)  # fmt: skip
    assert entry["status"] == "failed" and entry["version"] == "abc"
    assert entry["reason"].startswith("reading the checkpoint: ")
