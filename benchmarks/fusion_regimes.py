"""Fusing N models trained on non-IID or sharded parts of one dataset, zero-shot.

N parents of the zoo MLP are trained on the N parts of a ``symmerge train --split`` split
(``dirichlet``: per-class proportions from Dir(linspace(1, 5, N)) shuffled per class, the
paper's non-IID scheme; ``shards``: disjoint sets of whole classes), one training seed per
part. They are fused, without any training afterwards, on a fusion set of ``--samples``
training images drawn at random from the whole training set (the union of the parts; the
official code samples parent 0's data instead), by every applicable method:

* ``kf-linear``: weighted K-means of all parents' neurons, layers refitted in order on the
  fused model's own inputs (uniform importance), the head's target weighting each class's
  logits by the parents' shares of that class's training data (the official code does this
  for its gradient variant only; for the linear ones it is ours), and with plain averaged
  logits ("mean head", the official linear variants' target); ``hf-linear`` (two parents);
* ``kf-gradient``: the same grouping, then every level trained with Adam on the fused model's
  own inputs (class-share head); ``kf-linear`` with conductance / DeepLIFT / ablation
  importance (two parents, ``--importance``);
* ``otfusion`` (activation ground metric, uniform marginals) when registered;
* logit-KD: parent 1 with only its head refitted to the class-share-weighted logits;
* Git Re-Basin weight matching (two parents), MergeMany and C2M3 (N parents), naive
  averaging; on BatchNorm models each of these also with its statistics reset on the fusion
  set ("+ BN reset");
* with ``--finetune E``: kf-linear, OT fusion and the data-free merges trained E epochs on the
  fusion set afterwards;
* the parents themselves and their ensemble (logits averaged, N times the compute).

Reported: test accuracy (full test set unless ``--limit-test``) and fusion time, and, for
two parents, kf-linear's and OT fusion's times measured ``--time-repeats`` times alternately
in the same process (medians and their ratio). Writes
``<out>/fusion_regimes_<dataset>[_<arch>].{json,md,png}`` (the arch only when not ``mlp``).

    .venv/bin/python benchmarks/fusion_regimes.py --dataset mnist
    .venv/bin/python benchmarks/fusion_regimes.py --dataset cifar10 --arch vgg11x0.5 \
        --epochs 30 --regimes dirichlet --parents 2 --widths "" --samples 400 --finetune 5
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    add_common_args,
    batches,
    display_path,
    md_table,
    provenance,
    provenance_md,
    subset,
    write_json,
)
from torch import nn

# Anchor (secondary numbers, a reproduction report; VGG11 on CIFAR-10, non-IID, zero-shot):
PAPER = {"KF-Linear": {2: 84.5, 4: 78.9, 8: 69.6}, "OTFusion": {2: 43.4, 4: 20.4, 8: 12.9},
         "Git Re-Basin": {2: 71.8}, "averaging": {2: 11.2, 4: 10.0, 8: 10.0}}  # fmt: skip


def parent(
    dataset: str, kind: str, part: int, n: int, args: Any, arch: str | None = None
) -> tuple[nn.Module, dict, Path]:
    from symmerge.io import load_checkpoint, save_checkpoint
    from symmerge.train import train_model

    arch = arch or args.arch
    lr = "" if args.lr is None else f"_lr{args.lr:g}"
    name = f"{arch}_{dataset}_{kind}{n}-p{part}_s{part}_e{args.epochs}{lr}.safetensors"
    path = Path(args.cache) / name
    if not path.exists():
        print(f"training {arch} on {dataset} {kind} part {part}/{n} -> {path}", flush=True)
        model, info = train_model(arch, dataset, epochs=args.epochs, seed=part, lr=args.lr,
                                  data_root=args.data_root, progress=False, device="cpu",
                                  split=kind, part=part, n_parts=n, split_seed=0)  # fmt: skip
        save_checkpoint(path, model, info["config"], info)
    model, meta = load_checkpoint(path)
    return model.eval(), meta, path


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in
                   zip(x.split(1000), y.split(1000), strict=True))  # fmt: skip
    return hits / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--arch", default="mlp")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=None, help="training lr (default: recipe)")
    parser.add_argument("--regimes", default="dirichlet,shards")
    parser.add_argument("--parents", default="2,4,8")
    parser.add_argument("--samples", type=int, default=2000, help="fusion images")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--limit-test", type=int, default=None)
    parser.add_argument("--render", default=None, help="redraw .md and .png from this JSON")
    parser.add_argument(
        "--importance",
        default="conductance,deeplift,ablation",
        help="kf-linear importance scores tried with two parents (captum)",
    )
    parser.add_argument("--finetune", type=int, default=0, help="epochs after fusion (0: none)")
    parser.add_argument(
        "--time-repeats",
        type=int,
        default=3,
        help="alternate kf-linear / otfusion runs timed with two parents",
    )
    parser.add_argument(
        "--timing-only",
        action="store_true",
        help="only the kf-linear / otfusion timing with two parents (run it on an otherwise "
        "idle machine); writes fusion_timing_<dataset>.{json,md}",
    )
    parser.add_argument("--widths", default="512,256",
                        help="two parents of these widths (non-IID halves), fused to several "
                        "widths; empty to skip")  # fmt: skip
    args = parser.parse_args()
    if args.render:
        import json

        path = Path(args.render)
        saved = json.loads(path.read_text())
        stem = path.name.removesuffix(".json")  # not with_suffix: names like vgg11x0.5 hold dots
        write_markdown(path.with_name(f"{stem}.md"), saved["meta"], saved["rows"],
                       saved.get("timings", []))  # fmt: skip
        plot(path.with_name(f"{stem}.png"), saved["rows"], saved["meta"]["dataset"])
        return
    torch.set_num_threads(args.threads)
    meta0 = provenance({"data": args.data_seed, "split": 0, "parents": "seed = part"})

    from symmerge.data import get_dataset
    from symmerge.merging import merge
    from symmerge.methods import list_methods

    x_tr, y_tr = get_dataset(args.dataset, "train", root=args.data_root).tensors
    x_te, y_te = get_dataset(args.dataset, "test", root=args.data_root).tensors
    x_te, y_te = x_te[: args.limit_test], y_te[: args.limit_test]
    data = batches(*subset(x_tr, y_tr, args.samples, args.data_seed), args.batch_size)
    rows: list[dict[str, Any]] = []
    timings: list[dict[str, Any]] = []
    if args.timing_only:
        for kind in filter(None, args.regimes.split(",")):
            found = [parent(args.dataset, kind, k, 2, args) for k in (1, 2)]
            share = {"class_counts": [m.get("class_counts") for _, m, _ in found],
                     "head": "class-share"}  # fmt: skip
            timings.append(time_pair(kind, [m for m, _, _ in found], data, share,
                                     args.time_repeats))  # fmt: skip
        meta0.update(
            {
                "dataset": args.dataset,
                "arch": args.arch,
                "epochs": args.epochs,
                "samples": args.samples,
                "load_average_end": list(os.getloadavg()),
            }
        )
        name = f"fusion_timing_{args.dataset}"
        write_json(Path(args.out) / f"{name}.json", {"meta": meta0, "timings": timings})
        lines = [f"# kf-linear against OT fusion, time ({args.dataset}, two {args.arch} parents)",
                 "", *provenance_md(meta0), f"- Load average at the end: "
                 f"{meta0['load_average_end']}", ""]  # fmt: skip
        write_markdown_timing(Path(args.out) / f"{name}.md", lines, timings)
        return
    for kind in filter(None, args.regimes.split(",")):
        for n in (int(v) for v in args.parents.split(",")):
            found = [parent(args.dataset, kind, k, n, args) for k in range(1, n + 1)]
            models = [m for m, _, _ in found]
            accs = [accuracy(m, x_te, y_te) for m in models]
            base = {"regime": kind, "parents": n}
            counts = [meta.get("class_counts") for _, meta, _ in found]
            rows.append({**base, "method": "parents (mean)", "accuracy": sum(accs) / n,
                         "each": accs, "seconds": 0.0, "class_counts": counts,
                         "checkpoints": [display_path(p) for _, _, p in found]})  # fmt: skip
            share = {"class_counts": counts, "head": "class-share"}
            runs = [("kf-linear", "kf-linear", share),
                    ("kf-linear (mean head)", "kf-linear", {"head": "mean"}),
                    ("kf-gradient", "kf-gradient", share),
                    ("otfusion", "otfusion", {}), ("logit-kd", "logit-kd", share),
                    ("naive", "naive", {}),
                    ("ensemble", "ensemble", {})]  # fmt: skip
            if n == 2:
                runs += [("hf-linear", "hf-linear", share), ("weight", "weight", {})]
                runs += [(f"kf-linear ({imp})", "kf-linear", {**share, "importance": imp})
                         for imp in filter(None, args.importance.split(","))]  # fmt: skip
            else:
                runs += [("mergemany", "mergemany", {}), ("c2m3", "c2m3", {})]
            bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in models[0].modules())
            if bn:  # data-free merges keep interpolated statistics unless reset
                runs += [
                    (f"{label} + BN reset", method, {**kw, "renorm": "reset-bn"})
                    for label, method, kw in runs
                    if method in ("naive", "weight", "mergemany", "c2m3", "otfusion")
                ]
            if args.finetune:
                runs += [(f"{label} + finetune {args.finetune}", method,
                          {**kw, "finetune": args.finetune})
                         for label, method, kw in runs
                         if label in ("kf-linear", "otfusion", "weight", "mergemany", "naive",
                                      "weight + BN reset", "mergemany + BN reset")]  # fmt: skip
            for label, method, kw in runs:
                if method not in list_methods():
                    continue
                t0 = time.perf_counter()
                try:
                    fused, _ = merge(models, method, data=data, seed=0, **kw)
                    acc, status = accuracy(fused, x_te, y_te), "ok"
                except (ValueError, RuntimeError, ImportError) as exc:  # recorded, not dropped
                    acc, status = None, f"failed: {exc}"
                seconds = time.perf_counter() - t0
                rows.append({**base, "method": label, "accuracy": acc, "seconds": seconds,
                             "status": status})  # fmt: skip
                shown = "—" if acc is None else f"{100 * acc:.2f}"
                print(f"{kind} N={n} {label}: {shown} ({seconds:.1f} s) {status}", flush=True)
            if n == 2 and args.time_repeats:
                timings.append(time_pair(kind, models, data, share, args.time_repeats))
    if args.widths:
        rows += different_widths(args, data, x_te, y_te)
    out = Path(args.out)
    name = f"fusion_regimes_{args.dataset}" + ("" if args.arch == "mlp" else f"_{args.arch}")
    meta0.update({"dataset": args.dataset, "arch": args.arch, "epochs": args.epochs,
                  "lr": args.lr or "the recipe's", "finetune": args.finetune,
                  "samples": args.samples, "limit_test": args.limit_test})  # fmt: skip
    write_json(out / f"{name}.json", {"meta": meta0, "rows": rows, "timings": timings,
                                      "paper": PAPER})  # fmt: skip
    write_markdown(out / f"{name}.md", meta0, rows, timings)
    plot(out / f"{name}.png", rows, args.dataset)
    print(f"wrote {out / name}.json, .md and .png")


def time_pair(
    kind: str, models: list[nn.Module], data: list, share: dict[str, Any], repeats: int
) -> dict[str, Any]:
    """kf-linear and OT fusion on the same two parents, alternately ``repeats`` times in this
    process (after one untimed run of each, which pays one-off costs): medians and ratio."""
    import statistics

    from symmerge.merging import merge

    runs = {"kf-linear": share, "otfusion": {}}
    times: dict[str, list[float]] = {m: [] for m in runs}
    for k in range(repeats + 1):
        for method, kw in runs.items():
            t0 = time.perf_counter()
            merge(models, method, data=data, seed=0, **kw)
            if k:
                times[method].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"{kind} timing: kf-linear {med['kf-linear']:.2f} s, otfusion {med['otfusion']:.2f} s, "
          f"ratio {med['kf-linear'] / med['otfusion']:.2f}", flush=True)  # fmt: skip
    return {"regime": kind, "parents": 2, "seconds": times, "median": med,
            "ratio": med["kf-linear"] / med["otfusion"]}  # fmt: skip


def different_widths(
    args: Any, data: list, x_te: torch.Tensor, y_te: torch.Tensor
) -> list[dict[str, Any]]:
    """Two parents of different widths (``mlp-w<W>``, the two halves of a non-IID split),
    fused by kf-linear to the narrow width, their mean and the wide width, and by OT fusion
    and weight matching into the wide one."""
    from symmerge.merging import merge

    wide, narrow = (int(w) for w in args.widths.split(","))
    found = [parent(args.dataset, "dirichlet", k, 2, args, arch=f"{args.arch}-w{w}")
             for k, w in ((1, wide), (2, narrow))]  # fmt: skip
    models = [m for m, _, _ in found]
    counts = [meta.get("class_counts") for _, meta, _ in found]
    base = {"regime": f"widths {wide}+{narrow}", "parents": 2}
    rows = [{**base, "method": f"parent {w} wide", "accuracy": accuracy(m, x_te, y_te),
             "seconds": 0.0} for m, w in zip(models, (wide, narrow), strict=True)]  # fmt: skip
    runs = [(f"kf-linear to {k}", "kf-linear",
             {"width": k, "class_counts": counts, "head": "class-share"})
            for k in (narrow, (wide + narrow) // 2, wide)]  # fmt: skip
    runs += [
        (
            f"kf-gradient to {narrow}",
            "kf-gradient",
            {"width": narrow, "class_counts": counts, "head": "class-share"},
        ),
        ("otfusion (into the wide)", "otfusion", {}),
        ("weight matching (into the wide)", "weight", {}),
    ]

    class Ensemble(nn.Module):  # the two parents' logits averaged (their widths differ)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (models[0](x) + models[1](x)) / 2

    rows.append({**base, "method": "ensemble", "accuracy": accuracy(Ensemble(), x_te, y_te),
                 "seconds": 0.0})  # fmt: skip
    for label, method, kw in runs:
        t0 = time.perf_counter()
        try:
            fused, _ = merge(models, method, data=data, **kw)
            acc, status = accuracy(fused, x_te, y_te), "ok"
        except (ValueError, RuntimeError) as exc:
            acc, status = None, f"failed: {exc}"
        seconds = time.perf_counter() - t0
        rows.append({**base, "method": label, "accuracy": acc, "seconds": seconds,
                     "status": status})  # fmt: skip
        shown = "—" if acc is None else f"{100 * acc:.2f}"
        print(f"widths {label}: {shown} ({seconds:.1f} s) {status}", flush=True)
    return rows


def write_markdown(
    path: Path, meta: dict[str, Any], rows: list[dict[str, Any]], timings: list[dict[str, Any]]
) -> None:
    lines = [f"# Zero-shot fusion of N {meta['arch']} parents on {meta['dataset']} parts", ""]
    lines += provenance_md(meta)
    test = "full test set" if meta["limit_test"] is None else f"first {meta['limit_test']}"
    lr = meta.get("lr", "the recipe's")
    lines += [f"- Parents: {meta['epochs']} epochs each (lr {lr}) on their part (training seed = "
              f"part number, split seed 0); fusion set: {meta['samples']} training images drawn at "
              f"random from the whole training set; evaluation: {test}", "",
              "Accuracy (%) and fusion time (s) per regime and number of parents N. 'parents "
              "(mean)' is the mean of the parents' own accuracies; 'ensemble' averages all "
              "parents' logits (N times the compute). Paper anchor (secondary, VGG11 on CIFAR-10 "
              "non-IID, zero-shot; another setting): KF-Linear 84.5 / 78.9 / 69.6 at N = 2 / 4 "
              "/ 8, OTFusion 43.4 / 20.4 / 12.9, Git Re-Basin 71.8 (N = 2), averaging about "
              "10.", ""]  # fmt: skip
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    cell = {(r["regime"], r["parents"], r["method"]): r for r in rows}
    for kind in regimes:
        mine = [r for r in rows if r["regime"] == kind]
        ns = list(dict.fromkeys(r["parents"] for r in mine))
        methods = list(dict.fromkeys(r["method"] for r in mine))
        table = []
        for m in methods:
            vals = []
            for n in ns:
                r = cell.get((kind, n, m))
                if r is None:
                    vals.append("")
                elif r["accuracy"] is None:
                    vals.append(f"failed ({r['status'][8:60]})")
                else:
                    vals.append(f"{100 * r['accuracy']:.2f} ({r['seconds']:.1f} s)")
            table.append([m, *vals])
        lines += [f"## {kind}", ""] + md_table(["method", *(f"N = {n}" for n in ns)], table)
        lines.append("")
    each = [f"{r['regime']} N = {r['parents']}: "
            + ", ".join(f"{100 * a:.2f}" for a in r["each"])
            for r in rows if r["method"] == "parents (mean)" and r.get("each")]  # fmt: skip
    if each:
        lines += ["Each parent's own test accuracy (%), in part order: " + "; ".join(each) + ".",
                  ""]  # fmt: skip
    lines += against_paper(cell, regimes)
    write_markdown_timing(path, lines, timings)


def against_paper(cell: dict[tuple, dict[str, Any]], regimes: list[str]) -> list[str]:
    """kf-linear's lead over OT fusion and over Git Re-Basin (N = 2) / MergeMany (N > 2) in
    every regime and N, beside the paper's lead in its setting, and whether the sign agrees."""

    def acc(kind: str, n: int, method: str) -> float | None:
        r = cell.get((kind, n, method))
        return None if r is None or r["accuracy"] is None else 100 * r["accuracy"]

    table = []
    for kind in regimes:
        for n in sorted({key[1] for key in cell if key[0] == kind}):
            ours = acc(kind, n, "kf-linear")
            for other, paper_other in (("otfusion", "OTFusion"), ("weight", "Git Re-Basin"),
                                       ("mergemany", "Git Re-Basin")):  # fmt: skip
                # the baseline at its best: with its BatchNorm statistics reset, where run
                found = [a for a in (acc(kind, n, other), acc(kind, n, f"{other} + BN reset"))
                         if a is not None]  # fmt: skip
                theirs = max(found) if found else None
                if ours is None or theirs is None:
                    continue
                paper = PAPER["KF-Linear"].get(n, None), PAPER[paper_other].get(n, None)
                gap = None if None in paper else paper[0] - paper[1]  # type: ignore[operator]
                agree = "—" if gap is None else ("yes" if (ours - theirs) * gap > 0 else "no")
                table.append([kind, n, other, f"{ours - theirs:+.2f}",
                              "—" if gap is None else f"{gap:+.1f}", agree])  # fmt: skip
    if not table:
        return []
    return ["## Against the paper", "",
            "kf-linear's lead in points over each baseline here (the baseline's better row of "
            "plain and + BN reset where both ran), beside the paper's lead of KF-Linear over "
            "the same baseline (VGG11, CIFAR-10 non-IID; Git Re-Basin only at N = 2). "
            "'agrees': the lead has the paper's sign.", "",
            *md_table(["regime", "N", "baseline", "lead here", "paper's lead", "agrees"], table),
            ""]  # fmt: skip


