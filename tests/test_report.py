"""``symmerge report``: one smoke run on two settings (every registered method, plus two
registered here: one that works and one that fails), shared by the tests. Runs of a setting
share checkpoints and data, failures are recorded, ``--render-only`` redraws the markdown byte
for byte, two runs agree, and bad input (names, schema versions, resume folders, scales) is
refused with a clear message."""

from __future__ import annotations

import inspect
import itertools
import json
import os
import shutil
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from symmerge import methods as registry
from symmerge.cli import main
from symmerge.methods import get_method, list_methods, register_method
from symmerge.report import (
    SETTING_NAMES,
    ReportError,
    check_scale,
    load_results,
    peers,
    provenance,
    render_markdown,
    run_report,
    runner,
    settings_for,
    validate,
    write_report,
)
from symmerge.report.checkpoints import find_reference, train_many, train_or_reuse
from symmerge.report.schema import load_published
from symmerge.report.settings import CPU_EXTRA, DEFAULT_SEEDS, applicability, jobs

needs_data = pytest.mark.skipif(
    not os.environ.get("SYMMERGE_DATA"), reason="needs SYMMERGE_DATA (CI sets it)"
)

SETTINGS = ["same-task", "disjoint-classes"]
ADDED = "report-test-average"
BROKEN = "report-test-broken"


@pytest.fixture(scope="module")
def registered() -> Iterator[None]:
    """Two methods registered the way a user would: a working one and a broken one."""

    @register_method(ADDED, paper="test")
    def average(spec: Any, models: Any, **kwargs: Any) -> Any:
        """The plain average, under another name."""
        return get_method("naive")(spec, models, **kwargs)

    @register_method(BROKEN, paper="test")
    def broken(spec: Any, models: Any, **kwargs: Any) -> Any:
        """Always fails."""
        raise RuntimeError("boom: this method always fails")

    yield
    for name in (ADDED, BROKEN):
        registry._REGISTRY.pop(name, None)


