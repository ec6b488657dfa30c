"""Draw a report from its results document: ``report.md`` and the plots.

Everything drawn comes from the document alone (no clock, no machine lookups), so
``symmerge report --render-only`` reproduces ``report.md`` byte for byte.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["BUDGET_PLOT", "CURVE_PLOT", "MODELS_PLOT", "REPORT_FILE", "TIME_PLOT",
           "render_markdown", "write_plots", "write_report"]  # fmt: skip

REPORT_FILE = "report.md"
BUDGET_PLOT = "accuracy_vs_budget.png"
TIME_PLOT = "time_per_method.png"
CURVE_PLOT = "interpolation.png"
MODELS_PLOT = "accuracy_vs_models.png"
#: The settings that merge 2, 3 and 5 models of one recipe (accuracy against N).
N_MODEL_SETTINGS = {"same-task": 2, "n-models": 3, "n-models-5": 5}


def write_report(doc: dict[str, Any], folder: str | Path) -> list[Path]:
    """Write ``report.md`` and the plots of ``doc`` into ``folder``; returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md = folder / REPORT_FILE
    md.write_text(render_markdown(doc))
    return [md, *write_plots(doc, folder)]


# --------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def _pct(values: Sequence[float]) -> str:
    return _mean_std(values, 100.0)


