"""Join report folders whose chunks ran side by side (two processes or machines at once) into
one results document, as if the chunks had run one after another in one folder.

``symmerge report --resume`` writes its whole document after each setting and seed, so two
calls must not share a folder; each runs in a copy of the report folder instead, and this
script joins them: ``python benchmarks/report_join.py BASE OTHER`` adds to ``BASE`` the setting
and seeds that ``OTHER`` finished and ``BASE`` lacks (runs, endpoints and peer runs, with the
calls that made them), then redraws ``BASE``'s report. It refuses folders of another scale,
methods, seeds, code or training code, settings whose definitions differ, and a setting and
seed finished in both with other runs: a joined document never mixes code or configurations.
A setting and seed ``OTHER`` did not finish is left out. Not part of the symmerge package: it
changes no numbers, so it stays outside the runs' code version.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import display_path

from symmerge.report.provenance import command_line, git_commit, now
from symmerge.report.render import write_report
from symmerge.report.runner import CONFIG_KEYS, _finished, _save
from symmerge.report.schema import RESULTS_FILE, ReportError, load_results
from symmerge.report.settings import DESCRIPTION_FIELDS

#: What both folders must share (beside the configuration, :data:`CONFIG_KEYS`).
SAME_META = ("code_version", "training_code_version", "device")
PARTS = ("runs", "endpoints")


def _definition(setting: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in setting.items() if k not in DESCRIPTION_FIELDS}


def _of(entries: Sequence[dict[str, Any]], done: set[tuple[str, int]]) -> list[dict[str, Any]]:
    return [e for e in entries if (e["setting"], e["seed"]) in done]


def _done(meta: dict[str, Any]) -> set[tuple[str, int]]:
    return {(n, sd) for n, seeds in meta.get("seeds_done", {}).items() for sd in seeds}


def _check(base: dict[str, Any], other: dict[str, Any]) -> None:
    a, b = base["meta"], other["meta"]
    differs = [f"{k}: {a['config'][k]} and {b['config'][k]}" for k in CONFIG_KEYS
               if a["config"][k] != b["config"][k]]  # fmt: skip
    differs += [f"{k}: {a[k]} and {b[k]}" for k in SAME_META if a[k] != b[k]]
    differs += [f"the definition of {n}" for n in set(a["settings"]) & set(b["settings"])
                if _definition(a["settings"][n]) != _definition(b["settings"][n])]  # fmt: skip
    if differs:
        raise ReportError(f"cannot join: the folders differ in {'; '.join(differs)}")
    for name, seed in sorted(_done(a) & _done(b)):
        for part in (*PARTS, "peers"):
            mine = base[part]["runs"] if part == "peers" else base[part]
            theirs = other[part]["runs"] if part == "peers" else other[part]
            if _of(mine, {(name, seed)}) != _of(theirs, {(name, seed)}):
                raise ReportError(
                    f"cannot join: both folders finished {name} seed {seed} with other {part}; "
                    "keep one of them (rerun it in one folder with --resume)"
                )


def join(base: dict[str, Any], other: dict[str, Any], command: str) -> dict[str, Any]:
    """``base`` with the settings and seeds ``other`` finished and ``base`` lacks."""
    _check(base, other)
    a, b = base["meta"], other["meta"]
    added = _done(b) - _done(a)
    if not added:
        raise ReportError("nothing to join: the other folder finished nothing this one lacks")
    latest = max(a, b, key=lambda m: m["date"])
    doc = json.loads(json.dumps(base))
    meta = doc["meta"]
    for key in ("command", "git_commit", "date", "hardware", "threads", "versions"):
        meta[key] = latest[key]
    names = [n for n in a["scale_settings"] if n in a["settings"] or n in b["settings"]]
    meta["settings"] = {n: (a["settings"] | b["settings"])[n] for n in names}
    meta["config"]["settings"] = names
    meta["not_run"] = {n: (a["not_run"] | b["not_run"])[n] for n in names}
    meta["seeds_done"] = {n: sorted({*a["seeds_done"].get(n, []), *b["seeds_done"].get(n, [])})
                          for n in names}  # fmt: skip
    meta["settings_done"] = _finished(meta)
    calls = {json.dumps(c, sort_keys=True): c for c in a["calls"] + b["calls"]}
    meta["calls"] = sorted(calls.values(), key=lambda c: c["date"])
    meta["complete"] = a.get("complete", True) and b.get("complete", True)
    meta["reused_runs"] = latest.get("reused_runs", 0)
    joined = {json.dumps(j, sort_keys=True): j for j in a.get("joined", []) + b.get("joined", [])}
    meta["joined"] = [*joined.values(), {
        "command": command, "date": now(), "git_commit": git_commit(),
        "settings": sorted({n for n, _ in added}, key=names.index),
    }]  # fmt: skip
    for part in PARTS:
        doc[part] = [e for e in doc[part] if (e["setting"], e["seed"]) not in added]
        doc[part] += _of(other[part], added)
        doc[part].sort(key=lambda e: e["seed"])  # then by setting (stable), as _save does
    peers = [e for e in doc["peers"]["runs"] if (e["setting"], e["seed"]) not in added]
    doc["peers"]["runs"] = peers + _of(other["peers"]["runs"], added)
    made = len((other if latest is b else base)["runs"]) - latest.get("kept_runs", 0)
    meta["kept_runs"] = len(doc["runs"]) - made  # all but what the latest call made or reused
    published = {json.dumps(e, sort_keys=True): e for e in base["published"] + other["published"]}
    doc["published"] = [e for e in published.values() if e["setting"] in names]
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="the report folder to join into")
    parser.add_argument("other", type=Path, nargs="+", help="folders whose chunks it gains")
    args = parser.parse_args(argv)
    command = command_line(None if argv is None else ["report_join.py", *argv])
    doc = load_results(args.base / RESULTS_FILE)
    try:
        for other in args.other:
            doc = join(doc, load_results(other / RESULTS_FILE), command)
    except ReportError as exc:
        parser.exit(2, f"report_join: {exc}\n")
    _save(doc, doc["meta"]["config"]["settings"], args.base / RESULTS_FILE)
    write_report(doc, args.base)
    print(f"joined into {display_path(args.base / RESULTS_FILE)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