def _run(folder: Path, **kwargs: Any) -> dict[str, Any]:
    torch.set_num_threads(1)
    return run_report(folder, settings=SETTINGS, data_root=os.environ["SYMMERGE_DATA"],
                      progress=False, command="symmerge report (test)", **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def report(registered: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    if not os.environ.get("SYMMERGE_DATA"):
        pytest.skip("needs SYMMERGE_DATA (CI sets it)")
    folder = tmp_path_factory.mktemp("report")
    doc = _run(folder)
    write_report(doc, folder)
    return folder, doc


def _numbers(doc: dict[str, Any]) -> list[tuple]:
    """Everything that must not change between two runs (not timings, memory or dates)."""
    runs = [(r["setting"], r["label"], r["seed"], r["status"], r["error"],
             json.dumps(r["metrics"], sort_keys=True), json.dumps(r["params"], sort_keys=True),
             (r["data"] or {}).get("sha256")) for r in doc["runs"]]  # fmt: skip
    ends = [(e["setting"], e["seed"], e["data"]["sha256"],
             [(s["weights_sha256"], json.dumps(s["metrics"], sort_keys=True))
              for s in e["sources"]]) for e in doc["endpoints"]]  # fmt: skip
    peers = [(e["peer"], e["seed"], e["status"], json.dumps(e["metrics"], sort_keys=True))
             for e in doc["peers"]["runs"]]  # fmt: skip
    return runs + ends + peers


@needs_data
def test_schema_and_shared_inputs(report: tuple[Path, dict]) -> None:
    folder, doc = report
    assert validate(json.loads((folder / "results.json").read_text())) == doc
    assert doc["schema_version"] == 1 and doc["meta"]["complete"]
    for key in ("command", "git_commit", "versions", "hardware", "threads", "date", "seeds"):
        assert key in doc["meta"]
    assert doc["peers"]["reason"] and doc["peers"]["enabled"]
    assert [(e["peer"], e["setting"], e["seed"]) for e in doc["peers"]["runs"]] == [
        ("rebasin", "same-task", 0)
    ]  # ran, or recorded why not
    assert doc["peers"]["runs"][0]["status"] in ("ok", "not run")
    # the C2M3 peer runs on the N-model settings, which this report does not have
    assert "c2m3-official on n-models" in doc["peers"]["reason"]
    for name in SETTINGS:
        ends = [e for e in doc["endpoints"] if e["setting"] == name]
        assert len(ends) == 1
        shas = [s["sha256"] for s in ends[0]["sources"]]
        assert len(shas) == 2 and len(set(shas)) == 2
        runs = [r for r in doc["runs"] if r["setting"] == name]
        assert {tuple(r["checkpoints"]) for r in runs} == {tuple(shas)}
        used = {r["data"]["sha256"] for r in runs if r["data"] is not None}
        assert used == {ends[0]["data"]["sha256"]}
        for r in runs:
            if r["status"] == "ok":
                assert 0.0 <= r["metrics"]["accuracy"] <= 1.0
                assert r["metrics"]["params"] > 0 and r["metrics"]["macs"] > 0
                assert r["timings"]["merge_wall_s"] >= r["timings"]["method_s"] >= 0
    # every registered method ran in at least one of the settings
    assert {r["method"] for r in doc["runs"]} == set(list_methods())
    joint = [r for r in doc["runs"] if r["setting"] == "disjoint-classes" and r["status"] == "ok"]
    assert all(len(r["metrics"]["per_task"]) == 2 for r in joint)
    # the harness refuses a document whose runs mix checkpoints
    mixed = json.loads(json.dumps(doc))
    mixed["runs"][0]["checkpoints"] = list(reversed(mixed["runs"][0]["checkpoints"]))
    with pytest.raises(ReportError, match="does not merge the checkpoints"):
        validate(mixed)


@needs_data
def test_failures_are_recorded(report: tuple[Path, dict]) -> None:
    folder, doc = report
    failed = [r for r in doc["runs"] if r["method"] == BROKEN]
    assert {r["label"] for r in failed} == {BROKEN, f"{BROKEN} + REPAIR"}
    assert len(failed) == 2 * len(SETTINGS)
    assert all(r["status"] == "failed" and "boom" in r["error"] for r in failed)
    assert all(r["status"] == "ok" for r in doc["runs"] if r["method"] != BROKEN)
    md = (folder / "report.md").read_text()
    assert "Failed runs (recorded, never dropped)" in md and "boom" in md


@needs_data
def test_registered_method_appears(report: tuple[Path, dict]) -> None:
    folder, doc = report
    mine = [r for r in doc["runs"] if r["method"] == ADDED and r["renorm"] is None]
    naive = [r for r in doc["runs"] if r["method"] == "naive" and r["renorm"] is None]
    assert len(mine) == len(SETTINGS) and all(r["status"] == "ok" for r in mine)
    for a, b in zip(mine, naive, strict=True):  # the same merge under another name
        assert a["metrics"]["accuracy"] == b["metrics"]["accuracy"]
    assert f"| {ADDED} |" in (folder / "report.md").read_text()


@needs_data
def test_render_only_reproduces_markdown(report: tuple[Path, dict]) -> None:
    folder, _ = report
    before = (folder / "report.md").read_bytes()
    (folder / "report.md").unlink()
    result = CliRunner().invoke(main, ["report", "--render-only", "-o", str(folder)])
    assert result.exit_code == 0, result.output
    assert (folder / "report.md").read_bytes() == before
    assert (folder / "time_per_method.png").stat().st_size > 0


@needs_data
def test_two_runs_give_identical_numbers(
    report: tuple[Path, dict], tmp_path: Path
) -> None:  # fmt: skip
    _, doc = report
    again = _run(tmp_path)
    assert _numbers(again) == _numbers(doc)


@needs_data
def test_resume_reuses_runs_of_the_same_configuration(
    report: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    folder, doc = report
    same = doc["meta"]["code_version"]  # the code that made it (whatever edits came since)
    monkeypatch.setattr(provenance, "merge_code_version", lambda: same)
    with pytest.raises(ReportError, match="pass --resume"):
        _run(folder)
    with pytest.raises(ReportError, match="another configuration.*methods"):
        _run(folder, methods=["naive", "weight"], resume=True)
    with pytest.raises(ReportError, match="another configuration.*seeds"):
        _run(folder, seeds=[0, 1], resume=True)
    resumed = _run(folder, resume=True)
    ok = sum(r["status"] == "ok" for r in doc["runs"])
    assert resumed["meta"]["reused_runs"] == ok
    assert _numbers(resumed) == _numbers(doc)
    monkeypatch.setattr(provenance, "merge_code_version", lambda: "0" * 64)
    with pytest.raises(ReportError, match="made by other code"):
        _run(folder, resume=True)


def _same_task_again(report: tuple[Path, dict], folder: Path, **kwargs: Any) -> dict[str, Any]:
    """``same-task`` again in ``folder``, reusing the report's checkpoint files (same sha256)."""
    shutil.copytree(report[0] / "checkpoints", folder / "checkpoints")
    torch.set_num_threads(1)
    return run_report(folder, settings=["same-task"], data_root=os.environ["SYMMERGE_DATA"],
                      progress=False, command="symmerge report (test)", **kwargs)  # fmt: skip


@needs_data
def test_a_killed_call_keeps_its_finished_runs(
    report: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    """results.json is written after every run: a call killed mid-seed leaves its finished
    runs (the seed not done, the document incomplete), and --resume reuses them."""
    real, done = runner._run_or_reuse, []

    def killed_on_the_third(*args: Any, **kwargs: Any) -> dict[str, Any]:
        if len(done) == 2:
            raise KeyboardInterrupt  # like a kill: nothing after the last write is kept
        done.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "_run_or_reuse", killed_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        _same_task_again(report, tmp_path)
    saved = load_results(tmp_path / "results.json")
    assert len(saved["runs"]) == 2 and not saved["meta"]["complete"]
    assert saved["meta"]["seeds_done"]["same-task"] == []
    monkeypatch.setattr(runner, "_run_or_reuse", real)
    resumed = run_report(tmp_path, settings=["same-task"], data_root=os.environ["SYMMERGE_DATA"],
                         progress=False, command="symmerge report (test)",
                         resume=True)  # fmt: skip
    assert resumed["meta"]["complete"] and resumed["meta"]["seeds_done"]["same-task"] == [0]
    assert resumed["meta"]["reused_runs"] == sum(r["status"] == "ok" for r in saved["runs"])
    first = {r["key"]: r for r in saved["runs"]}
    again = [r for r in resumed["runs"] if r["key"] in first]
    assert len(again) == 2 and all(r["metrics"] == first[r["key"]]["metrics"] for r in again)


@needs_data
def test_missing_peer_is_recorded_with_the_reason(
    report: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    empty = tmp_path / "no-peers"
    empty.mkdir()
    monkeypatch.setenv(peers.PEERS_ENV, str(empty))
    doc = _same_task_again(report, tmp_path / "r", methods=["weight"])
    (entry,) = doc["peers"]["runs"]
    assert entry["status"] == "not run" and entry["metrics"] is None
    assert "cannot import rebasin" in entry["reason"] and str(empty / "rebasin") in entry["reason"]
    assert f"--no-deps --target {empty / 'rebasin'} rebasin torchview graphviz" in entry["install"]
    ends = [s["sha256"] for s in doc["endpoints"][0]["sources"]]
    assert entry["checkpoints"] == ends == doc["runs"][0]["checkpoints"]
    assert entry["ours"]["accuracy"] == doc["runs"][0]["metrics"]["accuracy"]
    md = render_markdown(doc)
    assert "not run: cannot import rebasin" in md and "Install: `" in md
    # switched off, the reason says so
    off = _same_task_again(report, tmp_path / "off", methods=["naive"], peers=False)
    assert off["peers"]["runs"] == [] and "switched off" in off["peers"]["reason"]
    assert "No peer runs: peer runs were switched off" in render_markdown(off)


def test_peer_root_default_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(peers.PEERS_ENV, raising=False)
    assert peers.default_peer_root() == Path.home() / ".cache" / "symmerge" / "peers"
    monkeypatch.setenv(peers.PEERS_ENV, "/somewhere/else")
    assert peers.default_peer_root() == Path("/somewhere/else")


@needs_data
def test_peer_entries_are_validated(report: tuple[Path, dict]) -> None:
    _, doc = report
    bad = json.loads(json.dumps(doc))
    entry = bad["peers"]["runs"][0]
    entry.update(status="not run", reason="")
    with pytest.raises(ReportError, match="without a reason"):
        validate(bad)
    entry.update(status="ok", version="1", metrics={"accuracy": 0.5}, seconds=1.0,
                 checkpoints=list(reversed(entry["checkpoints"])))  # fmt: skip
    with pytest.raises(ReportError, match="does not run on the checkpoints"):
        validate(bad)
    entry["status"] = "maybe"
    with pytest.raises(ReportError, match="has status 'maybe'"):
        validate(bad)


@needs_data
def test_peers_get_the_data_our_runs_got(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several peers on one setting each get an entry; one that reads data gets the setting
    and the very batches our runs got (the endpoint's record), one that does not gets
    neither."""
    from symmerge.report.runner import _batches_sha256

    calls: dict[str, dict[str, Any]] = {}

    def fake(name: str) -> Any:
        def run(checkpoints: list[Path], evaluate: Any, **kwargs: Any) -> dict[str, Any]:
            calls[name] = kwargs
            return {"peer": name, "version": "1", "status": "not run", "reason": "a test",
                    "checkpoints": [], "metrics": None, "seconds": None}  # fmt: skip

        return run

    reader = peers.Peer("reader", "weight", fake("reader"), "r", reads_data=True)
    blind = peers.Peer("blind", "weight", fake("blind"), "b")
    monkeypatch.setitem(peers.PEERS, "same-task", (reader, blind))
    doc = run_report(tmp_path, settings=["same-task"], methods=["naive"], progress=False,
                     data_root=os.environ["SYMMERGE_DATA"], command="t")  # fmt: skip
    assert [e["peer"] for e in doc["peers"]["runs"]] == ["reader", "blind"]
    (end,) = doc["endpoints"]
    batches, record = calls["reader"]["data"]
    assert record == end["data"] and _batches_sha256(batches) == end["data"]["sha256"]
    assert calls["reader"]["setting"].name == "same-task" and calls["reader"]["seed"] == 0
    assert set(calls["blind"]) == {"seed", "folder"}
    # the entry's data record is checked against the endpoints' in the report
    entry = {**doc["peers"]["runs"][0], "status": "ok", "seconds": 1.0,
             "metrics": {"accuracy": 0.5}, "data": {"n": 1, "sha256": "0" * 64}}  # fmt: skip
    odd = {**doc, "peers": {**doc["peers"], "runs": [entry]}}
    assert "NOT the same as our runs'" in render_markdown(odd)
    entry["data"] = record
    md = render_markdown(odd)
    assert "the same as our runs'" in md and "NOT the same" not in md


@needs_data
def test_rebasin_peer_runs_beside_weight_matching(report: tuple[Path, dict]) -> None:
    folder, doc = report
    (entry,) = doc["peers"]["runs"]
    if entry["status"] == "not run":
        pytest.skip(f"the rebasin peer is not installed: {entry['reason']}")
    assert entry["status"] == "ok", entry["reason"]
    weight = [r for r in doc["runs"] if r["setting"] == "same-task" and r["label"] == "weight"]
    ends = [s["sha256"] for s in doc["endpoints"][0]["sources"]]
    assert entry["checkpoints"] == weight[0]["checkpoints"] == ends
    ours = weight[0]["metrics"]["accuracy"]
    assert entry["ours"]["accuracy"] == ours
    assert abs(entry["metrics"]["accuracy"] - ours) < 0.03  # same algorithm, same files
    sources = [s["metrics"]["accuracy"] for s in doc["endpoints"][0]["sources"]]
    assert entry["metrics"]["accuracy"] > min(sources) - 0.1
    assert entry["seconds"] > 0 and entry["ratio"] > 0 and entry["version"]
    assert entry["permutations"] == 2  # the two hidden layers of mlp-w128-d2
    assert "| rebasin | same-task | 0 |" in (folder / "report.md").read_text()


@needs_data
def test_stale_checkpoints_are_retrained(tmp_path: Path) -> None:
    recipe = {"model": "mlp-w16-d1", "dataset": "mnist", "classes": None, "seed": 0,
              "epochs": 1, "limit_train": 256, "split": None, "part": None, "n_parts": None,
              "split_seed": None}  # fmt: skip
    root = os.environ["SYMMERGE_DATA"]
    first = train_or_reuse(recipe, tmp_path, code="a", data_root=root)
    again = train_or_reuse(recipe, tmp_path, code="a", data_root=root)
    other = train_or_reuse(recipe, tmp_path, code="b", data_root=root)
    assert not first.reused and again.reused and not other.reused
    assert again.sha256 == first.sha256 and other.key != first.key
    assert other.weights_sha256 == first.weights_sha256  # deterministic training


@needs_data
def test_sources_train_in_parallel_processes_to_the_same_files(tmp_path: Path) -> None:
    """``train_many`` makes what ``train_or_reuse`` then reuses, with the weights a serial
    training gives; it skips what is there and returns a failure instead of raising."""
    recipe = {"model": "mlp-w16-d1", "dataset": "mnist", "classes": None, "seed": 0,
              "epochs": 1, "limit_train": 256, "split": None, "part": None, "n_parts": None,
              "split_seed": None}  # fmt: skip
    recipes = [recipe, {**recipe, "seed": 1}, recipe]  # the repeat is trained once
    root = os.environ["SYMMERGE_DATA"]
    empty = tmp_path / "no-references"
    empty.mkdir()
    kw: dict[str, Any] = {"code": "a", "data_root": root, "references": empty}
    assert train_many(recipes, tmp_path / "p", jobs=2, **kw) == []
    assert len(list((tmp_path / "p").glob("*.safetensors"))) == 2
    for r in recipes[:2]:
        parallel = train_or_reuse(r, tmp_path / "p", **kw)
        serial = train_or_reuse(r, tmp_path / "s", **kw)
        assert parallel.reused and not serial.reused
        assert parallel.weights_sha256 == serial.weights_sha256
    assert train_many(recipes, tmp_path / "p", jobs=2, **kw) == []  # nothing left to do
    errors = train_many([{**recipe, "model": "no-such-model"}], tmp_path / "p", jobs=2, **kw)
    assert len(errors) == 1 and "no-such-model" in errors[0]


@needs_data
def test_reference_checkpoints_stand_in_for_training(tmp_path: Path) -> None:
    recipe = {"model": "mlp-w16-d1", "dataset": "mnist", "classes": [0, 1], "seed": 3,
              "epochs": 1, "limit_train": 256, "split": None, "part": None, "n_parts": None,
              "split_seed": None}  # fmt: skip
    root = os.environ["SYMMERGE_DATA"]
    made = train_or_reuse(recipe, tmp_path / "refs", code="old", data_root=root)
    used = train_or_reuse(recipe, tmp_path / "r", code="new", data_root=root,
                          references=tmp_path / "refs")  # fmt: skip
    assert used.reused and used.reference is not None
    assert used.sha256 == made.sha256 == used.reference["sha256"]  # copied byte for byte
    assert used.path.parent == tmp_path / "r" and used.reference["file"] == made.path.name
    other = train_or_reuse({**recipe, "seed": 4}, tmp_path / "r", code="new", data_root=root,
                           references=tmp_path / "refs")  # fmt: skip
    assert not other.reused and other.reference is None  # no reference of that recipe
    assert find_reference({**recipe, "split": "shards"}, tmp_path / "refs") is None


def test_a_peer_is_compared_with_our_row_of_its_label() -> None:
    """On a setting that resets BatchNorm statistics our zip row carries renorm="reset-bn";
    it is still the row the ZipIt! peer is compared with (a budget row never is)."""
    from symmerge.report.runner import _ours

    def run(label: str, **kw: Any) -> dict[str, Any]:
        return {"setting": "s", "seed": 0, "method": "zip", "label": label, "budget": None,
                "renorm": "reset-bn", "status": "ok", "key": label, "metrics": {"accuracy": 0.5},
                "timings": {"merge_wall_s": 2.0, "method_s": 1.0}, **kw}  # fmt: skip

    doc = {"runs": [run("zip", budget=1.5), run("zip+repair"), run("zip")]}
    found = _ours(doc, "s", 0, "zip")
    assert found is not None and found["key"] == "zip" and found["merge_wall_s"] == 2.0
    assert _ours(doc, "s", 1, "zip") is None


def test_class_counts_reach_fusion_only_when_every_checkpoint_has_them() -> None:
    from types import SimpleNamespace

    from symmerge.methods import method_info
    from symmerge.report.runner import _class_counts

    def files(*counts: Any) -> list[Any]:
        return [SimpleNamespace(metadata={} if c is None else {"class_counts": c}) for c in counts]

    kf = method_info("kf-linear").fn
    assert _class_counts(kf, files([5, 1], [1, 5])) == {"class_counts": [[5, 1], [1, 5]]}
    assert _class_counts(kf, files(None, [1, 5])) == {}  # a reference file without them
    assert _class_counts(method_info("weight").fn, files([5, 1], [1, 5])) == {}


def test_every_method_runs_in_some_smoke_setting(registered: None) -> None:
    settings = settings_for("smoke")
    assert tuple(settings) == SETTING_NAMES
    for name in list_methods():
        assert any(jobs(s, [name]) for s in settings.values()), name


def test_unknown_names_list_the_valid_ones(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "r"
    result = runner.invoke(main, ["report", "--methods", "weight,nope", "-o", str(out)])
    assert result.exit_code != 0
    assert "'nope'" in result.output and all(m in result.output for m in list_methods())
    result = runner.invoke(main, ["report", "--settings", "bogus", "-o", str(out)])
    assert result.exit_code != 0
    assert "'bogus'" in result.output and all(s in result.output for s in SETTING_NAMES)
    assert not out.exists()


def test_a_new_folder_of_fewer_seeds_than_the_scale_is_noted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    """A folder's first call fixes its seeds, so a first call with --seeds 0 at the cpu scale
    says so (it cannot take seeds 1-2 later); a call into an existing folder does not."""
    import symmerge.report

    def stop(output: Any, **kwargs: Any) -> dict:
        raise ReportError("stopped here")

    monkeypatch.setattr(symmerge.report, "run_report", stop)
    args = ["report", "--scale", "cpu", "--seeds", "0", "-o", str(tmp_path / "r")]
    out = CliRunner().invoke(main, args)
    assert "stopped here" in out.output
    assert "this new folder holds seeds 0 only" in out.output and "0, 1, 2" in out.output
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text("{}")
    assert "note:" not in CliRunner().invoke(main, [*args, "--resume"]).output
    assert "note:" not in CliRunner().invoke(main, args[:3] + args[5:]).output  # every seed


def test_results_of_another_schema_version_are_refused(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps({"schema_version": 0, "runs": []}))
    with pytest.raises(ReportError, match="schema_version 0"):
        load_results(tmp_path)
    result = CliRunner().invoke(main, ["report", "--render-only", "-o", str(tmp_path)])
    assert result.exit_code != 0 and "schema_version 0" in result.output
    assert not (tmp_path / "report.md").exists()


def test_scales_that_cannot_run_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runner = CliRunner()
    result = runner.invoke(main, ["report", "--scale", "paper", "-o", str(tmp_path / "p")])
    assert result.exit_code != 0 and "needs a CUDA GPU" in result.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ReportError, match="not implemented yet"):
        check_scale("paper")
    check_scale("cpu")  # runs (not here: hours); a name of another scale is refused
    result = runner.invoke(main, ["report", "--scale", "cpu", "--settings", "bogus", "-o",
                                  str(tmp_path / "c")])  # fmt: skip
    assert result.exit_code != 0 and "'bogus'" in result.output
    assert all(n in result.output for n in settings_for("cpu"))
    result = runner.invoke(main, ["report", "--settings", "resnet20", "-o", str(tmp_path / "s")])
    assert result.exit_code != 0 and "unknown setting 'resnet20'" in result.output
    assert not any((tmp_path / d).exists() for d in ("p", "c", "s"))


def test_cpu_settings_are_whole() -> None:
    """The cpu scale, checked without running it: the shared names and its own, a training
    recipe for every source, sources that differ, and a row or a reason for every method."""
    from symmerge.data import dataset_info, validate_split
    from symmerge.methods import method_info
    from symmerge.models import build_model, parse_model_name
    from symmerge.train import resolve_config, train_model

    settings = settings_for("cpu")
    assert tuple(settings) == SETTING_NAMES + CPU_EXTRA
    assert settings_for("smoke").keys() <= settings.keys()
    takes = inspect.signature(train_model).parameters
    seeds = DEFAULT_SEEDS["cpu"]
    everywhere: list[str] = []
    for name, setting in settings.items():
        assert setting.stand_in and setting.title, name
        assert setting.samples >= 2000 and len(seeds) == 3
        recipes = [[s.recipe(seed) for s in setting.sources] for seed in seeds]
        for r in itertools.chain(*recipes):
            assert r["limit_train"] is None and r["epochs"] >= 10, (name, r)
            assert set(r) - {"model", "dataset"} <= set(takes), (name, r)
            resolve_config(r["model"], r["dataset"])  # a model the dataset can train
            classes = r["classes"] or []
            assert all(0 <= c < dataset_info(r["dataset"])["num_classes"] for c in classes)
            if r["split"]:
                validate_split(r["split"], r["n_parts"], r["part"])
        # one architecture per setting, and no two sources alike, within or across seeds
        assert len({parse_model_name(s.model)[0] for s in setting.sources}) == 1, name
        flat = [json.dumps(r, sort_keys=True) for r in itertools.chain(*recipes)]
        assert len(set(flat)) == len(flat), name
        for per_seed in recipes:
            assert len({r["seed"] for r in per_seed}) == len(per_seed), name
        tests = {t.dataset for t in setting.tests}
        assert {s.dataset for s in setting.sources} <= tests, name
        # every method has rows here or a reason; the rows can start
        for method in list_methods():
            rows = jobs(setting, [method])
            why = applicability(setting, method_info(method))
            assert bool(rows) != (why is not None), (name, method)
            assert all(job.error is None for job in rows), (name, method)
        for method, params in setting.params.items():
            fn = method_info(method).fn
            assert set(params) <= set(inspect.signature(fn).parameters), (name, method)
        configs = [resolve_config(s.model, s.dataset) for s in setting.sources]
        bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for c in configs
                 for m in build_model(c["arch"], **c["kwargs"]).modules())  # fmt: skip
        assert setting.reset_bn == bn, name
        everywhere += [m for m in list_methods() if jobs(setting, [m])]
    assert set(everywhere) == set(list_methods())  # every method runs somewhere
    c2m3 = settings["resnet20-ln-3"]
    assert len(c2m3.sources) == 3 and c2m3.repair
    assert {j.label for j in jobs(c2m3, ["c2m3", "mergemany"])} == {
        "c2m3", "c2m3 + REPAIR", "mergemany", "mergemany + REPAIR"}  # fmt: skip
    assert len(settings["n-models-5"].sources) == 5
    known = set(settings) | set(settings_for("smoke"))
    assert {e["setting"] for e in load_published()} <= known


@needs_data
def test_chunked_report_accumulates_settings(
    report: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    """One setting per call into one folder (--settings NAME --resume) ends as one document
    with the numbers of a single call; kept settings are not rerun, and a setting
    interrupted mid-way is kept, marked, and finished when named again."""
    monkeypatch.setattr(provenance, "merge_code_version", lambda: "1" * 64)  # edits since
    folder = tmp_path / "chunks"
    shutil.copytree(report[0] / "checkpoints", folder / "checkpoints")
    methods = ["naive", "weight", ADDED]

    def chunk(name: str, **kwargs: Any) -> dict[str, Any]:
        torch.set_num_threads(1)
        return run_report(folder, settings=[name], methods=methods, progress=False,
                          data_root=os.environ["SYMMERGE_DATA"],
                          command=f"symmerge report --settings {name}", **kwargs)  # fmt: skip

    first = chunk("same-task")
    second = chunk("disjoint-classes", resume=True)
    meta = second["meta"]
    assert meta["config"]["settings"] == SETTINGS == meta["settings_done"]
    assert [c["settings"] for c in meta["calls"]] == [["same-task"], ["disjoint-classes"]]
    assert meta["kept_runs"] == len(first["runs"]) and meta["reused_runs"] == 0
    kept = [r for r in second["runs"] if r["setting"] == "same-task"]
    assert kept == first["runs"]  # as they were: not rerun
    assert second["peers"] == first["peers"] and second["peers"]["runs"]
    assert [e["setting"] for e in second["endpoints"]] == SETTINGS
    # the numbers of the one-call report (the fixture), for these methods
    one_call = {**report[1], "runs": [r for r in report[1]["runs"] if r["method"] in methods]}
    assert _numbers(second) == _numbers(one_call)
    md = render_markdown(second)
    assert "Made in 2 calls" in md and all(f"## {n}:" in md for n in SETTINGS)
    assert "not in this report yet: n-models, cross-dataset" in md
    # an interrupted chunk: kept, marked, and finished (reusing its runs) when named again
    path = folder / "results.json"
    doc = json.loads(path.read_text())
    doc["meta"]["settings_done"] = ["same-task"]
    doc["meta"]["seeds_done"]["disjoint-classes"] = []
    path.write_text(json.dumps(doc))
    third = chunk("same-task", resume=True)
    assert third["meta"]["settings_done"] == ["same-task"]
    assert "**Incomplete: seeds 0 not yet" in render_markdown(third)
    assert third["meta"]["reused_runs"] == sum(r["status"] == "ok" for r in first["runs"])
    fourth = chunk("disjoint-classes", resume=True)
    assert fourth["meta"]["settings_done"] == SETTINGS
    assert _numbers(fourth) == _numbers(one_call)
    # other seeds, or other code, are refused: a document never mixes them
    with pytest.raises(ReportError, match="another configuration.*seeds"):
        chunk("same-task", resume=True, seeds=[1])
    monkeypatch.setattr(provenance, "merge_code_version", lambda: "0" * 64)
    with pytest.raises(ReportError, match="made by other code.*checkpoints"):
        chunk("same-task", resume=True)


@needs_data
def test_settings_join_a_folder_and_changed_ones_are_rerun(
    report: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    """The settings' definitions are data, not code: a setting added to the scale joins a
    folder under way; one whose definition changed since its runs is refused until it is
    run again at every seed (its words may change freely); one the scale lost is refused."""
    import dataclasses

    from symmerge.report import runner

    assert "report/settings.py" in provenance.MERGE_CODE_EXCLUDED
    defs = runner.settings_for("smoke")
    base = defs["same-task"]
    folder = tmp_path / "defs"
    shutil.copytree(report[0] / "checkpoints", folder / "checkpoints")

    def call(scale: dict[str, Any], name: str) -> dict[str, Any]:
        monkeypatch.setattr(runner, "settings_for", lambda _: scale)
        torch.set_num_threads(1)
        return run_report(folder, settings=[name], methods=["naive"], resume=True, peers=False,
                          data_root=os.environ["SYMMERGE_DATA"], progress=False,
                          command="symmerge report (test)")  # fmt: skip

    first = call({"same-task": base}, "same-task")
    extra = dataclasses.replace(base, name="extra", samples=base.samples // 2)
    reworded = dataclasses.replace(base, title="the same pair, other words", stand_in="...")
    joined = call({"same-task": reworded, "extra": extra}, "extra")
    assert joined["meta"]["settings_done"] == ["same-task", "extra"]
    assert [r for r in joined["runs"] if r["setting"] == "same-task"] == first["runs"]
    assert joined["meta"]["settings"]["same-task"]["title"] == reworded.title
    changed = dataclasses.replace(base, samples=base.samples // 2)
    scale = {"same-task": changed, "extra": extra}
    with pytest.raises(ReportError, match="definition of same-task changed.*--settings same-task"):
        call(scale, "extra")
    rerun = call(scale, "same-task")
    assert rerun["meta"]["reused_runs"] == 0 and rerun["meta"]["settings_done"] == [
        "same-task",
        "extra",
    ]
    ours = [r for r in rerun["runs"] if r["setting"] == "same-task"]
    assert ours and not {r["key"] for r in ours} & {r["key"] for r in first["runs"]}
    with pytest.raises(ReportError, match="no longer has \\(extra\\)"):
        call({"same-task": changed}, "same-task")


@needs_data
def test_curves_run_between_the_endpoints_through_the_merge(report: tuple[Path, dict]) -> None:
    """Where a barrier is defined (two sources, one head, a matching's permutations) the
    curve starts and ends at the sources' accuracies and passes through the merge at 0.5."""
    _, doc = report
    ends = {e["setting"]: e["sources"] for e in doc["endpoints"]}
    with_curves = {r["label"] for r in doc["runs"] if r.get("curve")}
    assert {"naive", "weight", "naive + REPAIR", "weight + REPAIR"} <= with_curves
    for r in doc["runs"]:
        if r["setting"] == "disjoint-classes" or r["method"] in ("ensemble", "logit-kd", BROKEN):
            assert "curve" not in r, r["label"]  # per-task heads; not a matching; trained weights
        if not r.get("curve"):
            continue
        curve = {p["lambda"]: p for p in r["curve"]}
        assert sorted(curve) == [0.0, 0.25, 0.5, 0.75, 1.0]
        merged = r["metrics"]["accuracy"]
        assert curve[0.5]["accuracy"] == pytest.approx(merged, abs=1e-9), r["label"]
        assert r["metrics"]["barrier"]["accuracy"] >= 0 and r["metrics"]["barrier"]["loss"] >= 0
        if r["renorm"] is None:  # the path's ends compute the sources' functions
            a, b = ends[r["setting"]]
            assert curve[0.0]["accuracy"] == pytest.approx(a["metrics"]["accuracy"], abs=1e-9)
            assert curve[1.0]["accuracy"] == pytest.approx(b["metrics"]["accuracy"], abs=1e-9)
    assert "acc. barrier" in render_markdown(doc)


@needs_data
def test_a_setting_runs_a_seed_at_a_time(report: tuple[Path, dict], tmp_path: Path) -> None:
    """``--seeds`` with ``--resume`` runs some of the folder's seeds: the setting stays
    incomplete, naming the missing seeds, until they ran; the other seeds' runs are kept."""
    folder = tmp_path / "seeds"
    shutil.copytree(report[0] / "checkpoints", folder / "checkpoints")

    def chunk(name: str, seeds: list[int], **kwargs: Any) -> dict[str, Any]:
        torch.set_num_threads(1)
        return run_report(folder, settings=[name], methods=["naive"], seeds=seeds,
                          progress=False, data_root=os.environ["SYMMERGE_DATA"],
                          command="symmerge report (test)", **kwargs)  # fmt: skip

    chunk("same-task", [0, 1])
    half = chunk("disjoint-classes", [1], resume=True)
    meta = half["meta"]
    assert meta["seeds"] == [0, 1] and meta["seeds_done"]["disjoint-classes"] == [1]
    assert meta["settings_done"] == ["same-task"]
    assert (
        "seeds 1 ran, seeds 0 not yet; run them with `--settings disjoint-classes --seeds 0 "
        "--resume`" in render_markdown(half)
    )
    whole = chunk("disjoint-classes", [0], resume=True)
    assert whole["meta"]["settings_done"] == SETTINGS
    mine = [(r["seed"], r["key"]) for r in whole["runs"] if r["setting"] == "disjoint-classes"]
    assert sorted(mine) == sorted(
        (r["seed"], r["key"])
        for r in half["runs"] + report[1]["runs"]
        if r["setting"] == "disjoint-classes" and r["method"] == "naive"
    )  # seed 1 kept as it was, seed 0 as a one-call report makes it
    with pytest.raises(ReportError, match="another configuration.*seeds"):
        chunk("same-task", [2], resume=True)  # not one of the folder's seeds


@needs_data
def test_batchnorm_statistics_are_reset_where_merges_leave_them_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    """A BatchNorm setting (``reset_bn``, as the cpu scale's ResNets) recomputes the statistics
    after the merges that leave them interpolated, exactly as ``merge(renorm="reset-bn")``
    would; a merge that keeps them (the side-by-side ensemble) is left alone. Tiny ResNets
    stand in."""
    from symmerge.data import get_dataset
    from symmerge.evaluate import evaluate
    from symmerge.io import load_checkpoint
    from symmerge.merging import merge
    from symmerge.report import runner
    from symmerge.report.settings import Setting, Source, TestSet
    from symmerge.sources import data_source_batches

    tiny = [Source("cifar10", "resnet20x0.25", k, epochs=1, limit_train=512) for k in (0, 1)]
    test = (TestSet("cifar10", classes=(0, 1)),)  # 2000 images: a tenth of the time
    setting = Setting("resnet20", "tiny BN ResNets", tuple(tiny), test,
                      "cifar10", samples=500, reset_bn=True)  # fmt: skip
    monkeypatch.setattr(runner, "settings_for", lambda scale: {setting.name: setting})
    torch.set_num_threads(1)
    root = os.environ["SYMMERGE_DATA"]
    doc = run_report(tmp_path, settings=["resnet20"], methods=["weight", "ensemble"],
                     data_root=root, progress=False, peers=False, command="test")  # fmt: skip
    renorm = {r["label"]: r["renorm"] for r in doc["runs"]}
    assert renorm == {"weight": "reset-bn", "ensemble": None}  # side by side: exact stats
    weight = next(r for r in doc["runs"] if r["label"] == "weight")
    assert weight["status"] == "ok" and weight["data"] == doc["endpoints"][0]["data"]
    assert not any("BatchNormStats" in w for w in weight["warnings"])
    assert weight["timings"]["method"]["renorm"] > 0
    assert "BatchNorm statistics recomputed on the merge data" in render_markdown(doc)
    models = [load_checkpoint(tmp_path / s["file"])[0] for s in doc["endpoints"][0]["sources"]]
    data = data_source_batches("cifar10", runner.DATA_BATCH, root=root, samples=500, seed=0,
                               datasets=["cifar10"] * 2, model=models[0])  # fmt: skip
    merged, _ = merge(models, "weight", data=data, renorm="reset-bn", seed=0, block_sparse=True)
    x, y = get_dataset("cifar10", "test", root=root, classes=[0, 1]).tensors
    assert weight["metrics"]["accuracy"] == evaluate(merged, (x, y))["accuracy"]


def test_repair_rows_skip_the_ensemble_which_repair_leaves_unchanged() -> None:
    from symmerge.methods import list_methods
    from symmerge.report.settings import jobs, settings_for

    setting = settings_for("smoke")["same-task"]
    labels = [j.label for j in jobs(setting, list_methods())]
    assert "naive + REPAIR" in labels and "ensemble" in labels
    assert "ensemble + REPAIR" not in labels


def test_a_budget_becomes_a_target_width_only_for_an_mlp() -> None:
    """A method with a target width gets budget x the MLP's hidden width; a ResNet's layers
    differ in width (its ``x<K>`` is a multiplier), so its budget rows fail with the reason
    instead of merging at a wrong width."""
    import dataclasses

    from symmerge.methods import list_methods
    from symmerge.report.settings import Source, settings_for

    setting = settings_for("cpu")["budgets"]
    rows = {j.label: j for j in jobs(setting, list_methods())}
    assert rows["zip @1.5x"].params["width"] == 768 and rows["zip @1.5x"].error is None
    narrow = dataclasses.replace(setting, sources=tuple(
        dataclasses.replace(s, model="mlp-w256") for s in setting.sources))  # fmt: skip
    assert {j.label: j for j in jobs(narrow, ["zip"])}["zip @2x"].params["width"] == 512
    resnet = dataclasses.replace(setting, sources=(Source("cifar10", "resnet20x4", 0),) * 2)
    budget_rows = [j for j in jobs(resnet, list_methods()) if j.method == "zip"]
    assert budget_rows and all("width" not in j.params and "no single hidden width" in j.error
                               for j in budget_rows)  # fmt: skip
    pleas = jobs(resnet, ["pleas"])
    assert len(pleas) == 3 and all(j.error is None and j.params["budget"] for j in pleas)


def test_published_gains_are_compared_in_direction_and_size(report: tuple[Path, dict]) -> None:
    """A published gain (stated, or the difference of two accuracies of one table) is set
    beside ours in a "vs published" column: direction by sign, size within a factor of 2."""
    from symmerge.report import render

    assert render._verdict(4.4, 3) == "direction and size agree"
    assert render._verdict(1.1, 19) == "direction agrees, size differs"
    assert render._verdict(-0.2, [8, 15]) == "direction disagrees"
    assert render._verdict(30, [8, 15]) == "direction and size agree"
    assert render._verdict(31, [8, 15]) == "direction agrees, size differs"
    assert render._verdict(3.9, [8, 15]) == "direction agrees, size differs"
    assert render._verdict(-5, -4) == "direction and size agree"
    assert render._verdict(1, 0) == "no published direction"
    _, doc = report
    doc = json.loads(json.dumps(doc))
    source = {"tag": "paper", "source": "a table", "differs": "-"}
    doc["published"] = [
        {"setting": "same-task", "method": "weight", "baseline": "naive", "metric": "accuracy",
         "value": 0.9, **source},
        {"setting": "same-task", "method": "naive", "metric": "accuracy", "value": 0.4, **source},
    ]  # fmt: skip

    def acc(label: str) -> float:
        return 100 * statistics.fmean(
            r["metrics"]["accuracy"]
            for r in doc["runs"]
            if r["setting"] == "same-task" and r["label"] == label
        )

    gain = acc("weight") - acc("naive")
    md = render.render_markdown(doc)
    cell = f"{gain:+.2f} vs +50 over naive: {render._verdict(gain, 50)} [p1]"
    row = next(line for line in md.splitlines() if line.startswith("| weight |"))
    assert row.endswith(f"| {cell} |") and "| vs published |" in md
    assert f"over naive: +50 points; ours: {gain:+.2f} points" in md
    assert "| naive |" in md and "over naive" not in next(
        line for line in md.splitlines() if line.startswith("| naive |"))  # fmt: skip


COMMITTED = sorted(
    (Path(__file__).resolve().parent.parent / "benchmarks" / "report").glob("*/results.json")
)


@pytest.mark.parametrize("results", COMMITTED, ids=[p.parent.name for p in COMMITTED])
def test_committed_reports_render_byte_for_byte(results: Path) -> None:
    """A committed report's markdown is what --render-only draws from its committed JSON (a
    valid document of this schema): no number in it was typed by hand."""
    doc = load_results(results)
    assert render_markdown(doc) == (results.parent / "report.md").read_text()


def test_code_version_covers_what_numbers_depend_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    """An edit to what a module runs depend on executes changes the runs' code version; an
    edit to its words (docstrings, comments, layout), or to the drawing, the command line,
    the settings' data, a peer's driver (one added later too) or the join leaves it."""
    files = ["merging.py", "cli.py", "report/runner.py", "report/render.py",
             "report/peers.py", "report/peer_c2m3.py", "report/settings.py"]  # fmt: skip
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f'"""{name}."""\n\n\ndef f(x):\n    return x + 1\n')
    monkeypatch.setattr(provenance, "PACKAGE", tmp_path)
    before = provenance.merge_code_version()
    for name in [*files[1:2], *files[3:], "report/peer_zipit.py", "report/join.py"]:
        (tmp_path / name).write_text("x = 1\n")
        assert provenance.merge_code_version() == before, name
    (tmp_path / "merging.py").write_text(
        '"""Other words."""\n\n# a comment\ndef f(x):  # another\n    """What f does."""\n'
        "    return (x\n            + 1)\n"
    )
    assert provenance.merge_code_version() == before  # the same statements
    for name in ["merging.py", "report/runner.py", "report/checkpoints.py"]:
        (tmp_path / name).write_text("def f(x):\n    return x + 2\n")
        assert provenance.merge_code_version() != before, name
        before = provenance.merge_code_version()
    # the training code is keyed by its bytes (the checkpoints trained so far carry that key)
    for name in ["train.py", "data.py", "io.py", "models/mlp.py"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    trained = provenance.training_code_version()
    (tmp_path / "train.py").write_text("x = 1  # a comment\n")
    assert provenance.training_code_version() != trained
