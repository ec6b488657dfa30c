"""Join report folders whose chunks ran side by side (two processes or machines at once) into
one results document, as if the chunks had run one after another in one folder.

:func:`symmerge.report.run_report` writes its whole document after each setting and seed, so
two calls must not share a folder; each runs in a copy of the report folder instead, and
``symmerge report -o BASE --join OTHER`` adds to ``BASE`` the settings and seeds that
``OTHER`` finished and ``BASE`` lacks (runs, endpoints and peer runs, with the calls that
made them). Folders of another scale, methods, code or training code, with seeds that are not
among ``BASE``'s (a copy whose first call named some seeds, ``--seeds 0``, joins a folder of
all of them), settings whose definitions differ, and a setting and seed finished in both with
other runs are refused unless exactly one of the folders ran that setting again after the
calls the two share (a copy that re-ran it after the copy was made): that folder's runs are
the newer ones and are kept. A joined document never mixes code or configurations. A setting
and seed ``OTHER`` did not finish is left out. The published numbers are today's
(``report/published.json``), as a call writes them. Joining copies runs as they are, so this module
stays outside the runs' code version (:data:`symmerge.report.provenance.MERGE_CODE_EXCLUDED`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from symmerge.report.provenance import command_line, git_commit, now
from symmerge.report.runner import CONFIG_KEYS, finished_settings, save_in_order
from symmerge.report.schema import RESULTS_FILE, ReportError, load_published, load_results
from symmerge.report.settings import definition_of, settings_for

__all__ = ["join", "join_reports", "recorded_command"]

#: What both folders must share (beside the configuration, :data:`CONFIG_KEYS`).
SAME_META = ("code_version", "training_code_version", "device")
PARTS = ("runs", "endpoints")


def _of(entries: Sequence[dict[str, Any]], done: set[tuple[str, int]]) -> list[dict[str, Any]]:
    return [e for e in entries if (e["setting"], e["seed"]) in done]


def _done(meta: dict[str, Any]) -> set[tuple[str, int]]:
    return {(n, sd) for n, seeds in meta.get("seeds_done", {}).items() for sd in seeds}


def _rerun(meta: dict[str, Any], shared: set[str]) -> set[str]:
    """The settings a folder's calls ran after the calls it shares with the other folder."""
    return {n for c in meta["calls"] if json.dumps(c, sort_keys=True) not in shared
            for n in c["settings"]}  # fmt: skip


def _check(base: dict[str, Any], other: dict[str, Any]) -> set[tuple[str, int]]:
    """Refuse folders that cannot join; returns the settings and seeds both finished that
    ``other`` alone ran again since they parted (its runs replace ``base``'s)."""
    a, b = base["meta"], other["meta"]
    differs = [f"{k}: {a['config'][k]} and {b['config'][k]}" for k in CONFIG_KEYS
               if k != "seeds" and a["config"][k] != b["config"][k]]  # fmt: skip
    if not set(b["config"]["seeds"]) <= set(a["config"]["seeds"]):  # a chunk of some seeds joins
        differs.append(f"seeds: {b['config']['seeds']} are not among {a['config']['seeds']}")
    differs += [f"{k}: {a[k]} and {b[k]}" for k in SAME_META if a[k] != b[k]]
    differs += [f"the definition of {n}" for n in set(a["settings"]) & set(b["settings"])
                if definition_of(a["settings"][n]) != definition_of(b["settings"][n])]  # fmt: skip
    if differs:
        raise ReportError(f"cannot join: the folders differ in {'; '.join(differs)}")
    shared = {json.dumps(c, sort_keys=True) for c in a["calls"]}
    shared &= {json.dumps(c, sort_keys=True) for c in b["calls"]}
    mine_again, theirs_again = _rerun(a, shared), _rerun(b, shared)
    newer = set()
    for name, seed in sorted(_done(a) & _done(b)):
        for part in (*PARTS, "peers"):
            mine = base[part]["runs"] if part == "peers" else base[part]
            theirs = other[part]["runs"] if part == "peers" else other[part]
            if _of(mine, {(name, seed)}) == _of(theirs, {(name, seed)}):
                continue
            if (name in mine_again) != (name in theirs_again):  # one side's runs are newer
                if name in theirs_again:
                    newer.add((name, seed))
                continue
            raise ReportError(
                f"cannot join: both folders finished {name} seed {seed} with other {part}; "
                "keep one of them (rerun it in one folder with --resume)"
            )
    return newer


