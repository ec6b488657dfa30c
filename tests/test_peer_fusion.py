"""The official neuron-interpolation (KF-Linear) peer, mostly without the peer installed (CI
never has it): a missing or broken peer folder is recorded as "not run" with the reason and how
to unpack it, the entry says which head our kf-linear used, the converter between our MLP and
their BaseModel subclass is exact, and the entry names no machine paths. One test runs their
code end to end on tiny models when the peer folder is there."""

from __future__ import annotations

import sys
from collections import namedtuple
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from symmerge.io import save_checkpoint
from symmerge.models import create_model
from symmerge.report import peer_fusion, peers
from symmerge.report.checkpoints import file_sha256
from symmerge.report.settings import Setting, settings_for

#: The setting the peer runs on (two MLPs on non-iid splits of MNIST).
NON_IID: Setting = settings_for("cpu")["non-iid"]

# stand-ins for their models/base_model.py (BaseModel's constructor, the two NamedTuples)
WeightRepresentation = namedtuple("WeightRepresentation", "name weight layer")
LevelRepresentation = namedtuple("LevelRepresentation", "name output_width network")


class _Base(nn.Module):
    def __init__(self, train_indices: Any, val_indices: Any) -> None:
        super().__init__()


PeerMLP = peer_fusion.peer_mlp_class(_Base, WeightRepresentation, LevelRepresentation)


def _checkpoints(tmp_path: Path, n: int = 2, counts: bool = False, **kw: Any) -> list[Path]:
    paths = []
    for k in range(n):
        torch.manual_seed(k)
        model, config = create_model("mlp", **{"width": 8, "depth": 2, **kw})
        meta = {"class_counts": [k + 1] * 10} if counts else {}
        paths.append(save_checkpoint(tmp_path / f"m{k}.safetensors", model, config, meta))
    return paths


def _data() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """Small valid merge data and its record, for runs that stop before reading it."""
    return ([(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))],
            {"n": 2, "sha256": "0" * 64})  # fmt: skip


def _never(model: nn.Module) -> dict:
    raise AssertionError("a peer that did not run has nothing to evaluate")


def test_missing_folder_is_not_run_with_the_reason_and_unpack_command(tmp_path: Path) -> None:
    paths = _checkpoints(tmp_path, counts=True)
    folder = tmp_path / "peers" / "neuron-interpolation"
    entry = peer_fusion.run_fusion(paths, _never, seed=0, setting=NON_IID, data=_data(),
                                   folder=folder, threads=1)  # fmt: skip
    assert entry["peer"] == "neuron-interpolation-official" and entry["status"] == "not run"
    assert str(folder / "src" / "fusion_algorithms" / "hf_kf.py") in entry["reason"]
    assert entry["folder"] == str(folder) and entry["version"] is None
    assert entry["metrics"] is None and entry["seconds"] is None and entry["data"] is None
    assert "AndrewSpano/neuron-interpolation-model-fusion" in entry["install"]
    assert "archive HEAD fusion_algorithms models utils" in entry["install"]
    assert f"tar -x -C {folder}/src" in entry["install"]
    assert f"rev-parse HEAD > {folder}/COMMIT" in entry["install"]
    assert entry["checkpoints"] == [file_sha256(p) for p in paths] and entry["threads"] == 1
    assert "fusion_method='k_means'" in entry["call"] and "'uniform'" in entry["call"]
    assert "set_seed(42)" in entry["call"] and entry["peer_seed"] == 42
    # the checkpoints record class counts: our kf-linear (head='auto') is class-share
    assert entry["peer_head"] == "mean" and entry["ours_head"] == "class-share"
    assert "NOT the head target of our kf-linear" in entry["notes"]


def test_same_head_is_said_when_ours_averages_logits_too(tmp_path: Path) -> None:
    entry = peer_fusion.run_fusion(_checkpoints(tmp_path), _never, seed=0, setting=NON_IID,
                                   data=_data(), folder=tmp_path / "none")  # fmt: skip
    assert entry["ours_head"] == "mean" and "same head target" in entry["notes"]


