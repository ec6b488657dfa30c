"""Barrier vs width: CIFAR-10 ResNet-20 (x K channels) merged by weight / activation matching.

For every width K two ResNet-20xK are trained from different seeds, merged at λ = 0.5 by naive
averaging, weight matching and activation matching, each renormalized by a BatchNorm reset
(as the literature does for every BN merge) or by REPAIR, and evaluated on the CIFAR-10 test
set. The barrier is the midpoint's loss minus the mean of the two endpoints' losses (and the
mean endpoint accuracy minus the midpoint accuracy).

Anchors: Git Re-Basin (Ainsworth et al., ICLR 2023, Fig. 4) finds the ResNet-20 barrier
shrinking as width grows (near zero loss barrier at x32 on CIFAR-10); REPAIR (Jordan et al.,
ICLR 2023) removes most of the barrier left after matching ResNet-20s.

The issue's full scale is widths 1,4,16 trained for the recipe's 50 epochs on the whole
training set (a GPU run)::

    .venv/bin/python benchmarks/resnet_width_barrier.py --widths 1,4,16 --epochs 50 \\
        --limit-train 0 --test-limit 0 --samples 5000 --repair-exact

The defaults are a CPU-sized run (widths 1 and 2, 3 epochs on the first 5000 training
images, 500 images for BN reset / REPAIR / statistics, REPAIR's single train-mode pass, the
first 2000 test images); the results file says which scale was run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    add_common_args,
    batches,
    display_path,
    fmt,
    load_or_train,
    md_table,
    provenance,
    provenance_md,
    subset,
    write_json,
)

NAME = "resnet_width_barrier"
RENORM_LABEL = {None: "none", "reset-bn": "BN reset", "repair": "REPAIR"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    parser.add_argument("--widths", default="1,2", help="width multipliers K of resnet20xK")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per model")
    parser.add_argument(
        "--limit-train",
        type=int,
        default=5000,
        help="train on the first N training images (0: all 50000)",
    )
    parser.add_argument("--seeds", default="0,1", help="training seeds of models A and B")
    parser.add_argument("--methods", default="naive,weight,activation")
    parser.add_argument(
        "--renorms", default="none,reset-bn,repair", help="none = no correction (reference)"
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=500,
        help="training images for BN reset / REPAIR / activation statistics",
    )
    parser.add_argument("--batch-size", type=int, default=250, help="batch size of that data")
    parser.add_argument(
        "--test-limit",
        type=int,
        default=2000,
        help="evaluate on the first N test images (0: all 10000)",
    )
    parser.add_argument(
        "--repair-exact",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="REPAIR with symmerge's extra eval-mode pass per point (merge(renorm='repair'), "
        "about 4x the forward passes) instead of REPAIR's single train-mode pass",
    )
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--merge-seed", type=int, default=0)
    parser.add_argument(
        "--tag", default="", help="suffix of the results files (e.g. -gpu for a full-scale run)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import symmerge
    from symmerge.data import get_dataset
    from symmerge.evaluate import evaluate
    from symmerge.merging import merge
    from symmerge.renorm import repair

    widths = [int(w) for w in args.widths.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    renorms = [None if r == "none" else r for r in args.renorms.split(",") if r]
    limit = args.limit_train or None
    out = Path(args.out)
    name = NAME + args.tag

    xtr, ytr = get_dataset("cifar10", "train", root=args.data_root).tensors
    xte, yte = get_dataset("cifar10", "test", root=args.data_root).tensors
    if args.test_limit:
        xte, yte = xte[: args.test_limit], yte[: args.test_limit]
    pool = (xtr[:limit], ytr[:limit]) if limit else (xtr, ytr)  # what the models trained on
    data = batches(*subset(*pool, args.samples, args.data_seed), args.batch_size)
    del xtr, ytr

    rows: list[dict[str, Any]] = []
    ckpts: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for width in widths:
        arch = f"resnet20x{width}"
        models = []
        for s in seeds:
            t0 = time.perf_counter()
            m, meta, path = load_or_train(
                arch, "cifar10", s, args.epochs, args.cache, args.data_root, limit_train=limit
            )
            models.append(m.eval())
            ckpts.append(
                {
                    "width": width,
                    "seed": s,
                    "path": display_path(path),
                    "train_time_s": meta.get("train_time_s"),
                    "loaded_or_trained_s": round(time.perf_counter() - t0, 1),
                }
            )
        ends = [evaluate(m, (xte, yte)) for m in models]
        end_loss = sum(e["loss"] for e in ends) / 2
        end_acc = sum(e["accuracy"] for e in ends) / 2
        spec = symmerge.trace(models[0], (torch.randn(2, 3, 32, 32),))
        for method in methods:
            for renorm in renorms:
                torch.manual_seed(args.merge_seed)
                t0 = time.perf_counter()
                if renorm == "repair" and not args.repair_exact:
                    # what merge(renorm="repair") does, with REPAIR's single train-mode pass
                    # (exact=False: the paper's procedure, ~4x fewer forward passes)
                    merged, res = merge(models, method, data=data, spec=spec, seed=args.merge_seed)
                    aligned = [spec.permuted(m, res.perms(k)) for k, m in enumerate(models)]
                    repair(merged, aligned, data, weights=(0.5, 0.5), spec=spec, exact=False)
                else:
                    merged, res = merge(
                        models, method, data=data, renorm=renorm, spec=spec, seed=args.merge_seed
                    )
                merge_s = time.perf_counter() - t0
                ev = evaluate(merged, (xte, yte))
                row = {
                    "width": width,
                    "method": method,
                    "renorm": renorm,
                    "endpoint_accuracy": [e["accuracy"] for e in ends],
                    "endpoint_loss": [e["loss"] for e in ends],
                    "mid_accuracy": ev["accuracy"],
                    "mid_loss": ev["loss"],
                    "loss_barrier": ev["loss"] - end_loss,
                    "acc_barrier": end_acc - ev["accuracy"],
                    "merge_seconds": round(merge_s, 2),
                    "lap_seconds": round(res.lap_seconds, 3),
                    "sweeps": res.iterations,
                }
                rows.append(row)
                print(
                    {
                        k: row[k]
                        for k in (
                            "width",
                            "method",
                            "renorm",
                            "mid_accuracy",
                            "loss_barrier",
                            "acc_barrier",
                            "merge_seconds",
                        )
                    },
                    flush=True,
                )

    meta = provenance(
        {"training": seeds, "data_subset": args.data_seed, "merge": args.merge_seed},
        {
            "scale": {
                "widths": widths,
                "epochs": args.epochs,
                "train_images": limit or 50000,
                "test_images": len(xte),
                "renorm_and_statistics_images": sum(len(b[0]) for b in data),
                "batch_size": args.batch_size,
                "repair_exact": args.repair_exact,
                "full_scale": widths == [1, 4, 16] and args.epochs >= 50 and limit is None,
            },
            "training": "symmerge recipe: SGD nesterov, lr 0.1, batch 128, wd 5e-4, warm-up + "
            "cosine, random crop + flip, BatchNorm ResNet-20 (option-B 1x1 shortcuts)",
            "checkpoints": ckpts,
            "total_seconds": round(time.perf_counter() - t_start, 1),
        },
    )
    write_json(out / f"{name}.json", {"meta": meta, "rows": rows})
    plot(rows, out / f"{name}.png")
    write_md(out / f"{name}.md", meta, rows)


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    keys = list(dict.fromkeys((r["method"], r["renorm"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    widths = sorted({r["width"] for r in rows})
    styles = {None: ":", "reset-bn": "-", "repair": "--"}
    for ax, metric, ylabel in (
        (axes[0], "loss_barrier", "test loss barrier"),
        (axes[1], "acc_barrier", "test accuracy barrier"),
    ):
        for method, renorm in keys:
            pts = sorted(
                (r["width"], r[metric])
                for r in rows
                if r["method"] == method and r["renorm"] == renorm
            )
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                color=f"C{methods.index(method)}",
                linestyle=styles.get(renorm, "-."),
                label=f"{method} + {RENORM_LABEL.get(renorm, renorm)}",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [f"x{w}" for w in widths])
        ax.set_xlabel("width multiplier")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("CIFAR-10 ResNet-20: barrier at λ=0.5 vs width")
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_md(path: Path, meta: dict, rows: list[dict]) -> None:
    sc = meta["scale"]
    lines = ["# CIFAR-10 ResNet-20: barrier vs width", "", *provenance_md(meta)]
    if not sc["full_scale"]:
        lines += [
            f"- **Reduced CPU scale, not the issue's full scale** (widths 1, 4, 16, 50 epochs "
            f"on all 50000 images, needs a GPU; none was lent): widths {sc['widths']}, "
            f"{sc['epochs']} epochs on the first {sc['train_images']} training images, "
            f"tested on the first {sc['test_images']} test images. The endpoints are far "
            "from converged, so these barriers are not comparable with the papers' numbers.",
        ]
    lines += [
        f"- Training: {meta['training']}",
        "- Data for BN reset / REPAIR / activation statistics: "
        f"{sc['renorm_and_statistics_images']} training images "
        "(seeded draw from the images the models trained on), batches of "
        f"{sc['batch_size']}",
        "- BN reset: `merge(..., renorm='reset-bn')`. REPAIR: "
        + (
            "`merge(..., renorm='repair')` (symmerge's exact REPAIR)"
            if sc["repair_exact"]
            else "`merge(...)` then `symmerge.renorm.repair(merged, aligned endpoints, data, "
            "weights=(0.5, 0.5), exact=False)` (REPAIR's single train-mode pass; "
            "`--repair-exact` uses merge(renorm='repair'))"
        ),
        "- Barrier = midpoint minus mean of the two (unmodified) endpoints: loss(0.5) − mean "
        "loss, and mean accuracy − accuracy(0.5). Accuracy in fractions.",
        f"- Total run time {meta['total_seconds']} s (training included when not cached)",
        "- Checkpoints (benchmarks/.cache/, trained by this script on first use; CPU training "
        "time at training): "
        + "; ".join(
            f"x{c['width']} seed {c['seed']}: {c['train_time_s']} s" for c in meta["checkpoints"]
        ),
        "",
    ]
    table = []
    for r in rows:
        table.append(
            [
                f"x{r['width']}",
                r["method"],
                RENORM_LABEL.get(r["renorm"], r["renorm"]),
                " / ".join(fmt(a) for a in r["endpoint_accuracy"]),
                fmt(r["mid_accuracy"]),
                fmt(r["acc_barrier"]),
                " / ".join(fmt(x) for x in r["endpoint_loss"]),
                fmt(r["mid_loss"]),
                fmt(r["loss_barrier"]),
                fmt(r["merge_seconds"], 1),
            ]
        )
    lines += md_table(
        [
            "width",
            "method",
            "renorm",
            "endpoint acc",
            "mid acc",
            "acc barrier",
            "endpoint loss",
            "mid loss",
            "loss barrier",
            "merge s",
        ],
        table,
    )
    lines += ["", "Loss barrier from the narrowest to the widest width:", ""]
    for method, renorm in dict.fromkeys((r["method"], r["renorm"]) for r in rows):
        pts = sorted(
            (r["width"], r["loss_barrier"])
            for r in rows
            if r["method"] == method and r["renorm"] == renorm
        )
        if len(pts) > 1:
            trend = "shrinks" if pts[-1][1] < pts[0][1] else "grows"
            lines.append(
                f"- {method} + {RENORM_LABEL.get(renorm, renorm)}: "
                + " → ".join(f"x{w} {fmt(v)}" for w, v in pts)
                + f" ({trend})"
            )
    lines += [
        "",
        "For BatchNorm networks a BN reset already restores the per-channel statistics that "
        "REPAIR targets (at the BN outputs), so REPAIR is expected to add little over it; "
        "REPAIR's large gains are against no correction (the `none` rows) and on networks "
        "without BatchNorm.",
        "",
        f"![barrier vs width]({path.stem}.png)",
    ]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
