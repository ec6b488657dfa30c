"""Run a report: train (or reuse) every setting's checkpoints, run every applicable method on
the same checkpoints and data, evaluate, and write ``results.json`` as it goes.

Only the public API is used (:func:`symmerge.merging.merge`, :func:`symmerge.methods.method_info`,
:func:`symmerge.train.train_model`, :mod:`symmerge.evaluate`, :mod:`symmerge.sources`), so a
method enters the report by being registered. A run that fails is recorded with its reason.
Runs are keyed by their setting's definition, method, keywords, seed, checkpoints, data and the
code version (:func:`symmerge.report.provenance.merge_code_version`): ``resume`` reuses a
finished run only under the same key, in a folder made by the same scale, methods, seeds and
code. The settings' definitions are not part of the code version: a setting added to a scale
joins a folder under way, and one whose definition changed is rerun whole before the folder
resumes.

A report folder's configuration is its scale, methods and seeds; its settings accumulate. A
long scale therefore runs in chunks, one or a few settings per call (per session), into one
folder, and ends as one document covering all of them::

    symmerge report --scale cpu --settings same-task,n-models -o R      # first chunk
    symmerge report --scale cpu --settings resnet20 -o R --resume       # later chunks
    symmerge report --scale cpu --settings resnet20-ln --seeds 0 -o R --resume  # one seed
    ...
    symmerge report --render-only -o R                                  # redraw (optional)

A call reruns (or reuses, by key) the settings it names, at the seeds it names (some of the
folder's; all by default), and keeps the runs of the others as they are. A setting
interrupted mid-way is kept and marked incomplete; naming it again reuses its finished runs
and every checkpoint already trained (``R/checkpoints``, keyed by recipe, data and training
code, so settings share them). A reference checkpoint of the same recipe in
``$SYMMERGE_CHECKPOINTS`` is used instead of training (:func:`train_or_reuse`). A folder made
by other code is refused as a whole: no run is ever served from other code.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import random
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from symmerge.report import provenance
from symmerge.report.checkpoints import Checkpoint, train_many, train_or_reuse
from symmerge.report.peers import PEERS, PEERS_REASON, Peer
from symmerge.report.schema import (
    RESULTS_FILE,
    ReportError,
    load_published,
    load_results,
    new_document,
    save_results,
)
from symmerge.report.settings import (
    DEFAULT_SEEDS,
    SCALES,
    Job,
    Setting,
    applicability,
    definition_of,
    jobs,
    settings_for,
)

__all__ = ["check_scale", "run_report", "select"]

#: What identifies a report folder: a call with other values is refused (settings accumulate).
CONFIG_KEYS = ("scale", "methods", "seeds")

#: λ of the interpolation curves (two models merged by a matching): the endpoints, the
#: midpoint where barriers usually peak, and the quarters.
CURVE_LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)

#: Batch size of the merge data.
DATA_BATCH = 500
CHECKPOINT_DIR = "checkpoints"


def check_scale(scale: str) -> None:
    """Raise :class:`ReportError` unless this version can run ``scale`` on this machine."""
    if scale not in SCALES:
        raise ReportError(f"unknown scale {scale!r}; scales: {', '.join(SCALES)}")
    if scale == "paper" and not torch.cuda.is_available():
        raise ReportError(
            "--scale paper needs a CUDA GPU and none is available; it never runs on the CPU "
            "at another scale instead (use --scale smoke)"
        )
    try:
        settings_for(scale)
    except NotImplementedError as exc:
        raise ReportError(f"{exc} (use --scale smoke)") from None


def select(names: Sequence[str] | None, valid: Sequence[str], kind: str) -> list[str]:
    """``names`` checked against ``valid`` (all of ``valid`` when ``None``), in ``valid``'s
    order; an unknown name is a :class:`ReportError` listing the valid ones."""
    if names is None:
        return list(valid)
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ReportError(f"unknown {kind} {', '.join(map(repr, unknown))}; valid {kind}s: "
                          f"{', '.join(valid)}")  # fmt: skip
    if not names:
        raise ReportError(f"no {kind}s selected; valid {kind}s: {', '.join(valid)}")
    return [n for n in valid if n in names]


@dataclass
class _Context:
    """What every run of a setting and seed shares."""

    checkpoints: list[Checkpoint]
    data: list[tuple[Tensor, Tensor]]
    data_record: dict[str, Any]
    tests: list[tuple[str, Tensor, Tensor]]
    example: Tensor
    macs: float
    spec: Any = None  # the first source's symmetry spec, traced when a curve needs it


def run_report(
    output: str | Path,
    *,
    scale: str = "smoke",
    settings: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    data_root: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
    peers: bool = True,
    peer_root: str | Path | None = None,
    train_jobs: int = 1,
) -> dict[str, Any]:
    """Run the report into ``output`` and return its results document.

    Args:
        output: the report folder: ``results.json`` (written after every run, so a
            killed call keeps its finished runs for --resume), ``checkpoints/`` (the sources,
            reused across calls while their key matches).
        scale: ``"smoke"`` or ``"cpu"`` (``"paper"`` is not built yet).
        settings, methods: names to run (default: all of the scale's; methods from
            :func:`symmerge.methods.list_methods`).
        seeds: report seeds (default: the scale's).
        data_root: the datasets' folder.
        resume: continue a report in ``output`` of the same scale, methods, seeds and code
            version, reusing its finished runs; the settings named are run (or reused) and
            the folder's other settings kept, so a scale can run in chunks (see the module
            docstring). Without it a folder holding results is refused.
        progress: report progress on stderr.
        command: the command line to record (default: ``sys.argv``).
        peers: run the peers' own code beside ours
            (:data:`symmerge.report.peers.PEERS`), each in a subprocess. A peer
            that is not installed is recorded as ``"not run"`` with the reason and the
            install command; nothing is installed and the report never fails for it.
        peer_root: the folder of peer packages (default ``$SYMMERGE_PEERS``, else
            ``~/.cache/symmerge/peers``); a peer is looked for in its subfolder
            (``rebasin/``, ``c2m3/``).
        train_jobs: train the sources the call needs and the folder lacks this many at a time,
            in separate processes sharing this process's torch threads, before any run
            (:func:`symmerge.report.checkpoints.train_many`; the same files, sooner).
    """
    from symmerge.methods import list_methods, method_info
    from symmerge.progress import progress_bar

    check_scale(scale)
    defs = settings_for(scale)
    chosen = select(settings, list(defs), "setting")
    methods = select(methods, list_methods(), "method")
    if seeds is not None and not seeds:
        raise ReportError("no seeds selected")
    if train_jobs < 1:
        raise ReportError(f"train_jobs must be at least 1, got {train_jobs}")
    config = {"scale": scale, "methods": methods,
              "seeds": list(DEFAULT_SEEDS[scale] if seeds is None else seeds)}  # fmt: skip
    code = provenance.merge_code_version()
    out = Path(output)
    before = _previous_document(out, config, code, resume, seeds_given=seeds is not None)
    if before is not None:  # the folder's seeds; this call runs those asked for
        config["seeds"] = list(before["meta"]["config"]["seeds"])
    seeds = list(config["seeds"] if seeds is None else seeds)
    if before is not None:
        _check_definitions(before, defs, chosen, seeds, out)

    def kept_run(r: dict[str, Any]) -> bool:  # of a setting or seed this call does not run
        return r["setting"] not in chosen or r["seed"] not in seeds

    previous = {} if before is None else {r["key"]: r for r in before["runs"]
                                           if r["status"] == "ok"}  # fmt: skip
    earlier = [] if before is None else before["meta"]["config"]["settings"]
    names = [n for n in defs if n in chosen or n in earlier]  # the document's, in scale order
    root = None if data_root is None else str(data_root)

    plan = [(name, seed, job) for name in chosen for seed in seeds
            for job in jobs(defs[name], methods)]  # fmt: skip
    not_run = {name: {m: why for m in methods
                      if (why := applicability(defs[name], method_info(m))) is not None}
               for name in names}  # fmt: skip
    call = {
        "command": command if command is not None else provenance.command_line(),
        "git_commit": provenance.git_commit(),
        "date": provenance.now(),
        "settings": chosen,
        "hardware": provenance.hardware(),
        "threads": torch.get_num_threads(),
    }
    seeds_done = {} if before is None else _seeds_done(before["meta"])
    seeds_done = {n: [sd for sd in seeds_done.get(n, []) if n not in chosen or sd not in seeds]
                  for n in names}  # fmt: skip
    meta = {
        "command": call["command"],
        "git_commit": call["git_commit"],
        "code_version": code,
        "training_code_version": provenance.training_code_version(),
        "versions": provenance.package_versions(),
        "hardware": call["hardware"],
        "threads": call["threads"],
        "device": "cpu",
        "date": call["date"],
        "scale": scale,
        "seeds": config["seeds"],
        "config": {**config, "settings": names},
        "settings": {name: defs[name].to_dict() for name in names},
        "scale_settings": list(defs),
        "settings_done": [],
        "seeds_done": seeds_done,
        "calls": ([] if before is None else _calls(before["meta"])) + [call],
        "methods": {m: method_info(m).to_dict() for m in methods},
        "not_run": not_run,
        "complete": False,
        "reused_runs": 0,
        "kept_runs": 0,
    }
    if before is not None and before["meta"].get("joined"):  # the folders joined into it
        meta["joined"] = before["meta"]["joined"]
    published = [e for e in load_published() if e["setting"] in names]
    peer_doc = _peers_header(peers, names)
    if before is not None:  # runs are kept with the setting and seed they ran on
        peer_doc["runs"] = [r for r in before["peers"]["runs"] if kept_run(r)]
    doc = new_document(meta, published, peer_doc)
    if before is not None:
        doc["runs"] = [r for r in before["runs"] if kept_run(r)]
        doc["endpoints"] = [e for e in before["endpoints"] if kept_run(e)]
        meta["kept_runs"] = len(doc["runs"])
    meta["settings_done"] = finished_settings(meta)
    results = out / RESULTS_FILE
    bar = progress_bar(total=len(plan), desc=f"report ({scale})", unit="run", enabled=progress)
    try:
        if train_jobs > 1:  # a failure is met again, and recorded, where its setting is prepared
            bar.set_postfix(run=f"training sources, {train_jobs} at a time")
            recipes = [s.recipe(sd) for n in chosen for sd in seeds for s in defs[n].sources]
            train_many(recipes, out / CHECKPOINT_DIR, code=meta["training_code_version"],
                       data_root=root, jobs=train_jobs)  # fmt: skip
        for name in chosen:
            setting = defs[name]
            for seed in seeds:
                todo = [job for s, sd, job in plan if s == name and sd == seed]
                here = [p for p in PEERS.get(name, ()) if peers and (
                    not p.first_seed_only or seed == config["seeds"][0])]  # fmt: skip
                if not todo and not here:
                    continue
                try:
                    ctx = _prepare(setting, seed, out, root, doc)
                except Exception as exc:  # every run of the setting and seed fails with it
                    reason = " ".join(f"preparing {name}: {type(exc).__name__}: {exc}".split())
                    doc["runs"] += [_failed(setting, seed, job, reason) for job in todo]
                    doc["peers"]["runs"] += [_peer_not_prepared(p, name, seed, reason)
                                             for p in here]  # fmt: skip
                    bar.update(len(todo))
                else:
                    for job in todo:
                        bar.set_postfix(run=f"{name} {job.label}")
                        record = _run_or_reuse(setting, seed, job, ctx, code, previous)
                        meta["reused_runs"] += bool(record.pop("_reused", False))
                        doc["runs"].append(record)
                        save_in_order(doc, results)  # a killed call keeps what it finished
                        bar.update(1)
                    for p in here:
                        bar.set_postfix(run=f"{name} peer {p.name}")
                        doc["peers"]["runs"].append(_peer_run(p, setting, seed, ctx, doc,
                                                              peer_root))  # fmt: skip
                meta["seeds_done"][name] = sorted({*meta["seeds_done"][name], seed})
                meta["settings_done"] = finished_settings(meta)
                save_in_order(doc, results)
    finally:
        bar.close()
    meta["complete"] = True
    save_in_order(doc, results)
    return load_results(results)


def save_in_order(doc: dict[str, Any], path: Path) -> None:
    """Write ``doc`` with its runs and endpoints in setting order (kept settings first come
    from the earlier document; a chunked report reads like one made in a single call)."""
    order = {n: k for k, n in enumerate(doc["meta"]["config"]["settings"])}
    doc["meta"]["settings_done"].sort(key=order.__getitem__)
    for part in ("runs", "endpoints"):
        doc[part].sort(key=lambda r: order[r["setting"]])
    save_results(doc, path)


def _seeds_done(meta: dict[str, Any]) -> dict[str, list[int]]:
    """The seeds of each setting that ran to the end (a document from before seed chunks
    records the settings that ran every seed; one from before chunks, none: all of its
    settings when its call completed)."""
    if "seeds_done" in meta:
        return {k: list(v) for k, v in meta["seeds_done"].items()}
    if "settings_done" in meta:
        done = meta["settings_done"]
    else:
        done = meta["config"]["settings"] if meta.get("complete", True) else []
    return {n: list(meta["config"]["seeds"]) for n in done}


def finished_settings(meta: dict[str, Any]) -> list[str]:
    """The settings every seed of the folder ran for, in the document's order."""
    want = set(meta["config"]["seeds"])
    return [n for n in meta["config"]["settings"] if want <= set(meta["seeds_done"].get(n, []))]