def join(base: dict[str, Any], other: dict[str, Any], command: str) -> dict[str, Any]:
    """``base`` with the settings and seeds ``other`` finished and ``base`` lacks."""
    newer = _check(base, other)
    a, b = base["meta"], other["meta"]
    added = (_done(b) - _done(a)) | newer
    if not added:
        raise ReportError("nothing to join: the other folder finished nothing this one lacks")
    latest = max(a, b, key=lambda m: m["date"])
    doc = json.loads(json.dumps(base))
    meta = doc["meta"]
    for key in ("command", "git_commit", "date", "hardware", "threads", "versions"):
        meta[key] = latest[key]
    scale = list(settings_for(a["scale"]))  # today's order, as the next call would write it
    names = [n for n in dict.fromkeys([*scale, *a["settings"], *b["settings"]])
             if n in a["settings"] or n in b["settings"]]  # fmt: skip
    meta["scale_settings"] = scale
    meta["settings"] = {n: (a["settings"] | b["settings"])[n] for n in names}
    meta["config"]["settings"] = names
    meta["not_run"] = {n: (a["not_run"] | b["not_run"])[n] for n in names}
    meta["seeds_done"] = {n: sorted({*a["seeds_done"].get(n, []), *b["seeds_done"].get(n, [])})
                          for n in names}  # fmt: skip
    meta["settings_done"] = finished_settings(meta)
    calls = {json.dumps(c, sort_keys=True): c for c in a["calls"] + b["calls"]}
    meta["calls"] = sorted(calls.values(), key=lambda c: c["date"])
    meta["complete"] = a.get("complete", True) and b.get("complete", True)
    meta["reused_runs"] = latest.get("reused_runs", 0)
    joined = {json.dumps(j, sort_keys=True): j for j in a.get("joined", []) + b.get("joined", [])}
    meta["joined"] = list(joined.values())
    new = sorted({n for n, _ in added}, key=names.index)
    if meta["joined"] and meta["joined"][-1]["command"] == command:  # one call, several folders
        last = meta["joined"][-1]
        last["settings"] = [n for n in names if n in {*last["settings"], *new}]
    else:
        meta["joined"].append({"command": command, "date": now(), "git_commit": git_commit(),
                               "settings": new})  # fmt: skip
    for part in PARTS:
        doc[part] = [e for e in doc[part] if (e["setting"], e["seed"]) not in added]
        doc[part] += _of(other[part], added)
        doc[part].sort(key=lambda e: e["seed"])  # then by setting (stable): save_in_order
    peers = [e for e in doc["peers"]["runs"] if (e["setting"], e["seed"]) not in added]
    doc["peers"]["runs"] = peers + _of(other["peers"]["runs"], added)
    made = len((other if latest is b else base)["runs"]) - latest.get("kept_runs", 0)
    meta["kept_runs"] = len(doc["runs"]) - made  # all but what the latest call made or reused
    doc["published"] = [e for e in load_published() if e["setting"] in names]  # as a call does
    return doc


def recorded_command(command: str) -> str:
    """``command`` as a results file records it: the folders joined are usually throw-away
    copies in the temporary folder, named ``$TMPDIR/...`` rather than by this machine's
    path."""
    return command.replace(os.path.join(tempfile.gettempdir(), ""), "$TMPDIR/")


def join_reports(
    base: str | Path, others: Sequence[str | Path], command: str | None = None
) -> dict[str, Any]:
    """Join the report folders ``others`` into the report folder ``base`` (:func:`join`, one
    after another), write ``base``'s ``results.json`` and return it; nothing is written when
    a join is refused."""
    path = Path(base) / RESULTS_FILE
    if not path.exists():
        raise ReportError(f"cannot join into {base}: it has no {RESULTS_FILE}")
    doc = load_results(path)
    command = recorded_command(command if command is not None else command_line())
    for other in others:
        if Path(other).resolve() == Path(base).resolve():
            raise ReportError(f"cannot join {other} into itself")
        if not (Path(other) / RESULTS_FILE).exists():
            raise ReportError(f"cannot join {other}: it has no {RESULTS_FILE}")
        doc = join(doc, load_results(Path(other) / RESULTS_FILE), command)
    save_in_order(doc, path)
    return load_results(path)