def write_markdown_timing(path: Path, lines: list[str], timings: list[dict[str, Any]]) -> None:
    """``lines`` and, if any, the table of kf-linear's and OT fusion's median times."""
    if timings:
        reps = len(timings[0]["seconds"]["kf-linear"])
        lines += ["## kf-linear against OT fusion, time", "",
                  f"Two parents, the same fusion set; each method run {reps} times alternately "
                  "in one process after an untimed run of each; medians.", ""]  # fmt: skip
        lines += md_table(["regime", "kf-linear (s)", "otfusion (s)", "ratio"],
                          [[t["regime"], f"{t['median']['kf-linear']:.2f}",
                            f"{t['median']['otfusion']:.2f}", f"{t['ratio']:.2f}x"]
                           for t in timings])  # fmt: skip
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, rows: list[dict[str, Any]], dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: plt.get_cmap("tab20")(k % 20) for k, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(regimes), figsize=(5 * len(regimes), 4), squeeze=False)
    for ax, kind in zip(axes[0], regimes, strict=True):
        by: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if r["regime"] == kind and r["accuracy"] is not None:
                by.setdefault(r["method"], []).append((r["parents"], 100 * r["accuracy"]))
        for m, pts in by.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=m, markersize=4,
                    color=colors[m])  # fmt: skip
        ax.set_title(f"{dataset}, {kind}")
        ax.set_xlabel("parents N")
        ax.set_ylabel("test accuracy (%)")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
