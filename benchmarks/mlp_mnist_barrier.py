"""Loss/accuracy barriers between two MNIST MLPs (784-512-512-512-10), per merging method.

Two MLPs trained from different seeds are aligned by each method (naive = no alignment,
weight matching, activation matching, STE), then evaluated along the path
(1 - λ)·A + λ·aligned(B) at ``--lambdas`` evenly spaced points, with and without REPAIR.
Reports the barrier at λ = 0.5 (value at the midpoint minus the mean of the endpoints; for
accuracy, the mean of the endpoints minus the midpoint) and the largest barrier along the
curve, on the MNIST test set and on a subset of the training set.

Anchor: Git Re-Basin (Ainsworth et al., ICLR 2023, Fig. 2) reports a near-zero loss barrier
for MNIST MLPs after weight or activation matching, and a large one for naive averaging.

Writes ``<out>/mlp_mnist_barrier.{json,md,png}``. Checkpoints are trained on first use into
``--cache`` (what ``symmerge train mlp --dataset mnist --seed S --epochs E -o PATH`` writes).

    .venv/bin/python benchmarks/mlp_mnist_barrier.py [--epochs 10] [--samples 5000]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
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

NAME = "mlp_mnist_barrier"
LABELS = {
    "naive": "naive",
    "weight": "weight matching",
    "activation": "activation matching",
    "ste": "STE",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    parser.add_argument("--seeds", default="0,1", help="training seeds of models A and B")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs per model")
    parser.add_argument("--methods", default="naive,weight,activation,ste")
    parser.add_argument(
        "--samples", type=int, default=5000, help="MNIST train samples for activation/STE/REPAIR"
    )
    parser.add_argument("--batch-size", type=int, default=500, help="batch size of that data")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the sample draw")
    parser.add_argument("--merge-seed", type=int, default=0, help="seed= of merge()")
    parser.add_argument("--lambdas", type=int, default=11, help="points on the path")
    parser.add_argument(
        "--train-eval",
        type=int,
        default=10000,
        help="train samples the train-set curve is measured on",
    )
    parser.add_argument(
        "--ste-epochs",
        type=int,
        default=10,
        help="epochs= of the STE method over the --samples data",
    )
    parser.add_argument(
        "--ste-wait", type=float, default=0.0, help="seconds to wait for 'ste' to be registered"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from symmerge.data import get_dataset
    from symmerge.evaluate import barrier, evaluate, plot_curve
    from symmerge.merging import interpolation
    from symmerge.methods import get_method, list_methods

    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    lambdas = [k / (args.lambdas - 1) for k in range(args.lambdas)]
    out = Path(args.out)

    endpoints, ckpts = [], []
    for s in seeds:
        model, meta, path = load_or_train(
            "mlp", "mnist", s, args.epochs, args.cache, args.data_root
        )
        endpoints.append(model.eval())
        ckpts.append(
            {
                "path": display_path(path),
                "seed": s,
                "epochs": meta["epochs"],
                "test_accuracy_at_training": meta["test_accuracy"],
                "train_time_s": meta.get("train_time_s"),
            }
        )

    xtr, ytr = get_dataset("mnist", "train", root=args.data_root).tensors
    xte, yte = get_dataset("mnist", "test", root=args.data_root).tensors
    data = batches(*subset(xtr, ytr, args.samples, args.data_seed), args.batch_size)
    train_eval = subset(xtr, ytr, args.train_eval, args.data_seed + 1)

    def metrics(model: torch.nn.Module) -> dict[str, float]:
        te = evaluate(model, (xte, yte))
        tr = evaluate(model, train_eval)
        return {
            "loss": te["loss"],
            "accuracy": te["accuracy"],
            "train_loss": tr["loss"],
            "train_accuracy": tr["accuracy"],
        }

    deadline = time.monotonic() + args.ste_wait
    while "ste" in methods and "ste" not in list_methods():
        try:  # a colleague's module may appear while we wait; importing it registers 'ste'
            importlib.import_module("symmerge.methods.ste")
        except ImportError:
            pass
        if "ste" in list_methods() or time.monotonic() >= deadline:
            break
        time.sleep(15)

    rows: list[dict[str, Any]] = []
    curves: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        for renorm in (None, "repair"):
            label = LABELS.get(method, method) + (" + REPAIR" if renorm else "")
            row: dict[str, Any] = {"method": method, "renorm": renorm, "label": label}
            if method not in list_methods():
                row["status"] = (
                    f"not run: method '{method}' is not registered (registered: {list_methods()})"
                )
                rows.append(row)
                print(label, row["status"], flush=True)
                continue
            kwargs: dict[str, Any] = {}
            if method == "ste" and args.ste_epochs is not None:
                if "epochs" in inspect.signature(get_method("ste")).parameters:
                    kwargs["epochs"] = args.ste_epochs
            torch.manual_seed(args.merge_seed)
            t0 = time.perf_counter()
            curve, merge_s = [], 0.0
            try:
                it = interpolation(
                    endpoints,
                    method,
                    lambdas,
                    data=data,
                    renorm=renorm,
                    seed=args.merge_seed,
                    **kwargs,
                )
                while True:
                    t1 = time.perf_counter()
                    try:
                        lam, model = next(it)
                    except StopIteration:
                        break
                    merge_s += time.perf_counter() - t1
                    curve.append({"lambda": lam, **metrics(model)})
            except Exception as e:  # noqa: BLE001 - a failing method is reported, not fatal
                row["status"] = f"failed: {type(e).__name__}: {e}"
                rows.append(row)
                print(label, row["status"], flush=True)
                continue
            mid = [p for p in curve if p["lambda"] in (0.0, 0.5, 1.0)]
            row.update(
                status="ok",
                method_kwargs=kwargs,
                merge_and_renorm_seconds=round(merge_s, 2),
                total_seconds=round(time.perf_counter() - t0, 2),
                midpoint=next(p for p in curve if p["lambda"] == 0.5),
                loss_barrier_mid=barrier(mid, "loss"),
                acc_barrier_mid=barrier(mid, "accuracy"),
                loss_barrier_max=barrier(curve, "loss"),
                acc_barrier_max=barrier(curve, "accuracy"),
                train_loss_barrier_mid=barrier(mid, "train_loss"),
                train_acc_barrier_mid=barrier(mid, "train_accuracy", higher_is_better=True),
                curve=curve,
            )
            rows.append(row)
            curves[label] = curve
            print(
                label,
                {
                    k: row[k]
                    for k in ("loss_barrier_mid", "acc_barrier_mid", "merge_and_renorm_seconds")
                },
                flush=True,
            )

    meta = provenance(
        {
            "training": seeds,
            "data_subset": args.data_seed,
            "train_eval_subset": args.data_seed + 1,
            "merge": args.merge_seed,
        },
        {
            "model": "mlp (784-512-512-512-10, ReLU)",
            "training": f"symmerge recipe: SGD nesterov, lr 0.05, batch 128, {args.epochs} "
            "epochs, warm-up + cosine, wd 5e-4, full MNIST train set",
            "checkpoints": ckpts,
            "data_for_methods": f"{len(torch.cat([b[0] for b in data]))} MNIST train samples "
            f"(seeded draw, seed {args.data_seed}), batches of {args.batch_size}; used by "
            "activation matching, STE and REPAIR (naive/weight use none)",
            "test_set": f"MNIST test, {len(xte)} samples",
            "train_eval": f"{len(train_eval[0])} MNIST train samples (seed {args.data_seed + 1})",
            "ste": f"merge(..., 'ste', epochs={args.ste_epochs}) on that data: "
            f"{args.ste_epochs * len(data)} STE steps of batch {args.batch_size}, other "
            "arguments at symmerge's defaults (SGD lr 0.05, momentum 0.9, keep='best', "
            "matcher='fast', initialised by weight matching)",
            "lambdas": lambdas,
            "registered_methods": list_methods(),
        },
    )
    write_json(out / f"{NAME}.json", {"meta": meta, "rows": rows})
    if curves:
        plot_curve(
            curves,
            out / f"{NAME}.png",
            keys=("loss", "accuracy"),
            title=f"MNIST MLP, seeds {seeds[0]} vs {seeds[1]} (test set)",
        )
    write_md(
        out / f"{NAME}.md", meta, rows, ckpts, endpoints_metrics=[metrics(m) for m in endpoints]
    )


def write_md(
    path: Path, meta: dict, rows: list[dict], ckpts: list[dict], endpoints_metrics: list[dict]
) -> None:
    lines = [
        "# Barriers between two MNIST MLPs",
        "",
        *provenance_md(meta),
        f"- Model: {meta['model']}; training: {meta['training']}",
        f"- Data for activation matching / STE / REPAIR: {meta['data_for_methods']}",
        f"- STE: {meta['ste']}",
        f"- Evaluated on: {meta['test_set']} (barriers below) and {meta['train_eval']} "
        "(train columns)",
        f"- Path: {len(meta['lambdas'])} points λ = 0, 0.1, ..., 1 of (1-λ)·A + λ·aligned(B)",
        "",
        "## Endpoints",
        "",
    ]
    lines += md_table(
        ["model", "checkpoint", "test acc", "test loss", "train-subset loss"],
        [
            [
                f"seed {c['seed']}",
                c["path"],
                fmt(m["accuracy"]),
                fmt(m["loss"]),
                fmt(m["train_loss"]),
            ]
            for c, m in zip(ckpts, endpoints_metrics, strict=True)
        ],
    )
    lines += [
        "",
        "## Barriers (test set)",
        "",
        "Barrier at λ=0.5: loss(0.5) − (loss(0)+loss(1))/2, and mean endpoint accuracy "
        "− accuracy(0.5) (both ≥ 0 is worse). Max: the largest such gap over the 11 "
        "points. Accuracy in fractions (0.01 = 1 point).",
        "",
    ]
    table = []
    for r in rows:
        if r.get("status") != "ok":
            table.append([r["label"], r.get("status", "")] + [""] * 7)
            continue
        m = r["midpoint"]
        table.append(
            [
                r["label"],
                fmt(r["loss_barrier_mid"]),
                fmt(r["acc_barrier_mid"]),
                fmt(r["loss_barrier_max"]),
                fmt(r["acc_barrier_max"]),
                fmt(m["accuracy"]),
                fmt(r["train_loss_barrier_mid"]),
                fmt(r["train_acc_barrier_mid"]),
                fmt(r["merge_and_renorm_seconds"], 1),
            ]
        )
    lines += md_table(
        [
            "method",
            "loss barrier λ=.5",
            "acc barrier λ=.5",
            "loss barrier max",
            "acc barrier max",
            "test acc λ=.5",
            "train loss barrier λ=.5",
            "train acc barrier λ=.5",
            "align+build+renorm s (11 pts)",
        ],
        table,
    )
    naive = next((r for r in rows if r["method"] == "naive" and not r["renorm"]), None)
    if naive is not None and naive.get("status") == "ok":
        lines += ["", "Loss barrier at λ=0.5 relative to naive averaging (no REPAIR):", ""]
        for r in rows:
            if r.get("status") == "ok" and r is not naive:
                ratio = r["loss_barrier_mid"] / naive["loss_barrier_mid"]
                verdict = "smaller" if ratio < 1 else "NOT smaller"
                lines.append(f"- {r['label']}: {ratio:.4f}× ({verdict})")
    lines += ["", "## Curves (test loss / test accuracy per λ)", ""]
    ok = [r for r in rows if r.get("status") == "ok"]
    if ok:
        lams = [p["lambda"] for p in ok[0]["curve"]]
        lines += md_table(
            ["method", *[f"{x:.1f}" for x in lams]],
            [
                [r["label"], *[f"{p['loss']:.3f} / {p['accuracy']:.3f}" for p in r["curve"]]]
                for r in ok
            ],
        )
        lines += ["", f"![curves]({path.stem}.png)"]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
