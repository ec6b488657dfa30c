"""``results.json``: the one document a report is drawn from, versioned and validated.

Schema (``schema_version`` 1)::

    {"schema_version": 1,
     "meta": {"command", "git_commit", "code_version", "training_code_version", "versions",
              "hardware", "threads", "device", "date", "scale", "seeds", "config",
              "settings": {name: Setting.to_dict()}, "methods": {name: MethodInfo.to_dict()},
              "not_run": {method: reason},
              optional: "complete", "reused_runs", "kept_runs", "scale_settings" (every
              setting of the scale), "settings_done" (those that ran every seed), "seeds_done"
              ({setting: [seeds that ran]}), "calls"
              (each call of a report run in chunks: command, git_commit, date, settings,
              hardware, threads)},
     "endpoints": [{"setting", "seed", "data": {...}, "sources": [{"sha256", "weights_sha256",
                    "file", "recipe", "metrics", optional "reference": {"file", "sha256",
                    "trained", ...} for a reference checkpoint used as it is}]}],
     "runs": [{"key", "setting", "method", "label", "seed", "params", "renorm", "heads",
               "budget", "checkpoints": [sha256, ...], "data": {...} | null, "status",
               "error", "metrics": {"accuracy", "loss", "per_dataset" | "per_task",
               "params", "macs", "macs_ratio"}, "timings": {...}, "memory": {...},
               "warnings": [...]}],
     "published": [{"setting", "method", "metric", "value", "tag", "source", "differs", ...}],
     "peers": {"runs": [{"peer", "version", "status", "reason", "setting", "seed",
                         "checkpoints": [sha256, ...], "metrics": {"accuracy", ...} | null,
                         "seconds", "ours": {"accuracy", "merge_wall_s", ...} | null,
                         "ratio", "call", "install", ...}],
               "reason": str (why the peers not in "runs" are missing), "enabled": bool}}

Every run of a setting and seed merges the same checkpoints on the same data: validation
refuses a document that mixes them. A failed run keeps its row, with ``status: "failed"`` and
the ``error``; it is never dropped. A peer entry (the peer's own code on the same
checkpoints, :mod:`symmerge.report.peers`) has ``status`` ``"ok"``, ``"not run"`` or
``"failed"``, the latter two with the exact ``reason``; an ``"ok"`` one must name the same
checkpoints as its setting and seed's endpoints. (Version 1 documents written before peers
ran have an empty ``runs`` list; they stay valid.)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "PUBLISHED_TAGS",
    "RESULTS_FILE",
    "SCHEMA_VERSION",
    "ReportError",
    "load_published",
    "load_results",
    "new_document",
    "save_results",
    "validate",
]

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
PUBLISHED_TAGS = ("paper", "code", "secondary")

META_KEYS = ("command", "git_commit", "code_version", "training_code_version", "versions",
             "hardware", "threads", "device", "date", "scale", "seeds", "config", "settings",
             "methods", "not_run")  # fmt: skip
RUN_KEYS = ("key", "setting", "method", "label", "seed", "params", "renorm", "heads", "budget",
            "checkpoints", "data", "status", "error", "metrics", "timings", "memory")  # fmt: skip
PUBLISHED_KEYS = ("setting", "method", "metric", "value", "tag", "source", "differs")
PEER_KEYS = ("peer", "version", "status", "reason", "setting", "seed", "checkpoints", "metrics",
             "seconds", "ours", "ratio")  # fmt: skip
PEER_STATUSES = ("ok", "not run", "failed")


class ReportError(ValueError):
    """Input a report cannot use: unknown names, a results file of another schema, a resume
    folder of another configuration or code version, a scale this machine cannot run."""


def new_document(meta: dict[str, Any], published: list[dict[str, Any]], peers: dict[str, Any]
                 ) -> dict[str, Any]:  # fmt: skip
    """An empty results document."""
    return {"schema_version": SCHEMA_VERSION, "meta": meta, "endpoints": [], "runs": [],
            "published": published, "peers": peers}  # fmt: skip


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise ReportError(f"invalid results document: {where} {what}")


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def validate(doc: Any) -> dict[str, Any]:
    """``doc`` if it is a valid results document of this schema version, else
    :class:`ReportError` naming the first problem."""
    _need(isinstance(doc, dict), "the document", "must be a JSON object")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ReportError(
            f"results schema_version {version!r} is not the version this symmerge reads "
            f"({SCHEMA_VERSION}); regenerate it with `symmerge report` of the matching version"
        )
    for key in ("meta", "endpoints", "runs", "published", "peers"):
        _need(key in doc, "the document", f"has no {key!r}")
    meta = doc["meta"]
    _need(isinstance(meta, dict), "meta", "must be an object")
    for key in META_KEYS:
        _need(key in meta, "meta", f"has no {key!r}")
    for i, run in enumerate(doc["runs"]):
        _validate_run(run, f"runs[{i}]")
    shared: dict[tuple[str, int], tuple[Any, Any]] = {}
    for i, end in enumerate(doc["endpoints"]):
        where = f"endpoints[{i}]"
        for key in ("setting", "seed", "data", "sources"):
            _need(key in end, where, f"has no {key!r}")
        shas = [s["sha256"] for s in end["sources"]]
        shared[(end["setting"], end["seed"])] = (shas, (end["data"] or {}).get("sha256"))
    for i, run in enumerate(doc["runs"]):
        if run["status"] != "ok":
            continue
        found = shared.get((run["setting"], run["seed"]))
        _need(found is not None, f"runs[{i}]", "has no endpoints entry for its setting and seed")
        data = run["data"]["sha256"] if run["data"] else found[1]
        _need(run["checkpoints"] == found[0] and data == found[1], f"runs[{i}]",
              f"({run['label']}) does not merge the checkpoints and data of the other runs of "
              f"{run['setting']} seed {run['seed']}")  # fmt: skip
    _need(isinstance(doc["published"], list), "published", "must be a list")
    for i, entry in enumerate(doc["published"]):
        _validate_published(entry, f"published[{i}]")
    peers = doc["peers"]
    _need(isinstance(peers, dict) and isinstance(peers.get("runs"), list), "peers",
          "must be an object with a 'runs' list")  # fmt: skip
    _need(bool(peers["runs"]) or isinstance(peers.get("reason"), str), "peers",
          "without runs needs a 'reason'")  # fmt: skip
    for i, entry in enumerate(peers["runs"]):
        _validate_peer(entry, f"peers.runs[{i}]", shared)
    return doc


def _validate_peer(
    entry: Any, where: str, shared: Mapping[tuple[str, int], tuple[Any, Any]]
) -> None:
    """A peer entry: a reason unless it ran; when it ran, our checkpoints, an accuracy and a
    time (and ours, when present, with both)."""
    _need(isinstance(entry, dict), where, "must be an object")
    for key in PEER_KEYS:
        _need(key in entry, where, f"has no {key!r}")
    _need(entry["status"] in PEER_STATUSES, where,
          f"has status {entry['status']!r}; statuses: {', '.join(PEER_STATUSES)}")  # fmt: skip
    if entry["status"] != "ok":
        _need(isinstance(entry["reason"], str) and bool(entry["reason"]), where,
              f"is {entry['status']!r} without a reason")  # fmt: skip
        return
    _need(isinstance(entry["version"], str) and bool(entry["version"]), where,
          "ran without a package version")  # fmt: skip
    found = shared.get((entry["setting"], entry["seed"]))
    _need(found is not None and entry["checkpoints"] == found[0], where,
          f"({entry['peer']}) does not run on the checkpoints of {entry['setting']} seed "
          f"{entry['seed']}")  # fmt: skip
    metrics = entry["metrics"]
    acc = metrics.get("accuracy") if isinstance(metrics, dict) else None
    _need(_is_number(acc) and 0.0 <= acc <= 1.0, where, f"has accuracy {acc!r}")
    _need(_is_number(entry["seconds"]) and entry["seconds"] > 0, where,
          f"has seconds {entry['seconds']!r}")  # fmt: skip
    ours = entry["ours"]
    if ours is not None:
        _need(isinstance(ours, dict) and _is_number(ours.get("accuracy"))
              and _is_number(ours.get("merge_wall_s")), where,
              "has 'ours' without an accuracy and merge_wall_s")  # fmt: skip
    _need(entry["ratio"] is None or _is_number(entry["ratio"]), where,
          f"has ratio {entry['ratio']!r}")  # fmt: skip


def _validate_run(run: Any, where: str) -> None:
    _need(isinstance(run, dict), where, "must be an object")
    for key in RUN_KEYS:
        _need(key in run, where, f"has no {key!r}")
    _need(run["status"] in ("ok", "failed"), where, f"has status {run['status']!r}")
    if run["status"] == "failed":
        _need(isinstance(run["error"], str) and bool(run["error"]), where,
              "failed without a reason")  # fmt: skip
        return
    metrics = run["metrics"]
    _need(isinstance(metrics, dict), where, "has no metrics")
    acc = metrics.get("accuracy")
    _need(_is_number(acc) and 0.0 <= acc <= 1.0, where, f"has accuracy {acc!r}")
    for key in ("params", "macs"):
        _need(_is_number(metrics.get(key)), where, f"has no {key!r} count")
    _need(isinstance(run["checkpoints"], list) and len(run["checkpoints"]) >= 2, where,
          "needs the sha256 of every input checkpoint")  # fmt: skip


def _validate_published(entry: Any, where: str) -> None:
    _need(isinstance(entry, dict), where, "must be an object")
    for key in PUBLISHED_KEYS:
        _need(key in entry, where, f"has no {key!r}")
    _need(entry["tag"] in PUBLISHED_TAGS, where,
          f"has tag {entry['tag']!r}; tags: {', '.join(PUBLISHED_TAGS)}")  # fmt: skip
    value = entry["value"]
    ok = _is_number(value) or (
        isinstance(value, list) and len(value) == 2 and all(map(_is_number, value))
    )
    _need(ok, where, f"has value {value!r} (a number or a [low, high] range)")
    _need(bool(entry["source"]), where, "names no source")


def load_results(path: str | Path) -> dict[str, Any]:
    """The validated document in ``path`` (a results file or the folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.exists():
        raise ReportError(f"{path} does not exist (run `symmerge report -o DIR` first)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from None
    return validate(doc)


def save_results(doc: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``doc`` to ``path`` atomically (a half-written file never replaces a good one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def load_published() -> list[dict[str, Any]]:
    """The published numbers committed with the package (``report/published.json``),
    validated."""
    text = resources.files("symmerge.report").joinpath("published.json").read_text()
    entries = json.loads(text)["entries"]
    for i, entry in enumerate(entries):
        _validate_published(entry, f"published.json entries[{i}]")
    return entries
