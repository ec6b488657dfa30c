"""The official-PLeaS peer: without the peer installed (CI never has it), a missing or broken
peer folder is recorded as "not run" with the reason and how to unpack it, and the state-dict
converter is exact; with the peer unpacked, one end-to-end run on tiny inputs."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _toy_models import cifar_noise

from symmerge.io import load_checkpoint, save_checkpoint
from symmerge.models import create_model
from symmerge.report import peer_pleas, peers
from symmerge.report.checkpoints import file_sha256
from symmerge.report.settings import Setting, settings_for

#: The setting the peer runs on (two MLPs on different datasets, the full merge).
CROSS: Setting = settings_for("cpu")["cross-dataset"]


def _checkpoints(tmp_path: Path, n: int = 2, width: int = 8) -> list[Path]:
    paths = []
    for k in range(n):
        torch.manual_seed(k)
        model, config = create_model("mlp", width=width, depth=2)
        paths.append(save_checkpoint(tmp_path / f"m{k}.safetensors", model, config, {}))
    return paths


def _data() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """Small valid merge data and its record, for runs that stop before reading it."""
    return ([(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))],
            {"n": 2, "sha256": "0" * 64})  # fmt: skip


def _never(model: torch.nn.Module) -> dict:
    raise AssertionError("a peer that did not run has nothing to evaluate")


def test_missing_folder_is_not_run_with_the_reason_and_unpack_command(tmp_path: Path) -> None:
    paths = _checkpoints(tmp_path)
    folder = tmp_path / "peers" / "pleas"
    entry = peer_pleas.run_pleas(paths, _never, seed=0, setting=CROSS, data=_data(),
                                 folder=folder, threads=1)  # fmt: skip
    assert entry["peer"] == "pleas-official" and entry["status"] == "not run"
    assert entry["reason"] == (f"no official PLeaS source in {folder} (expected "
                               f"{folder}/src/pleas)")  # fmt: skip
    assert entry["metrics"] is None and entry["seconds"] is None and entry["version"] is None
    assert entry["data"] is None and entry["folder"] == str(folder)
    assert "SewoongLab/PLeaS-Merging" in entry["install"]
    assert f"archive HEAD | tar -x -C {folder}/src" in entry["install"]
    assert f"rev-parse HEAD > {folder}/COMMIT" in entry["install"]
    assert entry["checkpoints"] == [file_sha256(p) for p in paths]
    assert f"MAX_STEPS={peer_pleas.MAX_STEPS}" in entry["call"]
    assert (
        "merging='perm_gradmask'" in entry["call"] and "separate_classifier=False" in entry["call"]
    )
    assert entry["stubs"] == ["gurobipy", "sklearn.model_selection", "torchmetrics"]
    assert all(m in entry["notes"] for m in entry["stubs"]) and "Tensor.cuda" in entry["notes"]


def test_default_folder_is_under_the_peer_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    monkeypatch.setenv(peers.PEERS_ENV, str(tmp_path / "root"))
    entry = peer_pleas.run_pleas(_checkpoints(tmp_path), _never, seed=0, setting=CROSS,
                                 data=_data())  # fmt: skip
    assert entry["status"] == "not run" and entry["folder"] == str(tmp_path / "root" / "pleas")


def test_broken_source_is_not_run_with_the_import_error(tmp_path: Path) -> None:
    folder = tmp_path / "pleas"
    (folder / "src" / "pleas").mkdir(parents=True)
    (folder / "src" / "pleas" / "__init__.py").write_text("raise ImportError('broken on purpose')")
    (folder / "COMMIT").write_text("0123abc\n")
    entry = peer_pleas.run_pleas(_checkpoints(tmp_path), _never, seed=0, setting=CROSS,
                                 data=_data(), folder=folder)  # fmt: skip
    assert entry["status"] == "not run"
    assert entry["reason"].startswith(f"cannot import the official PLeaS from {folder}: ")
    assert "broken on purpose" in entry["reason"]
    assert entry["package"].endswith("@0123abc") and entry["version"] == "0123abc"


@pytest.mark.parametrize("scale", ["smoke", "cpu"])
def test_settings_at_other_budgets_are_not_run(tmp_path: Path, scale: str) -> None:
    budgets = settings_for(scale)["budgets"]
    assert budgets.budgets == (1.0, 1.5, 2.0)
    entry = peer_pleas.run_pleas(_checkpoints(tmp_path), _never, seed=0, setting=budgets,
                                 data=_data(), folder=tmp_path / "absent")  # fmt: skip
    assert entry["status"] == "not run" and entry["data"] is None
    assert entry["reason"].startswith("the official PLeaS runs the full merge (1x) only")
    assert "'budgets' merges at budgets [1.0, 1.5, 2.0]" in entry["reason"]


def test_state_dict_round_trip_is_exact_on_the_setting_architecture() -> None:
    torch.manual_seed(0)
    model, _ = create_model("mlp")  # 784-512-512-512-10, the cross-dataset setting's
    ours = model.state_dict()
    theirs = peer_pleas.to_pleas_model(model)
    assert theirs is not model and not theirs.training
    assert isinstance(model.layers[0], torch.nn.Flatten)  # ours untouched
    assert isinstance(theirs.layers[0], torch.nn.Identity)
    x = torch.randn(5, 1, 28, 28)
    xp = peer_pleas.to_pleas_inputs(model, x)
    assert xp.shape == (5, 784)
    with torch.no_grad():
        assert torch.equal(theirs(xp), model(x))  # the same function, exactly
    back = peer_pleas.from_pleas_state_dict(theirs.state_dict(), ours)
    assert list(back) == list(ours) and back["layers.7.weight"].shape == (10, 512)
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    # the way their partial merge stores tensors (new frozen Parameters) converts the same
    theirs.layers[1].weight = torch.nn.Parameter(ours["layers.1.weight"].clone(),
                                                 requires_grad=False)  # fmt: skip
    back = peer_pleas.from_pleas_state_dict(theirs.state_dict(), ours)
    assert torch.equal(back["layers.1.weight"], ours["layers.1.weight"])
    assert back["layers.1.weight"].is_contiguous() and not back["layers.1.weight"].requires_grad


def test_converter_refuses_other_names_and_shapes() -> None:
    small, _ = create_model("mlp", width=4, depth=1)
    wide, _ = create_model("mlp", width=8, depth=1)
    ours = small.state_dict()
    with pytest.raises(ValueError, match=r"extra \['extra.weight'\]"):
        peer_pleas.from_pleas_state_dict({**ours, "extra.weight": torch.zeros(1)}, ours)
    with pytest.raises(ValueError, match="shapes differ"):
        peer_pleas.from_pleas_state_dict(wide.state_dict(), ours)


def test_cycled_batches_repeat_in_order() -> None:
    data = [("a", 0), ("b", 1), ("c", 2)]
    assert peer_pleas._cycled(data, 7) == [data[i % 3] for i in range(7)]
    assert peer_pleas._cycled(data, 2) == data[:2]


def test_shims_stub_only_missing_modules_in_a_subprocess() -> None:
    code = (
        "import json, torch; from symmerge.report.peer_pleas import _install_shims; "
        "s = _install_shims(); import gurobipy, torchmetrics; "
        "from sklearn.model_selection import train_test_split; t = torch.zeros(2); "
        "m = torch.nn.Linear(2, 2)\n"
        "try:\n gurobipy.Model()\n raised = False\n"
        "except RuntimeError:\n raised = True\n"
        "print(json.dumps({'stubbed': s, 'raised': raised, 'same': t.cuda() is t, "
        "'module': m.cuda() is m, 'again': _install_shims()}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=True)  # fmt: skip
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    import importlib.util

    missing = [
        m for m in peer_pleas.PLEAS_STUBS if importlib.util.find_spec(m.split(".")[0]) is None
    ]
    assert out["stubbed"] == missing and out["again"] == missing
    assert out["same"] and out["module"]
    assert out["raised"] == ("gurobipy" in missing)


def test_peer_entries_name_no_machine_paths(tmp_path: Path) -> None:
    home = str(Path.home())
    folder = Path.home() / ".cache" / "symmerge" / "no-such-peer-root" / "pleas"
    assert not folder.exists()
    entry = peer_pleas.run_pleas(_checkpoints(tmp_path), _never, seed=0, setting=CROSS,
                                 data=_data(), folder=folder)  # fmt: skip
    assert entry["status"] == "not run"
    assert entry["folder"] == "~/.cache/symmerge/no-such-peer-root/pleas"
    texts = [v for v in entry.values() if isinstance(v, str)]
    assert not any(home + "/" in t or sys.executable in t for t in texts)
    assert entry["reason"].startswith("no official PLeaS source in ~/.cache/symmerge/")


def _peer_folder() -> Path:
    return peers.default_peer_root() / "pleas"


@pytest.mark.skipif(not (_peer_folder() / "src" / "pleas").is_dir(),
                    reason="the official PLeaS code is not unpacked in the peer root "
                    "(see peer_pleas.pleas_install_command)")  # fmt: skip
def test_real_peer_end_to_end_on_tiny_inputs(tmp_path: Path) -> None:
    paths = _checkpoints(tmp_path, width=16)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g))
               for _ in range(2)]  # fmt: skip
    record = {"n": 64, "sha256": "tiny"}
    seen: list[torch.nn.Module] = []

    def evaluate(model: torch.nn.Module) -> dict:
        seen.append(model)
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        with torch.no_grad():
            return {"accuracy": float((model(x).argmax(1) == y).float().mean())}

    entry = peer_pleas.run_pleas(paths, evaluate, seed=0, setting=CROSS, data=(batches, record),
                                 folder=_peer_folder(), threads=1)  # fmt: skip
    assert entry["status"] == "ok", entry["reason"]
    assert entry["data"] == record
    assert entry["version"] and entry["package"].endswith("@" + entry["version"])
    assert entry["seconds"] == entry["timings"]["total_s"] > 0
    assert entry["timings"]["adam_s"] > 0 and entry["timings"]["first_call_s"] > 0
    assert entry["adam_steps"] == peer_pleas.MAX_STEPS + 1
    assert len(entry["loss"]["every_20_steps"]) == peer_pleas.MAX_STEPS // 20
    conv = entry["conversion"]
    assert conv["converted_vs_ours_max_abs_logit_diff"] == 0.0
    assert conv["self_merge_vs_model_a_max_abs_logit_diff"] == 0.0
    assert conv["permuted_model_b_vs_model_b_max_abs_logit_diff"] < 1e-5
    assert sorted(conv["groups"].values()) == [16, 16]  # one group per hidden layer
    assert 0.0 <= entry["metrics"]["accuracy"] <= 1.0
    # the merged model is checkpoint 0's architecture with new weights
    (merged,) = seen
    a = load_checkpoint(paths[0])[0].state_dict()
    assert merged.state_dict().keys() == a.keys()
    assert all(merged.state_dict()[k].shape == v.shape for k, v in a.items())
    assert not torch.equal(merged.state_dict()["layers.1.weight"], a["layers.1.weight"])


# ---------------------------------------------------------------------------------------------
# the ResNet path: resnet20-disjoint (two CIFAR-10 ResNet-20x1 with BatchNorm, a head per task)
# ---------------------------------------------------------------------------------------------

#: The ResNet setting the peer runs on (classes 0-4 and 5-9, heads per task, BN reset).
DISJOINT: Setting = settings_for("cpu")["resnet20-disjoint"]


def _resnet(seed: int, name: str = "resnet20") -> torch.nn.Module:
    """A ResNet-20x1 with random weights and non-trivial running statistics."""
    torch.manual_seed(seed)
    model, _ = create_model(name, width=1)
    with torch.no_grad():
        model.train()
        model(torch.randn(8, 3, 32, 32))
    return model.eval()


def _resnet_checkpoints(tmp_path: Path, name: str = "resnet20") -> list[Path]:
    paths = []
    for k in range(2):
        _, config = create_model(name, width=1)
        meta = {"dataset": "cifar10", "model_name": name,
                "classes": [5 * k + c for c in range(5)]}  # fmt: skip
        paths.append(save_checkpoint(tmp_path / f"r{k}.safetensors", _resnet(k, name), config,
                                     meta))  # fmt: skip
    return paths


def _images() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    return ([(torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))],
            {"n": 2, "sha256": "0" * 64})  # fmt: skip


def test_the_setting_is_registered_beside_zipit() -> None:
    names = [p.name for p in peers.PEERS["resnet20-disjoint"]]
    assert names == ["zipit-official", "pleas-official"]
    peer = peers.PEERS["resnet20-disjoint"][1]
    assert peer.ours == "pleas" and peer.subfolder == "pleas" and peer.reads_data
    assert peer.first_seed_only  # most of an hour a run: the folder's first seed only
    assert DISJOINT.heads == "per-task" and DISJOINT.reset_bn and not DISJOINT.budgets


def test_model_kinds() -> None:
    mlp, _ = create_model("mlp", width=4, depth=1)
    assert peer_pleas.model_kind(mlp) == "mlp" and peer_pleas.head_name(mlp) == "layers.3"
    assert peer_pleas.model_kind(_resnet(0)) == "resnet"
    assert peer_pleas.head_name(_resnet(0)) == "fc"
    assert peer_pleas.model_kind(_resnet(0, "resnet20-ln")) is None
    assert peer_pleas.model_kind(create_model("vgg11", width=0.25)[0]) is None


def test_resnet_conversion_round_trip_is_exact() -> None:
    model = _resnet(0)
    ours = model.state_dict()
    theirs = peer_pleas.to_pleas_model(model)
    assert theirs is not model and not theirs.training
    assert type(theirs) is type(model) and isinstance(theirs.flatten, torch.nn.Flatten)
    x = torch.randn(5, 3, 32, 32)
    assert peer_pleas.to_pleas_inputs(model, x) is x  # images as they are
    with torch.no_grad():
        assert torch.equal(theirs(x), model(x))  # the same function, exactly
    back = peer_pleas.from_pleas_state_dict(theirs.state_dict(), ours)
    assert list(back) == list(ours)
    assert all(torch.equal(back[k], ours[k]) and back[k].dtype == ours[k].dtype for k in ours)
    # their partial merge makes the BatchNorm statistics parameters: the same names and values
    stats = ours["layer2.0.norm1.running_var"].clone()
    theirs.layer2[0].norm1.running_var = torch.nn.Parameter(stats, requires_grad=False)
    assert "layer2.0.norm1.running_var" in dict(theirs.named_parameters())
    back = peer_pleas.from_pleas_state_dict(theirs.state_dict(), ours)
    assert list(back) == list(ours) and torch.equal(back["layer2.0.norm1.running_var"], stats)
    assert back["layer1.0.norm1.num_batches_tracked"].dtype == torch.long


def test_per_task_heads_are_stacked_in_order() -> None:
    ours = _resnet(0).state_dict()
    heads = [(torch.randn(10, 64), torch.randn(10)) for _ in range(2)]
    back = peer_pleas.from_pleas_state_dict(ours, ours, heads, "fc")
    assert back["fc.weight"].shape == (20, 64) and back["fc.bias"].shape == (20,)
    assert torch.equal(back["fc.weight"][:10], heads[0][0])
    assert torch.equal(back["fc.weight"][10:], heads[1][0])
    assert torch.equal(back["fc.bias"][10:], heads[1][1])
    assert all(torch.equal(back[k], v) for k, v in ours.items() if not k.startswith("fc."))
    with pytest.raises(ValueError, match="do not read the merged features"):
        peer_pleas.from_pleas_state_dict(ours, ours, [(torch.randn(10, 32), torch.randn(10))])
    with pytest.raises(ValueError, match="no head 'head'"):
        peer_pleas.from_pleas_state_dict(ours, ours, heads, "head")


def test_resnet_entry_without_the_peer(tmp_path: Path) -> None:
    paths = _resnet_checkpoints(tmp_path)
    folder = tmp_path / "absent"
    entry = peer_pleas.run_pleas(paths, _never, seed=0, setting=DISJOINT, data=_images(),
                                 folder=folder, threads=1)  # fmt: skip
    assert entry["peer"] == "pleas-official" and entry["status"] == "not run"
    assert entry["reason"].startswith(f"no official PLeaS source in {folder}")
    assert entry["model"] == "resnet" and entry["heads"] == "per-task"
    assert entry["renorm"] == "reset-bn (ours: symmerge.renorm.reset_bn on the merge batches)"
    assert entry["call"] == (peer_pleas.PLEAS_CALL + peer_pleas.PLEAS_PER_TASK_CALL
                             + peer_pleas.PLEAS_RESET_CALL)  # fmt: skip
    assert "permute_final_features" in entry["call"]
    assert "reset_bn(model3, batches)" in entry["call"]
    assert peer_pleas.BN_NOTES[True] in entry["notes"] and "reset_running_stats" in entry["notes"]
    assert peer_pleas.PER_TASK_NOTE in entry["notes"] and "Tensor.cuda" in entry["notes"]
    assert "our MLPs have none" not in entry["notes"]
    assert entry["environment"] == peer_pleas.RESNET_ENV
    assert peer_pleas.RESNET_NOTE in entry["notes"]
    assert entry["checkpoints"] == [file_sha256(p) for p in paths]
    assert entry["metrics"] is None and entry["conversion"] is None and entry["bn_reset"] is None
    # the MLP setting's entry keeps its call and notes
    mlp = peer_pleas.run_pleas(_checkpoints(tmp_path), _never, seed=0, setting=CROSS,
                               data=_data(), folder=folder)  # fmt: skip
    assert mlp["model"] == "mlp" and mlp["heads"] == "shared" and mlp["renorm"] is None
    assert mlp["call"] == peer_pleas.PLEAS_CALL and mlp["environment"] == {}
    assert mlp["notes"] == peer_pleas.PLEAS_NOTES + "; no BatchNorm reset (our MLPs have none)"


def test_models_the_driver_does_not_run_are_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    def no_probe(folder: Path) -> Any:
        raise AssertionError("models the driver cannot run are refused before the probe")

    monkeypatch.setattr(peer_pleas, "probe_pleas", no_probe)
    entry = peer_pleas.run_pleas(_resnet_checkpoints(tmp_path, "resnet20-ln"), _never, seed=0,
                                 setting=DISJOINT, data=_images(), folder=tmp_path)  # fmt: skip
    assert entry["status"] == "not run" and entry["model"] is None
    assert entry["reason"] == ("the pleas-official driver runs our MLP and our BatchNorm ResNet; "
                               "checkpoint 0 is a ResNet (norm 'ln')")  # fmt: skip
    assert entry["metrics"] is None and entry["version"] is None and entry["renorm"] is None
    # models whose heads differ in size cannot share their least squares' averaged logits
    a, config = create_model("mlp", width=4, depth=1)
    b, config_b = create_model("mlp", width=4, depth=1, num_classes=5)
    paths = [save_checkpoint(tmp_path / "a.safetensors", a, config, {}),
             save_checkpoint(tmp_path / "b.safetensors", b, config_b, {})]  # fmt: skip
    entry = peer_pleas.run_pleas(paths, _never, seed=0, setting=CROSS, data=_data(),
                                 folder=tmp_path)  # fmt: skip
    assert entry["status"] == "not run" and entry["model"] == "mlp"
    assert entry["reason"].endswith("the outputs differ in size: [10, 5]")


def test_a_checkpoint_that_does_not_load_is_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    monkeypatch.setattr(peer_pleas, "probe_pleas", lambda folder: ("abc", "src", None))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    entry = peer_pleas.run_pleas([bad, bad], _never, seed=0, setting=DISJOINT, data=_images(),
                                 folder=tmp_path)  # fmt: skip
    assert entry["status"] == "failed" and entry["reason"].startswith("reading the checkpoints: ")
    assert entry["metrics"] is None


def test_real_peer_end_to_end_on_tiny_resnets(tmp_path: Path) -> None:
    from symmerge.renorm import reset_bn

    folder = _peer_folder()
    if not (folder / "src" / "pleas").is_dir():
        pytest.skip(f"the official PLeaS code is not unpacked in {folder} "
                    f"({peer_pleas.pleas_install_command(folder)})")  # fmt: skip
    paths = _resnet_checkpoints(tmp_path)
    batches, record, x = cifar_noise()
    seen: list[torch.nn.Module] = []

    def evaluate(model: torch.nn.Module) -> dict[str, Any]:
        seen.append(model)
        return {"accuracy": 0.5}

    entry = peer_pleas.run_pleas(paths, evaluate, seed=0, setting=DISJOINT,
                                 data=(batches, record), folder=folder, threads=1)  # fmt: skip
    assert entry["status"] == "ok", entry["reason"]
    assert entry["metrics"] == {"accuracy": 0.5} and entry["data"] == record
    assert entry["version"] == (folder / "COMMIT").read_text().strip()
    assert entry["environment"] == peer_pleas.RESNET_ENV
    assert entry["seconds"] == entry["timings"]["total_s"] > 0
    assert {"adam_s", "bn_reset_s", "heads_s", "first_call_s"} <= entry["timings"].keys()
    assert entry["adam_steps"] == peer_pleas.MAX_STEPS + 1
    conv = entry["conversion"]
    assert conv["converted_vs_ours_max_abs_logit_diff"] == 0.0
    assert conv["self_merge_vs_model_a_max_abs_logit_diff"] == 0.0
    assert conv["permuted_model_b_vs_model_b_max_abs_logit_diff"] < 1e-5
    assert conv["merged_vs_their_model_max_abs_logit_diff"] < 1e-5
    # their 12 groups: the three residual streams and the nine block insides
    assert sorted(conv["groups"].values()) == [16] * 4 + [32] * 4 + [64] * 4
    assert entry["bn_reset"] == {"batchnorms": 21, "batches": 2, "examples": 16,
                                 "by": "symmerge.renorm.reset_bn"}  # fmt: skip
    assert len(entry["merged_weights_sha256"]) == 64
    (merged,) = seen
    with torch.no_grad():
        out = merged(x)
    assert out.shape == (4, 20) and torch.isfinite(out).all()  # both 10-way heads
    # each model's own head, its columns in the merged features' order, its bias as trained
    sources = [load_checkpoint(p)[0] for p in paths]
    fc = merged.state_dict()
    for k, s in enumerate(sources):
        w, b = fc["fc.weight"][10 * k : 10 * (k + 1)], fc["fc.bias"][10 * k : 10 * (k + 1)]
        assert torch.equal(b, s.fc.bias)
        cols = sorted(map(tuple, w.T.tolist()))
        assert cols == sorted(map(tuple, s.fc.weight.detach().T.tolist()))
    # the BatchNorm statistics are the merge batches' (our reset_bn on the same weights)
    again = reset_bn(copy.deepcopy(merged), batches).state_dict()
    for key, v in merged.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(v, again[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(fc["conv1.weight"], sources[0].state_dict()["conv1.weight"])