def test_ours_head_follows_kf_linears_auto() -> None:
    assert peer_fusion.ours_head({}, [[1, 2], [3, 4]]) == "class-share"
    assert peer_fusion.ours_head({}, [[1, 2], None]) == "mean"
    assert peer_fusion.ours_head({"head": "mean"}, [[1, 2], [3, 4]]) == "mean"
    # the report's settings give kf-linear no head option: their non-iid ones run 'auto'
    for scale in ("smoke", "cpu"):
        assert "kf-linear" not in settings_for(scale)["non-iid"].params


def test_a_head_option_of_the_setting_is_read(tmp_path: Path) -> None:
    paths = _checkpoints(tmp_path, counts=True)  # 'auto' would be class-share
    entry = peer_fusion.run_fusion(paths, _never, seed=0, setting=NON_IID, data=_data(),
                                   folder=tmp_path / "none")  # fmt: skip
    assert entry["ours_head"] == "class-share"
    assert "NOT the head target of our kf-linear" in entry["notes"]
    mean = replace(NON_IID, params={"kf-linear": {"head": "mean"}})
    entry = peer_fusion.run_fusion(paths, _never, seed=0, setting=mean, data=_data(),
                                   folder=tmp_path / "none")  # fmt: skip
    assert entry["ours_head"] == "mean" and "same head target" in entry["notes"]
    assert entry["peer_head"] == "mean" and entry["status"] == "not run"
    # another method's keywords are not kf-linear's
    other = replace(NON_IID, params={"zipit": {"head": "mean"}})
    entry = peer_fusion.run_fusion(paths, _never, seed=0, setting=other, data=_data(),
                                   folder=tmp_path / "none")  # fmt: skip
    assert entry["ours_head"] == "class-share"


def test_wrong_number_of_models_fails_with_the_reason(tmp_path: Path) -> None:
    entry = peer_fusion.run_fusion(_checkpoints(tmp_path, 3), _never, seed=0,
                                   setting=settings_for("cpu")["n-models"], data=_data(),
                                   folder=tmp_path / "x")  # fmt: skip
    assert entry["status"] == "failed" and "got 3" in entry["reason"]
    assert entry["data"] is None and entry["metrics"] is None


def test_default_folder_is_under_the_peer_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    monkeypatch.setenv(peers.PEERS_ENV, str(tmp_path / "root"))
    entry = peer_fusion.run_fusion(_checkpoints(tmp_path), _never, seed=0, setting=NON_IID,
                                   data=_data())  # fmt: skip
    assert entry["status"] == "not run"
    assert entry["folder"] == str(tmp_path / "root" / "neuron-interpolation")


def test_broken_source_is_not_run_with_the_import_error(tmp_path: Path) -> None:
    folder = tmp_path / "neuron-interpolation"
    (folder / "src" / "fusion_algorithms").mkdir(parents=True)
    (folder / "src" / "fusion_algorithms" / "hf_kf.py").write_text("raise ImportError('no')")
    (folder / "COMMIT").write_text("0123abc\n")
    entry = peer_fusion.run_fusion(_checkpoints(tmp_path), _never, seed=0, setting=NON_IID,
                                   data=_data(), folder=folder)  # fmt: skip
    assert entry["status"] == "not run"
    assert entry["reason"].startswith(
        f"cannot import the official neuron-interpolation code from {folder}: "
    )  # fmt: skip
    assert "ImportError: no" in entry["reason"]
    assert entry["package"].endswith("@0123abc") and entry["version"] == "0123abc"


def test_entry_names_no_machine_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(peers.PEERS_ENV, raising=False)
    entry = peer_fusion.run_fusion(_checkpoints(tmp_path), _never, seed=0, setting=NON_IID,
                                   data=_data())  # fmt: skip
    assert entry["folder"] == "~/.cache/symmerge/peers/neuron-interpolation"
    texts = [v for v in entry.values() if isinstance(v, str)]
    assert not any(str(home) in t or sys.executable in t for t in texts)
    assert "~/.cache/symmerge/peers/neuron-interpolation/src" in entry["install"]