def _calls(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The calls that made a document (one for a document from before chunked runs)."""
    if "calls" in meta:
        return list(meta["calls"])
    return [{"command": meta["command"], "git_commit": meta["git_commit"], "date": meta["date"],
             "settings": list(meta["config"]["settings"]), "hardware": meta["hardware"],
             "threads": meta["threads"]}]  # fmt: skip


def _peers_header(peers: bool, chosen: Sequence[str]) -> dict[str, Any]:
    """The ``peers`` section before any peer runs: why the missing ones are missing."""
    if not peers:
        reason = "peer runs were switched off (peers=False)"
    else:
        absent = [f"{p.name} on {s}" for s, ps in PEERS.items() if s not in chosen for p in ps]
        reason = PEERS_REASON + ("; not run because the setting is not in this report: "
                                 + ", ".join(absent) if absent else "")  # fmt: skip
    return {"runs": [], "reason": reason, "enabled": peers}


def _ours(doc: dict[str, Any], setting: str, seed: int, method: str) -> dict[str, Any] | None:
    """Our run a peer is compared with: plain ``method`` on the same checkpoints."""
    for r in doc["runs"]:  # by label: a BN reset the setting asks for sets its renorm
        if (r["setting"], r["seed"], r["label"], r["budget"]) == (setting, seed, method, None) \
                and r["status"] == "ok":  # fmt: skip
            return {"method": method, "label": r["label"], "key": r["key"],
                    "accuracy": r["metrics"]["accuracy"],
                    "merge_wall_s": r["timings"]["merge_wall_s"],
                    "method_s": r["timings"]["method_s"]}  # fmt: skip
    return None


def _peer_run(
    peer: Peer, setting: Setting, seed: int, ctx: _Context, doc: dict[str, Any],
    root: str | Path | None,
) -> dict[str, Any]:  # fmt: skip
    """``peer`` (:data:`symmerge.report.peers.PEERS`) on this seed's checkpoints (and, when
    it reads data, our runs' merge batches), scored by our evaluation, beside our run of the
    same method."""
    folder = None if root is None else Path(root) / peer.subfolder

    def evaluate(model: nn.Module) -> dict[str, Any]:
        return _evaluate(model, setting, ctx, merged=True)

    given = {"setting": setting, "data": (ctx.data, ctx.data_record)} if peer.reads_data else {}
    entry = peer.run([c.path for c in ctx.checkpoints], evaluate, seed=seed, folder=folder,
                     **given)  # fmt: skip
    ours = _ours(doc, setting.name, seed, peer.ours)
    ratio = None
    if ours is not None and entry["seconds"] is not None and ours["merge_wall_s"] > 0:
        ratio = entry["seconds"] / ours["merge_wall_s"]
    return {**entry, "setting": setting.name, "seed": seed, "ours": ours, "ratio": ratio}


def _peer_not_prepared(peer: Peer, setting: str, seed: int, reason: str) -> dict[str, Any]:
    """The peer entry of a seed whose checkpoints could not be made."""
    return {"peer": peer.name, "version": None, "status": "not run",
            "reason": f"no checkpoints to run on ({reason})"[:1000], "setting": setting,
            "seed": seed, "checkpoints": [], "metrics": None, "seconds": None, "ours": None,
            "ratio": None}  # fmt: skip


def _previous_document(
    out: Path, config: dict[str, Any], code: str, resume: bool, *, seeds_given: bool = True
) -> dict[str, Any] | None:
    """The folder's results document that ``resume`` continues (``None`` when there is none),
    after checking its configuration (:data:`CONFIG_KEYS`: seeds given must be some of the
    folder's, the default is all of them) and code version; a folder with results and no
    ``resume`` is refused."""
    path = out / RESULTS_FILE
    if not path.exists():
        return None
    if not resume:
        raise ReportError(
            f"{path} exists; pass --resume to continue that report (same scale, methods, seeds "
            "and code; the settings named are added to it), --render-only to redraw it, or "
            "choose another -o"
        )
    doc = load_results(path)
    before = doc["meta"]["config"]
    differs = [k for k in CONFIG_KEYS if k != "seeds" and before.get(k) != config[k]]
    if seeds_given and not set(config["seeds"]) <= set(before.get("seeds", [])):
        differs.append("seeds")
    diff = "; ".join(f"{k}: {before.get(k)} there, {config[k]} now" for k in differs)
    if diff:
        raise ReportError(
            f"cannot resume {out}: it was made with another configuration ({diff}); rerun "
            "with its scale, methods and seeds (settings may differ: they accumulate) or write "
            "to another -o"
        )
    if doc["meta"]["code_version"] != code:
        raise ReportError(
            f"cannot resume {out}: its runs were made by other code (code version "
            f"{doc['meta']['code_version'][:12]}, commit {doc['meta']['git_commit']}); this "
            f"is {code[:12]} (commit {provenance.git_commit()}). Write to another -o (copy "
            f"{out / CHECKPOINT_DIR} into it to reuse the checkpoints: they are retrained only "
            f"if the training code changed), or delete {path} to start over"
        )
    return doc


def _check_definitions(
    before: dict[str, Any], defs: dict[str, Setting], chosen: Sequence[str],
    seeds: Sequence[int], out: Path,
) -> None:  # fmt: skip
    """Refuse to resume ``before`` where it would keep runs of a setting whose definition
    (:meth:`Setting.definition`) changed since they were made, or of a setting the scale no
    longer has: such a setting must be run again at every seed of the folder."""
    recorded = before["meta"]["settings"]
    gone = [n for n in recorded if n not in defs]
    if gone:
        raise ReportError(
            f"cannot resume {out}: it holds settings the {before['meta']['scale']} scale no "
            f"longer has ({', '.join(gone)}); write to another -o"
        )
    every = set(before["meta"]["config"]["seeds"])
    changed = [n for n, old in recorded.items()
               if definition_of(old) != defs[n].definition()
               and not (n in chosen and every <= set(seeds))]  # fmt: skip
    if changed:
        raise ReportError(
            f"cannot resume {out}: the definition of {', '.join(changed)} changed since its "
            f"runs were made; run it again at every seed of the folder (--settings "
            f"{','.join(changed)} without --seeds) or write to another -o"
        )


def _batches_sha256(batches: Sequence[tuple[Tensor, Tensor]]) -> str:
    digest = hashlib.sha256()
    for x, y in batches:
        digest.update(x.contiguous().numpy().tobytes())
        digest.update(y.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _prepare(setting: Setting, seed: int, out: Path, root: str | None, doc: dict) -> _Context:
    """Train or reuse the setting's checkpoints, draw its data, load its test sets and
    evaluate the sources; the endpoints entry is added to ``doc``."""
    from symmerge.data import get_dataset
    from symmerge.flops import count_compute
    from symmerge.sources import data_source_batches

    code = doc["meta"]["training_code_version"]
    folder = out / CHECKPOINT_DIR
    checkpoints = [train_or_reuse(s.recipe(seed), folder, code=code, data_root=root)
                   for s in setting.sources]  # fmt: skip
    models = [c.model for c in checkpoints]
    datasets = [c.metadata.get("dataset") for c in checkpoints]
    data = data_source_batches(setting.data, DATA_BATCH, root=root, samples=setting.samples,
                               seed=seed, datasets=datasets, model=models[0])  # fmt: skip
    record = {"spec": setting.data, "samples_per_source": setting.samples, "seed": seed,
              "batch_size": DATA_BATCH, "n": sum(len(x) for x, _ in data),
              "sha256": _batches_sha256(data)}  # fmt: skip
    tests = []
    for t in setting.tests:
        classes = None if t.classes is None else list(t.classes)
        if setting.metric == "joint":
            classes = sorted({c for s in setting.sources for c in (s.classes or ())}) or None
        x, y = get_dataset(t.dataset, "test", root=root, classes=classes).tensors
        tests.append((t.dataset, x, y))
    example = torch.zeros(1, *models[0].input_shape)
    ctx = _Context(checkpoints, data, record, tests, example,
                   count_compute(models[0], example).macs)  # fmt: skip
    sources = []
    for c in checkpoints:
        sources.append({
            "sha256": c.sha256, "weights_sha256": c.weights_sha256,
            "file": str(c.path.relative_to(out)), "recipe": c.metadata.get("recipe"),
            "reused": c.reused, "reference": c.reference,
            "metrics": _evaluate(c.model, setting, ctx, merged=False),
        })  # fmt: skip
    doc["endpoints"].append({"setting": setting.name, "seed": seed, "data": record,
                             "sources": sources})  # fmt: skip
    return ctx


def _evaluate(model: nn.Module, setting: Setting, ctx: _Context, *, merged: bool) -> dict:
    """The setting's metrics: accuracy (mean over test sets, or joint), loss and the parts."""
    from symmerge.evaluate import evaluate, task_accuracy

    if setting.metric == "mean":
        per = {name: evaluate(model, (x, y)) for name, x, y in ctx.tests}
        return {
            "accuracy": sum(r["accuracy"] for r in per.values()) / len(per),
            "loss": sum(r["loss"] for r in per.values()) / len(per),
            "per_dataset": {
                k: {"accuracy": r["accuracy"], "loss": r["loss"], "n": r["n"]}
                for k, r in per.items()
            },  # fmt: skip
        }
    _, x, y = ctx.tests[0]
    with torch.no_grad():
        n_out = int(ctx.checkpoints[0].model(ctx.example).shape[-1])
    per_task = merged and setting.heads == "per-task"
    tasks = [{"classes": list(s.classes or range(n_out)),
              "logits": [k * n_out, (k + 1) * n_out] if per_task else [0, n_out]}
             for k, s in enumerate(setting.sources)]  # fmt: skip
    res = task_accuracy(model, (x, y), tasks)
    return {
        "accuracy": res["joint"]["accuracy"],
        "loss": sum(t["loss"] for t in res["tasks"]) / len(res["tasks"]),
        "mean_task_accuracy": res["mean_task_accuracy"],
        "per_task": [
            {"classes": t["classes"], "accuracy": t["accuracy"], "loss": t["loss"], "n": t["n"]}
            for t in res["tasks"]
        ],  # fmt: skip
        "n": res["joint"]["n"],
    }


def _failed(setting: Setting, seed: int, job: Job, reason: str) -> dict[str, Any]:
    """The record of a run that could not start (its setting could not be prepared)."""
    return {"key": None, "setting": setting.name, "method": job.method, "label": job.label,
            "seed": seed, "params": dict(job.params), "renorm": job.renorm,
            "heads": setting.heads, "budget": job.budget, "checkpoints": [], "data": None,
            "status": "failed", "error": reason[:1000], "metrics": None, "timings": None,
            "memory": None, "warnings": []}  # fmt: skip


def _run_key(setting: Setting, seed: int, job: Job, ctx: _Context, code: str) -> str:
    text = json.dumps({"setting": setting.definition(), "seed": seed, "job": asdict(job),
                       "checkpoints": [c.sha256 for c in ctx.checkpoints],
                       "data": ctx.data_record["sha256"], "code": code},
                      sort_keys=True, default=str)  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()


def _seed_everything(seed: int) -> None:
    """Seed the global generators, so a run's numbers do not depend on the runs before it
    (a resumed report reruns only some)."""
    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _class_counts(fn: Any, checkpoints: Sequence[Checkpoint]) -> dict[str, Any]:
    """``class_counts`` for a method that takes them (fusion weights each parent's logits by
    its share of every class) when every checkpoint records them, as the command line passes
    them; none otherwise (reference checkpoints made before they were recorded)."""
    counts = [c.metadata.get("class_counts") for c in checkpoints]
    if "class_counts" not in inspect.signature(fn).parameters or None in counts:
        return {}
    return {"class_counts": counts}


def _run_or_reuse(
    setting: Setting, seed: int, job: Job, ctx: _Context, code: str,
    previous: dict[str, dict[str, Any]],
) -> dict[str, Any]:  # fmt: skip
    from symmerge.evaluate import barrier
    from symmerge.flops import count_compute
    from symmerge.merging import BatchNormStatsWarning, merge
    from symmerge.methods import method_info

    key = _run_key(setting, seed, job, ctx, code)
    if key in previous:
        return {**previous[key], "_reused": True}
    info = method_info(job.method)
    kwargs = dict(job.params)
    kwargs.update(_class_counts(info.fn, ctx.checkpoints))
    uses_data = info.needs_data or job.renorm is not None
    record: dict[str, Any] = {
        "key": key, "setting": setting.name, "method": job.method, "label": job.label,
        "seed": seed, "params": kwargs, "renorm": job.renorm, "heads": setting.heads,
        "budget": job.budget, "checkpoints": [c.sha256 for c in ctx.checkpoints],
        "data": ctx.data_record if uses_data else None, "status": "ok", "error": None,
        "metrics": None, "timings": None, "memory": None, "warnings": [],
    }  # fmt: skip
    if job.error is not None:
        return {**record, "status": "failed", "error": job.error}
    models = [c.model for c in ctx.checkpoints]
    try:
        with _peak_memory() as memory, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _seed_everything(seed)
            t0 = time.perf_counter()
            merged, result = merge(
                models, job.method, data=ctx.data if uses_data else None, renorm=job.renorm,
                seed=seed, heads=setting.heads, block_sparse=setting.block_sparse, **kwargs,
            )  # fmt: skip
            reset = setting.reset_bn and job.renorm is None and _stale_bn(caught)
            if reset:  # the warning no longer holds: the statistics are recomputed
                _reset_bn(merged, result, ctx.data)
                record.update(renorm="reset-bn", data=ctx.data_record)
            wall = time.perf_counter() - t0
        t1 = time.perf_counter()
        metrics = _evaluate(merged, setting, ctx, merged=True)
        compute = count_compute(merged, ctx.example)
        evaluate_s = time.perf_counter() - t1
    except Exception as exc:  # recorded, never dropped
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        return {**record, "status": "failed", "error": message[:1000]}
    metrics.update(params=compute.params, macs=compute.macs, macs_ratio=compute.macs / ctx.macs)
    t2 = time.perf_counter()
    curve, curve_error = None, None
    try:
        curve = _curve(setting, ctx, result, record["renorm"])
    except Exception as exc:  # the merge stands; the curve's failure is noted with it
        curve_error = " ".join(f"interpolation curve failed: {type(exc).__name__}: {exc}".split())
    if curve is not None:
        record["curve"] = curve
        metrics["barrier"] = {"loss": barrier(curve, "loss"),
                              "accuracy": barrier(curve, "accuracy")}  # fmt: skip
    evaluate_s += time.perf_counter() - t2
    record.update(
        metrics=metrics,
        timings={"method": {k: round(v, 6) for k, v in result.timings.items()},
                 "method_s": round(result.seconds, 6), "lap_s": round(result.lap_seconds, 6),
                 "merge_wall_s": round(wall, 6), "evaluate_s": round(evaluate_s, 6)},
        memory=memory,
        warnings=sorted({f"{w.category.__name__}: {w.message}" for w in caught
                         if not (reset and issubclass(w.category, BatchNormStatsWarning))}
                        | ({curve_error[:1000]} if curve_error else set())),
    )  # fmt: skip
    return record


def _curve(
    setting: Setting, ctx: _Context, result: Any, renorm: str | None
) -> list[dict[str, Any]] | None:
    """Accuracy and loss along (1-λ)·A + λ·aligned(B) (:data:`CURVE_LAMBDAS`), where a
    barrier is defined: two sources of one width and one head, merged by permutations into
    the path's midpoint (not where the merged weights were trained further, as logit-KD's
    are). Each point is renormalised as the run was (none, the BN reset, or REPAIR), on the
    same data."""
    from symmerge.groupmap import build_state_dict
    from symmerge.merging import interpolation_path, trace_model

    maps = result.maps
    if len(ctx.checkpoints) != 2 or setting.heads != "shared" or setting.unequal_widths:
        return None
    if not maps or not all(gm.is_permutation for gm in maps.values()):
        return None
    models = [c.model for c in ctx.checkpoints]
    if ctx.spec is None:
        ctx.spec = trace_model(models[0])
    half = {g: gm.with_weights([0.5, 0.5]) for g, gm in maps.items()}
    mid = build_state_dict(ctx.spec, [m.state_dict() for m in models], half, weights=[0.5, 0.5])
    for k, _ in models[0].named_parameters():  # (statistics buffers may have been reset)
        v = result.state_dict.get(k)
        if v is None or mid[k].shape != v.shape or not torch.allclose(mid[k], v, atol=1e-6):
            return None  # the merge is not the path's midpoint
    points = interpolation_path(models, ctx.spec, maps, CURVE_LAMBDAS, data=ctx.data,
                                renorm=renorm)  # fmt: skip
    curve = []
    for lam, model in points:
        m = _evaluate(model, setting, ctx, merged=False)
        curve.append({"lambda": lam, "accuracy": m["accuracy"], "loss": m["loss"]})
    return curve


def _stale_bn(caught: Sequence[warnings.WarningMessage]) -> bool:
    """Whether ``merge()`` warned that the merged BatchNorm statistics stay interpolated."""
    from symmerge.merging import BatchNormStatsWarning

    return any(issubclass(w.category, BatchNormStatsWarning) for w in caught)


def _reset_bn(merged: nn.Module, result: Any, data: Sequence[tuple[Tensor, Tensor]]) -> None:
    """Recompute ``merged``'s BatchNorm statistics on ``data``, timed into
    ``result.timings["renorm"]`` (apart from the method's own time, as ``merge()`` does)."""
    from symmerge.renorm import reset_bn

    t0 = time.perf_counter()
    reset_bn(merged, data)
    result.timings = {**result.timings, "renorm": time.perf_counter() - t0}


@contextlib.contextmanager
def _peak_memory() -> Iterator[dict[str, Any]]:
    """Peak resident memory while the block runs: the process's high-water mark is reset
    first where Linux allows it (``scope: "run"``), else it is the process's peak so far
    (``scope: "process"``)."""
    from symmerge.progress import peak_rss_mb

    box: dict[str, Any] = {}
    try:
        Path("/proc/self/clear_refs").write_text("5")
        scope = "run"
    except OSError:
        scope = "process"
    yield box
    peak = _vm_hwm_mb() if scope == "run" else None
    box.update(peak_rss_mb=round(peak if peak is not None else peak_rss_mb(), 1),
               scope=scope if peak is not None else "process")  # fmt: skip


def _vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
