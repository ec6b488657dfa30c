"""Merging models trained on disjoint classes (0-4 and 5-9): every method, full and partial zip.

Two models of one architecture are trained from different seeds, one on classes 0-4 and one
on 5-9 (each with a 10-way head, as ``symmerge train --classes``), then merged by naive
averaging, weight matching, activation matching, MuDSC (permute), ZipIt! (full, and at every
legal ``stop``: the first k groups zipped, the rest side by side) and the side-by-side
ensemble, each with one shared head (the heads averaged) and with per-task heads (each
model's head reading the merged features). Reported: per-task accuracy (each task's own
classes, its own logits, on its own test images) and joint accuracy (all 10 classes, argmax
over every task's own classes, no task id) on the test set, parameters of the merged model and
merge time. Merge data: ``--samples`` training images of all ten classes (labels unused). For
BatchNorm models every merged model and both sources get their BatchNorm statistics reset on
that data (the ZipIt! protocol), and the tables say so.

Settings (``--setting``):

* ``mnist-mlp``: the zoo MLP (784-512x3-10), trained here (``--epochs``, default 10).
* ``cifar10-resnet20``: ResNet-20x1 with BatchNorm; ``--checkpoints A,B`` (e.g. the reference
  checkpoints in ``$SYMMERGE_CHECKPOINTS``), else trained here with the same recipe (20 epochs).
* ``cifar10-resnet20-gn``: the same with GroupNorm (no statistics to reset).

Anchor: ZipIt! (Stoica et al., ICLR 2024), CIFAR-10 5+5 ResNet-20x4: joint accuracy of zip far
above permutation merging, partial zips approaching the ensemble.

Writes ``<out>/zip_tasks_<setting>.{json,md}``. Checkpoints trained here go to ``--cache``.

    .venv/bin/python benchmarks/zip_tasks.py --setting mnist-mlp
    .venv/bin/python benchmarks/zip_tasks.py --setting cifar10-resnet20 \\
        --checkpoints $SYMMERGE_CHECKPOINTS/resnet20-cifar10-c0-4-s0.safetensors,\\
$SYMMERGE_CHECKPOINTS/resnet20-cifar10-c5-9-s1.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    add_common_args,
    batches,
    display_path,
    fmt,
    md_table,
    provenance,
    provenance_md,
    subset,
    write_json,
)

TASKS = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
SETTINGS = {
    "mnist-mlp": {"dataset": "mnist", "arch": "mlp", "epochs": 10, "samples": 2000},
    "cifar10-resnet20": {"dataset": "cifar10", "arch": "resnet20", "epochs": 20, "samples": 5000},
    "cifar10-resnet20-gn": {
        "dataset": "cifar10", "arch": "resnet20-gn", "epochs": 20, "samples": 5000,
    },
}  # fmt: skip


def source(
    setting: dict[str, Any], seed: int, classes: list[int], epochs: int, cache: str,
    root: str | None, path: str | None,
) -> tuple[Any, dict[str, Any], Path]:  # fmt: skip
    """The checkpoint at ``path``, or one trained on ``classes`` (cached in ``cache``)."""
    from symmerge.io import load_checkpoint, save_checkpoint
    from symmerge.train import train_model

    if path is None:
        tag = f"{classes[0]}-{classes[-1]}"
        name = f"{setting['arch']}_{setting['dataset']}_c{tag}_s{seed}_e{epochs}.safetensors"
        file = Path(cache) / name
        if not file.exists():
            print(f"training {setting['arch']} on classes {classes}, seed {seed} -> {file}")
            model, info = train_model(setting["arch"], setting["dataset"], classes=classes,
                                      epochs=epochs, seed=seed, data_root=root,
                                      progress=False, device="cpu")  # fmt: skip
            save_checkpoint(file, model, info["config"], {**info, "classes": classes})
    else:
        file = Path(path)
    model, meta = load_checkpoint(file)
    return model.eval(), meta, file


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    parser.add_argument("--setting", choices=list(SETTINGS), default="mnist-mlp")
    parser.add_argument("--checkpoints", default=None, help="A,B: the two source checkpoints")
    parser.add_argument("--seeds", default="0,1", help="training seeds of the two models")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per model")
    parser.add_argument("--samples", type=int, default=None, help="train images to merge on")
    parser.add_argument("--batch-size", type=int, default=500, help="batch size of that data")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the sample draw")
    parser.add_argument("--limit-test", type=int, default=None, help="test images per task")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the runs")
    parser.add_argument("--alphas", default="0.1,0.3,0.7,0.9",
                        help="MuDSC weight-space shares swept beside the default 0.5 (both "
                        "variants); empty for none")  # fmt: skip
    parser.add_argument("--render", default=None, help="rewrite .md and .png from a results JSON")
    args = parser.parse_args()
    if args.render:
        render(Path(args.render))
        return
    torch.set_num_threads(args.threads)
    setting = SETTINGS[args.setting]
    epochs = args.epochs or setting["epochs"]
    samples = args.samples or setting["samples"]
    dataset = setting["dataset"]

    import symmerge
    from symmerge.data import get_dataset
    from symmerge.evaluate import task_accuracy, tasks_from_classes
    from symmerge.flops import count_compute
    from symmerge.merging import has_bn_statistics, merge
    from symmerge.methods.zipit import group_order, legal_stops
    from symmerge.renorm import reset_bn

    seeds = [int(s) for s in args.seeds.split(",")]
    paths = args.checkpoints.split(",") if args.checkpoints else [None, None]
    meta0 = provenance({"models": seeds, "data": args.data_seed, "merge": 0})
    x, y = get_dataset(dataset, "train", root=args.data_root).tensors
    data = batches(*subset(x, y, samples, args.data_seed), args.batch_size)
    limit = args.limit_test
    models, sources = [], []
    for seed, classes, path in zip(seeds, TASKS, paths, strict=True):
        model, meta, file = source(setting, seed, classes, epochs, args.cache, args.data_root,
                                   path)  # fmt: skip
        own = task_accuracy(model, dataset, [{"classes": classes, "logits": [0, 10]}],
                            data_root=args.data_root, limit=limit)  # fmt: skip
        record = {"path": display_path(file), "sha256": sha256(file), "seed": meta.get("seed"),
                  "classes": classes, "epochs": meta.get("epochs"),
                  "own_task_accuracy": own["tasks"][0]["accuracy"]}  # fmt: skip
        if has_bn_statistics(model):  # the protocol: sources with statistics of the merge data
            model = reset_bn(model, data)
            again = task_accuracy(model, dataset, [{"classes": classes, "logits": [0, 10]}],
                                  data_root=args.data_root, limit=limit)  # fmt: skip
            record["own_task_accuracy_bn_reset"] = again["tasks"][0]["accuracy"]
        models.append(model.eval())
        sources.append(record)
    renorm = "reset-bn" if has_bn_statistics(models[0]) else None

    spec = symmerge.trace(models[0], (x[:2],))
    order = group_order(spec, list(models[0].state_dict()))
    stops = legal_stops(spec, order, list(models[0].state_dict()))
    runs: list[tuple[str, str, dict[str, Any]]] = [
        ("naive", "naive", {}), ("weight", "weight", {}), ("activation", "activation", {}),
        ("mudsc", "mudsc", {}), ("mudsc zip", "mudsc", {"variant": "zip"}),
        ("zip", "zip", {}),
        *[(f"zip stop={k}", "zip", {"stop": k}) for k in stops[1:-1]],
        ("ensemble", "ensemble", {}),
    ]  # fmt: skip
    for a in (float(v) for v in filter(None, args.alphas.split(","))):
        runs += [(f"mudsc alpha={a:g}", "mudsc", {"alpha": a}),
                 (f"mudsc zip alpha={a:g}", "mudsc", {"variant": "zip", "alpha": a})]  # fmt: skip
    if args.methods:
        wanted = set(args.methods.split(","))
        runs = [r for r in runs if r[0] in wanted or r[1] in wanted]
    shared_tasks = tasks_from_classes(TASKS, 10)
    own_tasks = [{"classes": c, "logits": [10 * k, 10 * (k + 1)]} for k, c in enumerate(TASKS)]
    rows = []
    for label, method, kw in runs:
        row: dict[str, Any] = {"run": label, "method": method, "params": kw}
        for heads, tasks in (("shared", shared_tasks), ("per-task", own_tasks)):
            t0 = time.perf_counter()
            merged, _ = merge(models, method, data=data, heads=heads, spec=spec, renorm=renorm,
                              **kw)  # fmt: skip
            seconds = time.perf_counter() - t0
            res = task_accuracy(merged, dataset, tasks, data_root=args.data_root, limit=limit)
            compute = count_compute(merged.eval(), x[:1])
            row[heads] = {
                "macs": compute.macs,
                "joint": res["joint"]["accuracy"],
                "per_task": [t["accuracy"] for t in res["tasks"]],
                "mean_task": res["mean_task_accuracy"],
                "params": sum(p.numel() for p in merged.parameters()),
                "merge_s": round(seconds, 2),
            }
        rows.append(row)
        print(label, {h: (fmt(row[h]["joint"]), fmt(row[h]["mean_task"]), row[h]["merge_s"])
                      for h in ("shared", "per-task")}, flush=True)  # fmt: skip

    name = f"zip_tasks_{args.setting}"
    out = Path(args.out)
    meta0.update({"setting": args.setting, "sources": sources, "samples": samples,
                  "batch_size": args.batch_size, "renorm": renorm, "stops": stops,
                  "order": order, "limit_test": limit})  # fmt: skip
    write_json(out / f"{name}.json", {"meta": meta0, "rows": rows})
    render(out / f"{name}.json")
    print(f"wrote {out / name}.json, .md and .png")


#: The papers' headline gaps in joint accuracy (points), for the direction check.
PAPERS = {
    "zip_vs_weight": (32.9, "ZipIt! (Stoica et al., ICLR 2024), CIFAR-10 5+5, ResNet-20x4"),
    "zip_vs_permute": (20.7, "the same table, against activation permute"),
    "mudsc_zip_vs_zip": (0.9, "MuDSC's notebook, Taskonomy mean scaled performance x 100 "
                         "(0.848 vs 0.839), another task and metric"),
    "mudsc_zip_vs_mudsc": (7.4, "the same notebook: MuDSC-Zip 0.848 vs MuDSC-Align 0.774"),
}  # fmt: skip


def render(path: Path) -> None:
    """The markdown and the plot of a results JSON (what a run writes, and ``--render``)."""
    saved = json.loads(path.read_text())
    meta, rows = saved["meta"], saved["rows"]
    setting = SETTINGS[meta["setting"]]
    dataset, limit = setting["dataset"], meta.get("limit_test")
    lines = [f"# Merging {setting['arch']} models trained on {dataset} classes "
             f"{TASKS[0]} and {TASKS[1]}", ""]  # fmt: skip
    lines += provenance_md(meta)
    test = "the full test set" if limit is None else f"the first {limit} test images per task"
    stats = ("reset on the merge data for every merged model and both sources"
             if meta.get("renorm") else "none in this model")  # fmt: skip
    batches = f", batches of {meta['batch_size']}" if "batch_size" in meta else ""
    lines += [f"- Merge data: {meta['samples']} {dataset} training images (all classes, labels "
              f"unused){batches}; evaluation: {test}",
              f"- BatchNorm statistics: {stats}", ""]  # fmt: skip
    lines += ["Sources (own task: its 5 classes, argmax over them):", ""]
    for s in meta["sources"]:
        reset = s.get("own_task_accuracy_bn_reset")
        extra = "" if reset is None else f"; with BatchNorm reset {100 * reset:.2f}%"
        lines.append(f"- seed {s['seed']}, classes {s['classes']}, {s['epochs']} epochs "
                     f"(`{s['path']}`, sha256 {s['sha256'][:12]}): "
                     f"{100 * s['own_task_accuracy']:.2f}%{extra}")  # fmt: skip
    lines += [
        "",
        "Accuracy (%): joint = all ten classes, argmax over both tasks' classes; per task = "
        "each task's own classes and logits (A, B) and their mean. 'zip stop=k' zips the first "
        f"k groups (in input-to-output order; legal stops {meta['stops']}) and keeps the rest "
        "side by side; zip uses the paper's alpha=0.5, beta=1 and each group's own width; "
        "'mudsc' is MuDSC's permute variant and 'mudsc zip' its zip variant, at the default "
        "weight-space share alpha=0.5 unless the row names another. MMACs: multiply-accumulates "
        "of the Linear/Conv layers per image, counted on the saved model. Merge time in seconds "
        "(one merge, including statistics and BatchNorm reset).",
        "",
    ]
    table = []
    for r in rows:
        cells = [r["run"]]
        for h in ("shared", "per-task"):
            a = r[h]
            cells += [f"{100 * a['joint']:.2f}", *(f"{100 * v:.2f}" for v in a["per_task"]),
                      f"{100 * a['mean_task']:.2f}", f"{a['params']:,}",
                      f"{a['macs'] / 1e6:.2f}" if "macs" in a else "",
                      f"{a['merge_s']:.1f}"]  # fmt: skip
        table.append(cells)
    head = ["run"] + [f"{h} {c}" for h in ("shared", "per-task")
                      for c in ("joint", "A", "B", "mean", "params", "MMACs", "s")]  # fmt: skip
    lines += md_table(head, table)
    lines += [
        "",
        *against_papers(rows, setting["arch"], meta.get("renorm")),
        "",
        f"![accuracy against compute]({path.stem}.png)",
    ]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(path.with_suffix(".png"), rows, f"{setting['arch']} on {dataset} 5+5")


def against_papers(rows: list[dict[str, Any]], arch: str, renorm: str | None) -> list[str]:
    """Our gaps (joint accuracy, shared head) beside the papers', with the direction."""
    joint = {r["run"]: 100 * r["shared"]["joint"] for r in rows}
    partial = [joint[r["run"]] for r in rows if r["method"] == "zip" and "stop" in r["params"]]
    lines = ["## Against the papers (joint accuracy, shared head, points)", "",
             "| comparison | ours | paper | direction | paper's setting |",
             "|---|---|---|---|---|"]  # fmt: skip
    pairs = {"zip_vs_weight": ("zip", "weight"), "zip_vs_permute": ("zip", "activation"),
             "mudsc_zip_vs_zip": ("mudsc zip", "zip"),
             "mudsc_zip_vs_mudsc": ("mudsc zip", "mudsc")}  # fmt: skip
    for key, (a, b) in pairs.items():
        if a not in joint or b not in joint:
            continue
        ours, (paper, where) = joint[a] - joint[b], PAPERS[key]
        agree = "agrees" if (ours > 0) == (paper > 0) else "differs"
        lines.append(f"| {a} - {b} | {ours:+.1f} | {paper:+.1f} | {agree} | {where} |")
    if partial and {"zip", "ensemble"} <= set(joint):
        best, z, e = max(partial), joint["zip"], joint["ensemble"]
        closed = (best - z) / (e - z) if e != z else float("nan")
        lines += ["", f"The best partial zip closes {100 * closed:.0f}% of the gap between the "
                  f"full zip ({z:.1f}) and the ensemble ({e:.1f}): {best:.1f}."]  # fmt: skip
    lines += ["", f"Our sources are {arch} models trained on CPU budgets (the ZipIt! row's "
              "ResNet-20x4 has 16x a ResNet-20x1's compute), so the sizes of the gaps differ; "
              "where a direction differs, the MuDSC alpha sweep above shows how much the "
              "weight-space share alone moves it."]  # fmt: skip
    one_size = [joint[r["run"]] for r in rows
                if r["method"] != "ensemble" and "stop" not in r["params"]]  # fmt: skip
    if renorm is None and one_size and {"zip", "activation"} <= set(joint):
        if joint["zip"] < joint["activation"]:
            lines += ["", "Zip falls below permute here, unlike in the papers, whose models use "
                      "BatchNorm, reset after every merge by the ZipIt! protocol (as in the "
                      "BatchNorm table). These models have no statistics to reset and this "
                      "table runs no other renormalisation (REPAIR would apply; it is not run), "
                      "so every merge of one model's size stays at or below "
                      f"{max(one_size):.1f} % joint and the ordering among them rests on a few "
                      "points of collapsed models. The cause is not isolated."]  # fmt: skip
    return lines


def plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Left: joint accuracy (per-task heads) against measured MMACs, the partial zips a curve
    from the zip toward the ensemble, the other methods points. Right: MuDSC's joint accuracy
    against its weight-space share alpha, both variants, beside activation matching and zip."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def joint(r: dict[str, Any]) -> float:
        return 100 * r["per-task"]["joint"]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    zips = sorted((r for r in rows if r["method"] == "zip"), key=lambda r: r["per-task"]["macs"])
    left.plot([r["per-task"]["macs"] / 1e6 for r in zips], [joint(r) for r in zips], "o-",
              label="zip (full, partial)")  # fmt: skip
    for r in rows:
        if r["method"] == "zip" or "alpha" in r["params"]:
            continue
        x = r["per-task"]["macs"] / 1e6
        left.scatter(x, joint(r), s=14)
        left.annotate(r["run"], (x, joint(r)), fontsize=7, xytext=(3, 2),
                      textcoords="offset points")  # fmt: skip
    left.set_xlabel("MMACs per image (merged model)")
    left.set_ylabel("joint accuracy, per-task heads (%)")
    left.set_title(title)
    left.legend(fontsize=7)
    for variant, marker in (("permute", "s-"), ("zip", "o-")):
        mudsc = [r for r in rows if r["method"] == "mudsc"]
        sweep = sorted((r["params"].get("alpha", 0.5), joint(r)) for r in mudsc
                       if r["params"].get("variant", "permute") == variant)  # fmt: skip
        if sweep:
            right.plot(*zip(*sweep, strict=True), marker, label=f"MuDSC {variant}")
    for label, style in (("activation", ":"), ("zip", "--")):
        ref = [joint(r) for r in rows if r["run"] == label]
        if ref:
            right.axhline(ref[0], ls=style, color="grey", lw=1)
            right.annotate(label, (0.0, ref[0]), fontsize=7, xytext=(2, 2),
                           textcoords="offset points")  # fmt: skip
    right.set_xlabel("alpha (weight-space share)")
    right.set_ylabel("joint accuracy, per-task heads (%)")
    right.set_xlim(0, 1)
    right.set_title("MuDSC alpha sweep")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