def _count(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{round(mean):,}" if len(set(values)) == 1 else f"{mean:,.0f} (mean)"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], text: int = 1) -> list[str]:
    """A markdown table; the first ``text`` columns left-aligned, the others right-aligned."""
    rule = ["---" if i < text else "---:" for i in range(len(header))]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _classes(classes: Sequence[int] | None) -> str:
    if not classes:
        return "all"
    c = sorted(classes)
    if c == list(range(c[0], c[-1] + 1)) and len(c) > 2:
        return f"{c[0]}-{c[-1]}"
    return ",".join(map(str, c))


def _value(value: Any, metric: str) -> str:
    if isinstance(value, list):
        return f"+{value[0]:g} to +{value[1]:g} points"
    if metric == "accuracy":
        return f"{100 * value:.2f} %"
    return f"{value:+g} points"


# --------------------------------------------------------------------------------------
# the markdown
# --------------------------------------------------------------------------------------


def render_markdown(doc: dict[str, Any]) -> str:
    """``report.md`` of a (validated) results document."""
    meta = doc["meta"]
    lines = [f"# symmerge report: {meta['scale']} scale", ""]
    lines += _provenance(doc)
    lines += [
        "",
        "Accuracy is the mean over the setting's test sets, or, for sources trained on "
        "disjoint classes, the joint accuracy (no task id) over their classes; percentages, "
        "mean ± std over seeds. Every run of a setting and seed merges the same checkpoints "
        "(same sha256); every data-using method and every REPAIR gets the same data. MACs: "
        "multiply-accumulates per example of the merged model relative to one source "
        "(`symmerge.flops`). `method s`: the method's own time (`MergeResult.seconds`); "
        "`merge s`: the whole `merge()` call (tracing, building and renormalisation too); "
        "a method's first call in a process also compiles its solvers (numba), so the first "
        "setting's times run high. "
        "Published numbers carry a tag: paper, code, or secondary (a third party quoting "
        "the paper); their settings differ from ours as noted. `vs published`: our gain "
        "over the published baseline (accuracy points, mean over seeds) against the "
        "published gain; the direction agrees when both have one sign, the size when ours is "
        f"within a factor of {SIZE_FACTOR:g} of theirs.",
    ]
    published = doc["published"]
    for name in meta["config"]["settings"]:
        lines += ["", *_setting_section(doc, name, published)]
    lines += ["", *_coverage(doc)]
    lines += ["", *_plots_section(doc)]
    lines += ["", *_published_section(published)]
    lines += ["", *_peers_section(doc)]
    return "\n".join(lines) + "\n"


def _provenance(doc: dict[str, Any]) -> list[str]:
    meta = doc["meta"]
    hw = meta["hardware"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    runs = doc["runs"]
    ok = sum(r["status"] == "ok" for r in runs)
    state = "" if meta.get("complete", True) else " **(incomplete: the run was interrupted)**"
    calls = meta.get("calls", [])
    lines = [f"- Command: `{meta['command']}`{state}"]
    if len(calls) > 1:  # a report run in chunks: every call, with what it ran
        lines[0] = f"- Made in {len(calls)} calls (chunks); the last: `{meta['command']}`{state}"
        lines += [f"  - {k}. `{c['command']}` ({c['date']}; commit {c['git_commit'] or 'unknown'}"
                  f"; {c['hardware']['cpu']}, torch threads {c['threads']}): "
                  f"{', '.join(c['settings'])}" for k, c in enumerate(calls, 1)]  # fmt: skip
    lines += [f"  - joined (`{j['command']}`, {j['date']}; commit {j['git_commit'] or 'unknown'}): "
              f"{', '.join(j['settings'])} ran in another folder beside the calls above"
              for j in meta.get("joined", [])]  # fmt: skip
    missing = [n for n in meta.get("scale_settings", []) if n not in meta["config"]["settings"]]
    return lines + [
        f"- Date: {meta['date']}",
        f"- Code: commit {meta['git_commit'] or 'unknown'}; code version "
        f"{meta['code_version'][:12]} (training code {meta['training_code_version'][:12]})",
        f"- Hardware: {hw['cpu']}, {hw['logical_cpus']} logical CPUs, GPU {hw['gpu'] or 'none'};"
        f" device {meta['device']}; torch threads {meta['threads']}"
        + (f" (OMP_NUM_THREADS={hw['omp_num_threads']})" if hw.get("omp_num_threads") else ""),
        f"- Versions: {versions}",
        f"- Seeds: {', '.join(map(str, meta['seeds']))}",
        f"- Runs: {len(runs)} ({ok} ok, {len(runs) - ok} failed; "
        f"{meta.get('reused_runs', 0)} reused from an earlier call"
        + (f", {meta['kept_runs']} kept from earlier calls" if meta.get("kept_runs") else "")
        + ")",
        *([f"- Settings of the {meta['scale']} scale not in this report yet: "
           f"{', '.join(missing)} (add them with `--settings NAME --resume`)"]
          if missing else []),
    ]  # fmt: skip


def _labels(runs: Sequence[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for r in runs:
        if r["label"] not in out:
            out.append(r["label"])
    return out


def _parts(setting: dict[str, Any]) -> list[tuple[str, Any]]:
    """Column titles and keys of the per-dataset or per-task accuracies."""
    if setting["metric"] == "joint":
        return [(f"task {_classes(s['classes'])} %", k) for k, s in enumerate(setting["sources"])]
    return [(f"{t['dataset']} %", t["dataset"]) for t in setting["tests"]]


def _part(metrics: dict[str, Any], key: Any) -> float:
    if isinstance(key, int):
        return metrics["per_task"][key]["accuracy"]
    return metrics["per_dataset"][key]["accuracy"]


def _setting_section(doc: dict[str, Any], name: str, published: list[dict]) -> list[str]:
    setting = doc["meta"]["settings"][name]
    runs = [r for r in doc["runs"] if r["setting"] == name]
    lines = [f"## {name}: {setting['title']}", ""]
    meta = doc["meta"]
    if name not in meta.get("settings_done", [name]):  # (older documents record none)
        done = meta.get("seeds_done", {}).get(name, [])
        missing = [sd for sd in meta["seeds"] if sd not in done]
        ran = f"seeds {', '.join(map(str, done))} ran, " if done else ""
        lines += [f"**Incomplete: {ran}seeds {', '.join(map(str, missing))} not yet; run them "
                  f"with `--settings {name} --seeds {','.join(map(str, missing))} --resume` "
                  "(finished runs and checkpoints are reused).**", ""]  # fmt: skip
    if setting["stand_in"]:
        lines += [f"Stands in for: {setting['stand_in']}.", ""]
    if setting.get("reset_bn"):
        reset = _labels([r for r in runs if r["renorm"] == "reset-bn"])
        lines += ["BatchNorm statistics recomputed on the merge data after every merge that "
                  "left them interpolated: " + (", ".join(reset) or "none") + ". The others "
                  "keep theirs (exact, fitted by the method, or REPAIR's).", ""]  # fmt: skip
    if not runs:  # named by a call that stopped before it
        return lines + ["Not run yet."]
    lines += _endpoints(doc, name, setting)
    parts = _parts(setting)
    first = "joint %" if setting["metric"] == "joint" else "accuracy %"
    curves = any("barrier" in (r["metrics"] or {}) for r in runs)
    header = ["method", first, *[p[0] for p in parts], "loss",
              *(["acc. barrier"] if curves else []), "params", "MACs", "method s", "merge s",
              "published"]  # fmt: skip
    marks = {}
    mine = [e for e in published if e["setting"] == name]
    gains = any(_agreement(e, runs, mine) is not None for e in mine)
    header += ["vs published"] if gains else []
    for k, e in enumerate(mine, 1):
        marks.setdefault(e["method"], []).append((k, e))
    rows, failures = [], []
    for label in _labels(runs):
        group = [r for r in runs if r["label"] == label]
        ok = [r["metrics"] for r in group if r["status"] == "ok"]
        bad = [r for r in group if r["status"] != "ok"]
        failures += [f"- {label} (seed {r['seed']}): {r['error']}" for r in bad]
        acc = _pct([m["accuracy"] for m in ok])
        if bad:
            acc = "failed" if not ok else f"{acc} ({len(bad)} failed)"
        times = [r["timings"] for r in group if r["status"] == "ok"]
        pub = "; ".join(f"{_value(e['value'], e['metric'])} ({e['tag']}) [p{k}]"
                        for k, e in marks.get(label, []) if e["metric"] == "accuracy")  # fmt: skip
        rows.append([
            label, acc, *[_pct([_part(m, key) for m in ok]) for _, key in parts],
            _mean_std([m["loss"] for m in ok], digits=4),
            *([_pct([m["barrier"]["accuracy"] for m in ok if "barrier" in m])] if curves else []),
            _count([m["params"] for m in ok]),
            _mean_std([m["macs_ratio"] for m in ok]) + ("x" if ok else ""),
            _mean_std([t["method_s"] for t in times], digits=3),
            _mean_std([t["merge_wall_s"] for t in times], digits=3), pub or "",
            *(["; ".join(f"{cell} [p{k}]" for k, e in marks.get(label, [])
                         if (cell := _agreement(e, runs, mine)) is not None)] if gains else []),
        ])  # fmt: skip
    lines += _table(header, rows)
    if failures:
        lines += ["", "Failed runs (recorded, never dropped):", "", *failures]
    if mine:
        lines += ["", "Published:", ""]
        for k, e in enumerate(mine, 1):
            lines.append(f"- [p{k}] {e['method']}" + _claim(e, runs, mine) + f" ({e['tag']}): "
                         f"{e['source']}. Differs: {e['differs']}.")  # fmt: skip
    return lines


#: How far our gain may be from a published one and still agree in rough size: within this
#: factor of it (or of its range), either way.
SIZE_FACTOR = 2.0


def _claim(
    entry: dict[str, Any], runs: Sequence[dict[str, Any]], published: Sequence[dict[str, Any]]
) -> str:  # fmt: skip
    """A published entry's value, and for a gain over a baseline, ours beside it."""
    text = f": {_value(entry['value'], 'accuracy')}" if entry["metric"] == "accuracy" else ""
    theirs = _their_gain(entry, published)
    if theirs is None:
        return text
    text += f"{';' if text else ''} over {entry['baseline']}: {_value(theirs, 'gain_points')}"
    gain = _gain_of(entry, runs)
    if gain is None:
        return text + "; ours: not run"
    return text + f"; ours: {gain:+.2f} points ({_verdict(gain, theirs)})"


def _their_gain(
    entry: dict[str, Any], published: Sequence[dict[str, Any]]
) -> float | list[float] | None:  # fmt: skip
    """A published entry's gain in accuracy points over its ``baseline``: its value for a
    ``gain_points`` entry; for an accuracy with a baseline, the difference from the
    baseline's published accuracy in the setting (the one of the same source where there
    are several); else ``None``."""
    base = entry.get("baseline")
    if not base:
        return None
    if entry["metric"] == "gain_points":
        return entry["value"]
    found = [o for o in published if (o["setting"], o["method"], o["metric"]) == (
        entry["setting"], base, "accuracy")]  # fmt: skip
    same = [o for o in found if o["source"] == entry["source"]]
    if len(same or found) != 1:
        return None
    return round(100 * (entry["value"] - (same or found)[0]["value"]), 6)


def _gain_of(entry: dict[str, Any], runs: Sequence[dict[str, Any]]) -> float | None:
    """Our gain in accuracy points of ``entry``'s method over its baseline (mean over seeds);
    ``None`` for an entry without a baseline or where either row did not run."""
    if not entry.get("baseline"):
        return None

    def acc(label: str) -> float | None:
        vals = [r["metrics"]["accuracy"] for r in runs
                if r["label"] == label and r["status"] == "ok"]  # fmt: skip
        return statistics.fmean(vals) if vals else None

    ours, theirs = acc(entry["method"]), acc(entry["baseline"])
    return None if ours is None or theirs is None else 100 * (ours - theirs)


def _verdict(gain: float, published: float | list[float]) -> str:
    """Whether our gain agrees with a published one (a number or a [low, high] range of one
    sign) in direction, and in rough size: within :data:`SIZE_FACTOR` of it."""
    low, high = published if isinstance(published, list) else (published, published)
    if low * high <= 0:
        return "no published direction"
    if (gain > 0) != (low > 0) or gain == 0:
        return "direction disagrees"
    low, high = sorted((abs(low), abs(high)))
    if low / SIZE_FACTOR <= abs(gain) <= high * SIZE_FACTOR:
        return "direction and size agree"
    return "direction agrees, size differs"


def _agreement(
    entry: dict[str, Any], runs: Sequence[dict[str, Any]], published: Sequence[dict[str, Any]]
) -> str | None:  # fmt: skip
    """The table's cell for a published gain: ours against theirs and the verdict (``None``
    for an entry that states no gain or whose rows did not run)."""
    gain, theirs = _gain_of(entry, runs), _their_gain(entry, published)
    if gain is None or theirs is None:
        return None
    shown = (f"{theirs[0]:+g} to {theirs[1]:+g}" if isinstance(theirs, list)
             else f"{theirs:+g}")  # fmt: skip
    return f"{gain:+.2f} vs {shown} over {entry['baseline']}: {_verdict(gain, theirs)}"


def _endpoints(doc: dict[str, Any], name: str, setting: dict[str, Any]) -> list[str]:
    entries = [e for e in doc["endpoints"] if e["setting"] == name]
    if not entries:
        return ["No sources: the setting could not be prepared (see the failed runs).", ""]
    lines = ["Sources (accuracy as the setting measures it, then its parts):", ""]
    parts = _parts(setting)
    for k, source in enumerate(setting["sources"]):
        metrics = [e["sources"][k]["metrics"] for e in entries]
        accs = [m["accuracy"] for m in metrics]
        shown = ", ".join(f"{title.removesuffix(' %')} {_pct([_part(m, key) for m in metrics])} %"
                          for title, key in parts)  # fmt: skip
        shas = ", ".join(e["sources"][k]["sha256"][:12] for e in entries)
        what = f"{source['dataset']} classes {_classes(source['classes'])}, {source['model']}"
        if source["split"]:
            what += f", {source['split']} part {source['part']}/{source['n_parts']}"
        what += f", {source['epochs']} epochs on {source['limit_train'] or 'all'} images"
        lines.append(f"- source {k + 1}: {what}: {_pct(accs)} % ({shown}; sha256 {shas})")
        refs = [(e["seed"], e["sources"][k].get("reference")) for e in entries]
        lines += [f"  - seed {seed}: the reference checkpoint `{ref['file']}` (trained "
                  f"{ref['trained']}, symmerge {ref['symmerge_version']}, torch "
                  f"{ref['torch_version']}), used as it is, not retrained by today's code"
                  for seed, ref in refs if ref]  # fmt: skip
    data = entries[0]["data"]
    shas = ", ".join(e["data"]["sha256"][:12] for e in entries)
    # (samples are drawn from dataset items; a coreset or condensed set is whole)
    whole = all(i.split(":")[0] in ("coreset", "condensed") for i in data["spec"].split(","))
    per = "" if whole else f", {data['samples_per_source']} images of each dataset"
    lines += ["", f"Merge data: `{data['spec']}`{per} ({data['n']} in all, batches of "
              f"{data['batch_size']}; sha256 {shas}).", ""]  # fmt: skip
    return lines


def _coverage(doc: dict[str, Any]) -> list[str]:
    meta = doc["meta"]
    names = meta["config"]["settings"]
    lines = ["## Coverage", "", "Runs per method and setting (ok / failed); `-`: the method "
             "cannot run there (reasons below).", ""]  # fmt: skip
    rows, reasons = [], []
    for method in meta["config"]["methods"]:
        row = [method]
        for name in names:
            group = [r for r in doc["runs"] if r["setting"] == name and r["method"] == method]
            ok = sum(r["status"] == "ok" for r in group)
            row.append(f"{ok} / {len(group) - ok}" if group else "-")
        rows.append(row)
        why = sorted({meta["not_run"][n][method] for n in names if method in meta["not_run"][n]})
        if why:
            reasons.append(f"- {method}: {'; '.join(why)}")
    lines += _table(["method", *names], rows)
    if reasons:
        lines += ["", *reasons]
    return lines


def _plots_section(doc: dict[str, Any]) -> list[str]:
    lines = ["## Plots", ""]
    if _budget_points(doc):
        lines += [f"![accuracy against measured compute]({BUDGET_PLOT})", ""]
    if _time_points(doc):
        lines += [f"![time per method]({TIME_PLOT})", ""]
    if _curve_points(doc):
        lines += [f"![interpolation curves]({CURVE_PLOT})", ""]
    if len(_model_points(doc)) > 0:
        lines += [f"![accuracy against the number of models]({MODELS_PLOT})", ""]
    return lines[:-1] if lines[-1] == "" else lines


def _curve_points(doc: dict[str, Any]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Per setting and run label: the mean accuracy at each λ over the seeds' curves."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for name in doc["meta"]["config"]["settings"]:
        runs = [r for r in doc["runs"] if r["setting"] == name and r.get("curve")]
        for label in _labels(runs):
            curves = [r["curve"] for r in runs if r["label"] == label]
            lams = [p["lambda"] for p in curves[0]]
            out.setdefault(name, {})[label] = [
                (lam, statistics.fmean(c[k]["accuracy"] for c in curves))
                for k, lam in enumerate(lams)
            ]  # fmt: skip
    return out


def _model_points(doc: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Per run label found in two or more of the N-model settings: (N, mean accuracy)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for name, n in N_MODEL_SETTINGS.items():
        runs = [r for r in doc["runs"] if r["setting"] == name and r["status"] == "ok"]
        for label in _labels(runs):
            accs = [r["metrics"]["accuracy"] for r in runs if r["label"] == label]
            out.setdefault(label, []).append((n, statistics.fmean(accs)))
    return {k: v for k, v in out.items() if len(v) > 1}


def _peers_section(doc: dict[str, Any]) -> list[str]:
    """The peers' own code beside ours: a table, each entry's call and inputs (a peer that
    reads data: whether its batches are our runs', by sha256), and exactly why a peer did
    not run."""
    peers = doc["peers"]
    ours_data = {(e["setting"], e["seed"]): e["data"]["sha256"] for e in doc["endpoints"]}
    lines = ["## Peers", ""]
    order = {n: k for k, n in enumerate(doc["meta"]["config"]["settings"])}
    entries = sorted(peers["runs"], key=lambda e: (order.get(e["setting"], len(order)), e["seed"]))
    if not entries:
        return lines + [f"No peer runs: {peers['reason']}."]
    lines += [
        "The peers' own code on the same checkpoint files as our runs (same sha256), in a "
        "subprocess with its own packages; the merged model is evaluated here with the same "
        "function and test data as ours (`ours`: our run of the same method on those files). "
        "`seconds`: the peer's call (its matching and merging; a second call, after an "
        "untimed first one in its process, where the entry's call says so); `ours s`: our "
        "whole `merge()` call (tracing, matching, building; a method's first call in the "
        "report also compiles solvers); ratio = peer / ours (above 1: ours is faster).",
        "",
    ]
    rows, notes = [], []
    for e in entries:
        ok = e["status"] == "ok"
        ours = e["ours"] or {}
        ratio = e["ratio"]
        if ratio is None and ours and ok and ours["merge_wall_s"] > 0:
            ratio = e["seconds"] / ours["merge_wall_s"]
        rows.append([
            e["peer"], e["setting"], str(e["seed"]), e["version"] or "-", e["status"],
            _pct([e["metrics"]["accuracy"]]) if ok else "-",
            f"{e['seconds']:.3f}" if ok else "-",
            ours.get("method", "-"), _pct([ours["accuracy"]]) if ours else "-",
            f"{ours['merge_wall_s']:.3f}" if ours else "-",
            f"{ratio:.2f}" if ratio is not None else "-",
        ])  # fmt: skip
        what = f"- {e['peer']} ({e['setting']} seed {e['seed']}): "
        if ok:
            shas = ", ".join(s[:12] for s in e["checkpoints"])
            found = f"{e['permutations']} permutations found; " if e.get("permutations") else ""
            where = e.get("imported_from") or e.get("folder", "?")
            data = ""
            if e.get("data"):
                same = e["data"]["sha256"] == ours_data.get((e["setting"], e["seed"]))
                data = (f"merge data: {e['data']['n']} examples, sha256 "
                        f"{e['data']['sha256'][:12]}, "
                        f"{'the same as' if same else 'NOT the same as'} our runs'; ")  # fmt: skip
            notes.append(what + f"`{e.get('call', '')}` on checkpoints {shas}; {found}{data}"
                         f"package from {where}.")  # fmt: skip
        else:
            install = f" Install: `{e['install']}`." if e.get("install") else ""
            notes.append(what + f"{e['status']}: {e['reason']}.{install}")
    lines += _table(["peer", "setting", "seed", "version", "status", "accuracy %", "seconds",
                     "ours", "ours accuracy %", "ours s", "ratio"], rows, 5)  # fmt: skip
    shims = {e["peer"]: e["notes"] for e in entries if e.get("notes")}  # once per peer
    notes += [f"- {name}, how it was run: {text}." for name, text in shims.items()]
    lines += ["", *notes, "", f"Other peers: {peers['reason']}."]
    return lines


def _published_section(published: list[dict[str, Any]]) -> list[str]:
    lines = ["## Published numbers", ""]
    if not published:
        return lines + ["None for the settings in this report."]
    rows = [[e["setting"], e["method"] + (f" vs {e['baseline']}" if e.get("baseline") else ""),
             _value(e["value"], e["metric"]), e["tag"], e["source"], e["differs"]]
            for e in published]  # fmt: skip
    return lines + _table(["setting", "method", "value", "tag", "source", "differs"], rows, 6)


# --------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------


def _budget_points(doc: dict[str, Any]) -> dict[str, list[tuple[float, float, float]]]:
    """Per method of the budgets setting: (budget, mean MACs ratio, mean accuracy)."""
    out: dict[str, list[tuple[float, float, float]]] = {}
    runs = [r for r in doc["runs"] if r["budget"] is not None and r["status"] == "ok"]
    for method in sorted({r["method"] for r in runs}):
        for budget in sorted({r["budget"] for r in runs if r["method"] == method}):
            group = [r["metrics"] for r in runs if r["method"] == method and r["budget"] == budget]
            out.setdefault(method, []).append(
                (
                    budget,
                    statistics.fmean(m["macs_ratio"] for m in group),
                    statistics.fmean(m["accuracy"] for m in group),
                )
            )
    return out  # fmt: skip


def _time_points(doc: dict[str, Any]) -> dict[str, list[float]]:
    """Per method: the merge() seconds of its plain runs (no REPAIR, no budget; a BatchNorm
    reset after the merge is counted, as merge()'s own renormalisation would be)."""
    times: dict[str, list[float]] = {}
    for r in doc["runs"]:
        if r["status"] == "ok" and r["renorm"] != "repair" and r["budget"] is None:
            times.setdefault(r["method"], []).append(r["timings"]["merge_wall_s"])
    return times


def write_plots(doc: dict[str, Any], folder: Path) -> list[Path]:
    """The PNG plots (matplotlib, Agg); none, with a note on stderr, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install symmerge[plot]): no plots drawn",
              file=sys.stderr)  # fmt: skip
        return []
    written = []
    points = _budget_points(doc)
    if points:
        fig, ax = plt.subplots(figsize=(6, 4))
        _accuracy_lines(
            ax,
            {m: [(p[1], p[2]) for p in pts] for m, pts in points.items()},
            "MACs of the merged model / one source (measured)",
            "accuracy %",
        )
        ax.set_title("accuracy against compute (budgets setting)")
        written.append(_save(fig, folder / BUDGET_PLOT))
    times = _time_points(doc)
    if times:
        names = sorted(times, key=lambda m: statistics.median(times[m]))
        fig, ax = plt.subplots(figsize=(6, 0.35 * len(names) + 1.2))
        ax.barh(names, [statistics.median(times[m]) for m in names])
        ax.set_xscale("log")
        ax.set_xlabel("seconds per merge() call (median over settings and seeds)")
        ax.set_title("time per method")
        ax.grid(alpha=0.3, axis="x")
        written.append(_save(fig, folder / TIME_PLOT))
    curves = _curve_points(doc)
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.6), squeeze=False)
        for k, (ax, (name, lines)) in enumerate(zip(axes[0], curves.items(), strict=True)):
            _accuracy_lines(ax, lines, "λ: (1-λ)·A + λ·aligned B",
                            "accuracy % (mean over seeds)" if k == 0 else None,
                            legend=k == len(curves) - 1)  # fmt: skip
            ax.set_title(name)
        written.append(_save(fig, folder / CURVE_PLOT))
    models = _model_points(doc)
    if models:
        fig, ax = plt.subplots(figsize=(6, 4))
        _accuracy_lines(ax, models, "models merged at once (same-task, n-models, n-models-5)",
                        "accuracy % (mean over seeds)")  # fmt: skip
        ax.set_title("accuracy against the number of models")
        written.append(_save(fig, folder / MODELS_PLOT))
    return written


def _accuracy_lines(
    ax: Any,
    series: dict[str, list[tuple[float, float]]],
    xlabel: str,
    ylabel: str | None,
    *,
    legend: bool = True,
) -> None:
    """One line of (x, accuracy as a fraction) points per label, in percent: a colour per
    method, dashed with REPAIR."""
    import matplotlib

    bases = list(dict.fromkeys(label.split(" + ")[0] for label in series))
    colors = matplotlib.colormaps["tab20"].colors
    for label, pts in series.items():
        base, _, renorm = label.partition(" + ")
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o--" if renorm else "o-",
                color=colors[bases.index(base) % len(colors)], label=label)  # fmt: skip
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)
    return path
