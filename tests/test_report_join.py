"""``symmerge report --join``: chunks run side by side in two folders join into the
document one folder would hold, and folders of other code or with other runs are refused."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from test_report import _numbers, needs_data

from symmerge.cli import main
from symmerge.report import ReportError, load_results, render_markdown, run_report
from symmerge.report.join import join, join_reports, recorded_command
from symmerge.report.schema import load_published

METHODS = ["naive", "weight"]


def _chunk(folder: Path, name: str, **kwargs: Any) -> dict[str, Any]:
    torch.set_num_threads(1)
    return run_report(folder, settings=[name], methods=METHODS, progress=False,
                      data_root=os.environ["SYMMERGE_DATA"],
                      command=f"symmerge report --settings {name}", **kwargs)  # fmt: skip


@needs_data
def test_chunks_of_two_folders_join_into_one_report(tmp_path: Path) -> None:
    first = _chunk(tmp_path / "a", "same-task")
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the second folder starts as a copy
    second = _chunk(tmp_path / "b", "disjoint-classes", resume=True)
    before = (tmp_path / "a" / "results.json").read_text()
    out = CliRunner().invoke(main, ["report", "-o", str(tmp_path / "a"), "--join",
                                    str(tmp_path / "b")])  # fmt: skip
    assert out.exit_code == 0, out.output
    joined = load_results(tmp_path / "a" / "results.json")
    meta = joined["meta"]
    assert meta["settings_done"] == ["same-task", "disjoint-classes"]
    assert meta["calls"] == second["meta"]["calls"]  # the copy's first call is not repeated
    assert [j["settings"] for j in meta["joined"]] == [["disjoint-classes"]]
    # the copies joined are named without this machine's temporary folder
    typed = f"symmerge report -o a --join {tmp_path / 'b'}"
    assert recorded_command(typed).startswith("symmerge report -o a --join $TMPDIR/")
    assert tempfile.gettempdir() not in recorded_command(typed)
    assert _numbers(joined) == _numbers(second)  # as if the chunks ran in one folder
    assert [r["key"] for r in joined["runs"]] == [r["key"] for r in second["runs"]]
    assert meta["kept_runs"] == len(first["runs"])
    # the published numbers are today's file's, as a call would write them
    today = [e for e in load_published() if e["setting"] in ("same-task", "disjoint-classes")]
    assert today and joined["published"] == today
    stale = json.loads(before)
    stale["published"] = [{**e, "value": 0.5} for e in today]
    assert join(stale, second, "test")["published"] == today
    md = (tmp_path / "a" / "report.md").read_text()
    assert md == render_markdown(joined) and "disjoint-classes ran in another folder" in md
    # a later call in the joined folder keeps the record of the join
    saved = (tmp_path / "a" / "results.json").read_text()
    again = _chunk(tmp_path / "a", "same-task", resume=True)
    assert again["meta"]["joined"] == meta["joined"] and _numbers(again) == _numbers(joined)
    (tmp_path / "a" / "results.json").write_text(saved)
    # nothing new, other code, or other runs of a setting both finished: refused, unchanged
    after = (tmp_path / "a" / "results.json").read_text()
    out = CliRunner().invoke(main, ["report", "-o", str(tmp_path / "a"), "--join",
                                    str(tmp_path / "b")])  # fmt: skip
    assert out.exit_code != 0 and "nothing to join" in out.output
    with pytest.raises(ReportError, match="into itself"):
        join_reports(tmp_path / "a", [tmp_path / "a"])
    other = json.loads(json.dumps(second))
    other["meta"]["code_version"] = "0" * 64
    with pytest.raises(ReportError, match="differ in code_version"):
        join(json.loads(before), other, "test")
    other = json.loads(json.dumps(second))
    other["runs"][0]["metrics"]["accuracy"] += 0.01
    with pytest.raises(ReportError, match="both folders finished same-task seed 0"):
        join(json.loads(before), other, "test")
    assert (tmp_path / "a" / "results.json").read_text() == after
    # a folder that re-ran a setting after the copy was made holds the newer runs: they win,
    # whichever side they are on; both re-running it is refused
    rerun = json.loads(json.dumps(other))
    call = {**rerun["meta"]["calls"][-1], "date": "9999", "settings": ["same-task"]}
    rerun["meta"]["calls"].append(call)
    taken = join(json.loads(before), rerun, "test")
    assert _numbers(taken)[0] == _numbers(rerun)[0] != _numbers(json.loads(before))[0]
    with pytest.raises(ReportError, match="nothing to join"):  # no conflict: the base's win
        join(rerun, second, "test")
    both = json.loads(json.dumps(second))
    both["meta"]["calls"].append({**call, "date": "9998"})
    with pytest.raises(ReportError, match="both folders finished same-task seed 0"):
        join(both, rerun, "test")


@needs_data
def test_a_chunk_of_some_seeds_joins_a_folder_of_all_of_them(tmp_path: Path) -> None:
    """A copy whose first call named one seed (a ResNet chunk: ``--seeds 0``) joins a folder
    configured for more seeds; a folder of fewer seeds cannot take in one of more."""
    _chunk(tmp_path / "all", "same-task", seeds=[0, 1])
    part = _chunk(tmp_path / "part", "disjoint-classes", seeds=[0])
    joined = join_reports(tmp_path / "all", [tmp_path / "part"], command="join")
    meta = joined["meta"]
    assert meta["config"]["seeds"] == [0, 1]
    assert meta["seeds_done"] == {"same-task": [0, 1], "disjoint-classes": [0]}
    assert meta["settings_done"] == ["same-task"]  # disjoint-classes still lacks seed 1
    taken = [r["key"] for r in joined["runs"] if r["setting"] == "disjoint-classes"]
    assert taken == [r["key"] for r in part["runs"]] and taken
    with pytest.raises(ReportError, match=r"seeds: \[0, 1\] are not among \[0\]"):
        join_reports(tmp_path / "part", [tmp_path / "all"], command="join")
