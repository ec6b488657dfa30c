"""One table from every committed ``ste_speed`` run: speed-up and accuracy per STE seed,
thread count and data setting (issue 6's speed target).

Reads ``results/ste_speed.json`` and ``results/ste_speed_*/seed*/ste_speed.json`` (written by
``benchmarks/ste_speed.py``; each run's own file names its command, date and machine) and
writes ``results/ste_speed_summary.{json,md}``. Runs nothing itself.

    .venv/bin/python benchmarks/ste_speed_summary.py
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from _common import RESULTS, display_path, fmt, md_table, write_json

NAME = "ste_speed_summary"


def collect(results: Path) -> list[dict[str, Any]]:
    """One row per (run file, data setting, symmerge variant)."""
    files = [results / "ste_speed.json", *sorted(results.glob("ste_speed_*/seed*/ste_speed.json"))]
    rows = []
    for path in files:
        if not path.exists():
            continue
        run = json.loads(path.read_text())
        meta = run["meta"]
        for setting, block in run["settings"].items():
            runs = block["runs"]
            authors = runs.get("authors")
            if authors is None:
                continue
            for variant, r in runs.items():
                if variant in ("authors", "full", "warm"):
                    continue
                rows.append(
                    {
                        "file": display_path(path),
                        "date": meta["date"],
                        "threads": meta.get("threads", 1),
                        "seed": meta["seeds"]["ste_seed"],
                        "setting": setting,
                        "variant": variant,
                        "interleaved": r.get("interleaved_with") == "authors",
                        "authors_step_s": authors["all"]["step_mean"],
                        "step_s": r["all"]["step_mean"],
                        "speedup": r["all"]["speedup_vs_authors"],
                        "matching_speedup": r["all"]["matching_speedup_vs_authors"],
                        "acc_authors": authors["accuracy_best"]["mean"],
                        "acc": r["accuracy_best"]["mean"],
                    }
                )
    return rows


def groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Min / mean / max over seeds for each (threads, setting, variant, interleaved)."""
    keyed: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["threads"], r["setting"], r["variant"], r["interleaved"])
        keyed.setdefault(key, []).append(r)
    out = []
    for (threads, setting, variant, inter), rs in sorted(keyed.items()):
        x = [r["speedup"] for r in rs]
        out.append(
            {
                "threads": threads,
                "setting": setting,
                "variant": variant,
                "interleaved": inter,
                "seeds": sorted(r["seed"] for r in rs),
                "speedup_min": min(x),
                "speedup_mean": statistics.mean(x),
                "speedup_max": max(x),
                "matching_speedup_mean": statistics.mean(r["matching_speedup"] for r in rs),
                "acc_minus_authors_mean": statistics.mean(r["acc"] - r["acc_authors"] for r in rs),
            }
        )
    return out


def write_md(path: Path, rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> None:
    lines = [
        "# STE step speed-up over the authors' loop: every committed ste_speed run",
        "",
        "- Command: `.venv/bin/python benchmarks/ste_speed_summary.py` (reads the runs below; "
        "each run's own .md names its command, date and machine: AMD EPYC, 2 logical CPUs "
        "shared with other jobs, no GPU)",
        "- Whole step (matching + midpoint forward/backward + optimizer), mean over the run's "
        "steps (100 full-data batches of 500 / 200 coreset steps); 'x' = the authors' mean step "
        "time / the variant's, both measured in the same run and with the same torch thread "
        "count. Interleaved: the authors' step k and the variant's step k alternate (the fairest "
        "ratio on a shared machine); otherwise the variant ran after the authors' loop.",
        "- Accuracy: mean of the MNIST and Fashion-MNIST test accuracies of the midpoint with the "
        "lowest-loss step's permutations; 'acc - authors' in points.",
        "",
        "## Over STE seeds",
        "",
    ]
    header = [
        "threads", "data", "variant", "interleaved", "seeds", "x min", "x mean", "x max",
        "matching x mean", "acc - authors (points)",
    ]  # fmt: skip
    lines += md_table(
        header,
        [
            [
                s["threads"],
                s["setting"],
                s["variant"],
                "yes" if s["interleaved"] else "no",
                ",".join(map(str, s["seeds"])),
                fmt(s["speedup_min"], 2),
                fmt(s["speedup_mean"], 2),
                fmt(s["speedup_max"], 2),
                fmt(s["matching_speedup_mean"], 1),
                f"{100 * s['acc_minus_authors_mean']:+.2f}",
            ]  # fmt: skip
            for s in summary
        ],
    )
    lines += ["", "## Every run", ""]
    header = [
        "threads", "data", "seed", "variant", "interleaved", "authors s/step", "s/step", "x",
        "acc authors", "acc", "file",
    ]  # fmt: skip
    lines += md_table(
        header,
        [
            [
                r["threads"],
                r["setting"],
                r["seed"],
                r["variant"],
                "yes" if r["interleaved"] else "no",
                fmt(r["authors_step_s"]),
                fmt(r["step_s"]),
                fmt(r["speedup"], 2),
                fmt(r["acc_authors"]),
                fmt(r["acc"]),
                r["file"],
            ]  # fmt: skip
            for r in sorted(
                rows, key=lambda r: (r["threads"], r["setting"], r["variant"], r["seed"])
            )
        ],
    )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(RESULTS), help="results folder")
    args = parser.parse_args()
    results = Path(args.results)
    rows = collect(results)
    if not rows:
        raise SystemExit(f"no ste_speed runs under {results}")
    summary = groups(rows)
    write_json(results / f"{NAME}.json", {"summary": summary, "runs": rows})
    write_md(results / f"{NAME}.md", rows, summary)
    print(f"wrote {results / NAME}.{{json,md}}")


if __name__ == "__main__":
    main()