@pytest.mark.parametrize("width", [512, 24])
def test_converter_round_trip_is_exact(width: int) -> None:
    """Our MLP (the setting's 784-512x3-10, and a narrow one) -> PeerMLP -> ours."""
    torch.manual_seed(0)
    model, _ = create_model("mlp", width=width, depth=3)
    ours = model.state_dict()
    assert peer_fusion.mlp_sizes(ours) == [784, width, width, width, 10]
    peer = peer_fusion.to_peer_model(PeerMLP, model)
    assert not peer.training and peer.state_dict().keys() == ours.keys()
    assert all(torch.equal(peer.state_dict()[k], ours[k]) for k in ours)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(peer(x), model(x))
        # what their LSFusion fuses: the 4 Linear layers in order, the very parameters
        layers = peer.get_ordered_trainable_named_layers
        assert [r.name for r in layers] == ["layers.1", "layers.3", "layers.5", "layers.7"]
        assert all(r.weight is r.layer.weight for r in layers)
        levels = peer.get_ordered_trainable_named_levels
        assert [lv.output_width for lv in levels] == [width, width, width, 10]
        assert torch.equal(peer.forward_until_level(x, 0), model.layers[:3](x))
        assert torch.equal(peer.forward_until_level(x, -1), model(x))
        twin = peer.copy_model()
        assert type(twin) is PeerMLP and twin is not peer and torch.equal(twin(x), model(x))
    back = peer_fusion.from_peer_state_dict(peer.state_dict())
    fresh, _ = create_model("mlp", width=width, depth=3)
    fresh.load_state_dict(back)
    assert all(torch.equal(fresh.state_dict()[k], ours[k]) for k in ours)


def test_converter_refuses_other_models() -> None:
    model, _ = create_model("mlp", width=4, depth=1)
    sd = dict(model.state_dict())
    with pytest.raises(ValueError, match="not a symmerge MLP"):
        peer_fusion.mlp_sizes({**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="does not chain"):
        peer_fusion.mlp_sizes({**sd, "layers.3.weight": torch.zeros(10, 5)})
    with pytest.raises(ValueError, match="not a symmerge MLP"):
        peer_fusion.from_peer_state_dict({"fc.weight": torch.zeros(2, 2)})


def test_the_real_peer_end_to_end_on_tiny_models(tmp_path: Path) -> None:
    folder = peers.default_peer_root() / peer_fusion.SUBFOLDER
    if not (folder / "src" / "fusion_algorithms" / "hf_kf.py").is_file():
        pytest.skip(f"the official neuron-interpolation code is not unpacked in {folder}: "
                    + peer_fusion.fusion_install_command(folder))  # fmt: skip
    paths = _checkpoints(tmp_path, width=16)
    torch.manual_seed(5)
    batches = [(torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))) for _ in range(4)]
    record = {"n": 128, "sha256": "f" * 64}
    seen: list[nn.Module] = []

    def evaluate(model: nn.Module) -> dict:
        seen.append(model)
        return {"accuracy": 0.5}

    entry = peer_fusion.run_fusion(paths, evaluate, seed=0, setting=NON_IID,
                                   data=(batches, record), folder=folder, threads=1)  # fmt: skip
    assert entry["status"] == "ok", entry["reason"]
    assert entry["version"] == (folder / "COMMIT").read_text().strip()
    assert entry["metrics"] == {"accuracy": 0.5} and entry["data"] == record
    assert entry["seconds"] == entry["timings"]["total_s"] > 0
    assert entry["timings"]["first_call_s"] > 0 and entry["kmeans_early_stops"] >= 0
    conv = entry["conversion"]
    assert conv["images"] == 128 and max(conv["max_abs_logit_diff"]) <= 1e-5
    assert conv["merged_max_abs_logit_diff"] <= 1e-5
    (merged,) = seen
    parents = [create_model("mlp", width=16, depth=2)[0] for _ in paths]
    for p, path in zip(parents, paths, strict=True):
        from symmerge.io import load_checkpoint

        p.load_state_dict(load_checkpoint(path)[0].state_dict())
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        target = (parents[0](x) + parents[1](x)) / 2  # their head's target: averaged logits
        fused = merged(x)
    assert not any(torch.equal(fused, p(x)) for p in parents)
    # the head is the least-squares fit (with a bias) of the averaged logits on the fused
    # features: closer to them than the best constant
    assert ((fused - target) ** 2).sum() < ((target.mean(0) - target) ** 2).sum()
