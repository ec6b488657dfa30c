"""symmerge.progress: tqdm on a terminal, few plain lines in logs, and the --json summaries."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from symmerge import progress as progress_module
from symmerge.cli import main
from symmerge.io import save_checkpoint
from symmerge.models import create_model
from symmerge.progress import ENV_VAR, peak_rss_mb, progress_bar, progress_mode


@pytest.fixture(autouse=True)
def _default_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


def _not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module, "is_terminal", lambda: False)


def test_plain_lines_are_few_and_have_no_carriage_returns(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _not_a_terminal(monkeypatch)
    out = [x for x in progress_bar(range(1000), desc="loop", unit="item")]
    assert out == list(range(1000))  # the items pass through, in order
    err = capfd.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 2  # a fast loop: the start and the end only
    assert lines[0] == "loop: started (1000 item)"
    assert re.fullmatch(r"loop: 1000/1000 item \(100%\) in \d+\.\d s( \(.+ item/s\))?", lines[1])

    # no time limit: one line per 10% at most, besides the start and end lines
    bar = progress_bar(range(1000), desc="fast", interval=0.0)
    for k in bar:
        if k == 500:
            bar.set_postfix(loss=0.123456, step=k)
    lines = capfd.readouterr().err.splitlines()
    middle = lines[1:-1]
    counts = [int(re.match(r"fast: (\d+)/1000", line).group(1)) for line in middle]
    assert counts == list(range(100, 1000, 100)), lines  # every 10%, the end line aside
    assert lines[-1].startswith("fast: 1000/1000 it (100%) in ")
    assert lines[-1].endswith(", loss=0.1235, step=500")  # the last postfix goes with it


def test_manual_updates_and_time_limit(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _not_a_terminal(monkeypatch)
    clock = iter(float(t) for t in range(0, 100_000, 3))  # 3 s per reading
    monkeypatch.setattr(progress_module, "_clock", lambda: next(clock))
    with progress_bar(desc="steps", total=None, unit="step", interval=10.0) as bar:
        for _ in range(40):
            bar.update(1)
    lines = capfd.readouterr().err.splitlines()
    # unknown total: a line per 10 s (every 4th update at 3 s each), plus start and end
    assert lines[0] == "steps: started (unknown number of step)"
    assert len(lines) == 2 + 10
    assert lines[1].startswith("steps: 4 step after 12.0 s")
    assert lines[-1].startswith("steps: 40 step in ")


def test_quiet_switch_and_disabled_report_nothing(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _not_a_terminal(monkeypatch)
    monkeypatch.setenv(ENV_VAR, "0")
    assert progress_mode() == "off"
    bar = progress_bar(range(1000), desc="quiet", interval=0.0)
    assert sum(bar) == sum(range(1000))
    bar.set_postfix(x=1)
    bar.close()
    monkeypatch.setenv(ENV_VAR, "auto")
    assert sum(progress_bar(range(1000), desc="off", enabled=False, interval=0.0)) == 499500
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    monkeypatch.setenv(ENV_VAR, "plain")  # forces lines even on a terminal
    monkeypatch.setattr(progress_module, "is_terminal", lambda: True)
    list(progress_bar(range(10), desc="forced"))
    assert capfd.readouterr().err.startswith("forced: started (10 it)\n")
    monkeypatch.setenv(ENV_VAR, "sometimes")
    with pytest.warns(UserWarning, match="SYMMERGE_PROGRESS"):
        assert progress_mode() == "auto"


def test_a_terminal_gets_the_tqdm_bar(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tqdm.auto import tqdm

    monkeypatch.setattr(progress_module, "is_terminal", lambda: True)
    bar = progress_bar(range(50), desc="tty", unit="batch", leave=True)
    assert isinstance(bar, tqdm) and bar.total == 50 and bar.unit == "batch"
    assert sum(bar) == sum(range(50))
    err = capsys.readouterr().err
    assert "\r" in err and "tty" in err and "50/50" in err
    monkeypatch.setenv(ENV_VAR, "0")  # the quiet switch silences the terminal too
    assert not isinstance(progress_bar(range(3), desc="tty"), tqdm)


def test_peak_rss_is_in_mebibytes() -> None:
    before = peak_rss_mb()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    after = peak_rss_mb()
    del block
    assert 10 < before < 1_000_000
    assert after >= before and after >= 64  # a high-water mark, in MiB (not KiB or bytes)


@pytest.mark.skipif(not os.environ.get("SYMMERGE_DATA"), reason="needs SYMMERGE_DATA")
def test_merge_json_records_peak_memory_and_phase_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _not_a_terminal(monkeypatch)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model, config = create_model("mlp", depth=2, width=32)
        paths.append(tmp_path / f"m{seed}.safetensors")
        save_checkpoint(paths[-1], model, config, {"dataset": "mnist", "classes": None})
    out, report = tmp_path / "merged.safetensors", tmp_path / "r.json"
    result = CliRunner().invoke(main, ["merge", *map(str, paths), "-o", str(out),
                                       "--eval-limit", "100", "--json", str(report)])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(report.read_text())
    assert summary["peak_rss_mb"] > 10
    assert set(summary["timings"]) == {"load", "data", "merge", "save", "evaluate"}
    assert all(v >= 0 for v in summary["timings"].values())
    assert summary["timings"]["evaluate"] > 0
    assert summary["seconds"] + 1e-3 >= sum(summary["timings"].values()) > 0  # rounded to 1e-4
    assert 0 <= summary["merge_seconds"] <= summary["timings"]["merge"]
    assert isinstance(summary["result"]["timings"], dict)  # the method's own stages
