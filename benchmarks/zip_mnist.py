"""ZipIt! on two MNIST MLPs trained on disjoint classes (0-4 and 5-9): full and partial zip.

Two MLPs (784-512-512-512-10, the zoo's ``mlp``) are trained from different seeds, one on
digits 0-4 and one on 5-9 (each with a 10-way head, as ``symmerge train --classes``). They are
merged by naive averaging, weight matching, activation matching, ZipIt! (full, and at every
legal ``stop``: the first k hidden layers zipped, the rest side by side) and the side-by-side
ensemble, each with one shared head (the heads averaged) and with per-task heads (each
model's head reading the merged features). Reported: per-task accuracy (each task's own
classes, its own logits, on its own test digits, averaged over the tasks) and joint accuracy
(all 10 digits, argmax over every task's own classes) on the MNIST test set. Merge data:
``--samples`` training images of all ten digits (no labels used). No BatchNorm: no reset.

Anchor: ZipIt! (Stoica et al., ICLR 2024) reports, for disjoint-class CIFAR models, zip far
above permutation-based merging and partial zips approaching the ensemble.

Writes ``<out>/zip_mnist.{json,md}``. Checkpoints are trained on first use into ``--cache``.

    .venv/bin/python benchmarks/zip_mnist.py [--epochs 10] [--samples 2000]
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
    md_table,
    provenance,
    provenance_md,
    subset,
    write_json,
)

NAME = "zip_mnist"
TASKS = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def source(seed: int, classes: list[int], epochs: int, cache: str, root: str | None) -> Any:
    """A checkpoint trained on ``classes`` (cached in ``cache``)."""
    from symmerge.io import load_checkpoint, save_checkpoint
    from symmerge.train import train_model

    tag = "".join(str(c) for c in classes)
    path = Path(cache) / f"mlp_mnist_c{tag}_s{seed}_e{epochs}.safetensors"
    if not path.exists():
        print(f"training mlp on mnist classes {classes}, seed {seed} -> {path}", flush=True)
        model, info = train_model("mlp", "mnist", classes=classes, epochs=epochs, seed=seed,
                                  data_root=root, progress=False, device="cpu")  # fmt: skip
        save_checkpoint(path, model, info["config"], {**info, "classes": classes})
    model, meta = load_checkpoint(path)
    return model.eval(), meta, path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    parser.add_argument("--seeds", default="0,1", help="training seeds of the two models")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs per model")
    parser.add_argument("--samples", type=int, default=2000, help="train images to merge on")
    parser.add_argument("--batch-size", type=int, default=500, help="batch size of that data")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the sample draw")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import symmerge
    from symmerge.data import get_dataset
    from symmerge.evaluate import task_accuracy, tasks_from_classes
    from symmerge.merging import merge
    from symmerge.methods.zipit import group_order, legal_stops

    seeds = [int(s) for s in args.seeds.split(",")]
    meta0 = provenance({"models": seeds, "data": args.data_seed, "merge": 0})
    models, sources = [], []
    for seed, classes in zip(seeds, TASKS, strict=True):
        model, meta, path = source(seed, classes, args.epochs, args.cache, args.data_root)
        own = task_accuracy(model, "mnist", [{"classes": classes, "logits": [0, 10]}],
                            data_root=args.data_root)  # fmt: skip
        models.append(model)
        sources.append({"path": display_path(path), "seed": seed, "classes": classes,
                        "epochs": meta["epochs"],
                        "own_task_accuracy": own["tasks"][0]["accuracy"]})  # fmt: skip

    x, y = get_dataset("mnist", "train", root=args.data_root).tensors
    data = batches(*subset(x, y, args.samples, args.data_seed), args.batch_size)
    spec = symmerge.trace(models[0], (x[:2],))
    stops = legal_stops(spec, group_order(spec, list(models[0].state_dict())))
    runs: list[tuple[str, str, dict[str, Any]]] = [
        ("naive", "naive", {}), ("weight", "weight", {}), ("activation", "activation", {}),
        ("zip", "zip", {}),
        *[(f"zip stop={k}", "zip", {"stop": k}) for k in stops],
        ("ensemble", "ensemble", {}),
    ]  # fmt: skip
    shared_tasks = tasks_from_classes(TASKS, 10)
    own_tasks = [{"classes": c, "logits": [10 * k, 10 * (k + 1)]} for k, c in enumerate(TASKS)]
    rows = []
    for label, method, kw in runs:
        row: dict[str, Any] = {"run": label, "method": method, "params": kw}
        for heads, tasks in (("shared", shared_tasks), ("per-task", own_tasks)):
            t0 = time.perf_counter()
            merged, _ = merge(models, method, data=data, heads=heads, spec=spec, **kw)
            seconds = time.perf_counter() - t0
            res = task_accuracy(merged, "mnist", tasks, data_root=args.data_root)
            row[heads] = {
                "joint": res["joint"]["accuracy"],
                "per_task": [t["accuracy"] for t in res["tasks"]],
                "mean_task": res["mean_task_accuracy"],
                "params": sum(p.numel() for p in merged.parameters()),
                "merge_s": round(seconds, 2),
            }
        rows.append(row)
        print(label, {h: (fmt(row[h]["joint"]), fmt(row[h]["mean_task"]))
                      for h in ("shared", "per-task")}, flush=True)  # fmt: skip

    out = Path(args.out)
    meta0.update({"sources": sources, "samples": args.samples, "stops": stops,
                  "order": group_order(spec, list(models[0].state_dict()))})  # fmt: skip
    write_json(out / f"{NAME}.json", {"meta": meta0, "rows": rows})
    lines = [f"# ZipIt! on MNIST MLPs trained on digits {TASKS[0]} and {TASKS[1]}", ""]
    lines += provenance_md(meta0)
    lines += [f"- Merge data: {args.samples} MNIST training images (all digits, no labels), "
              f"batches of {args.batch_size}; evaluation: the MNIST test set", ""]  # fmt: skip
    lines += ["Sources (own task: its 5 digits, argmax over them):", ""]
    lines += [f"- seed {s['seed']}, digits {s['classes']}, {s['epochs']} epochs "
              f"(`{s['path']}`): {100 * s['own_task_accuracy']:.2f}%" for s in sources]  # fmt: skip
    lines += [
        "",
        "Accuracy (%): joint = all ten digits, argmax over both tasks' classes; per task = each "
        "task's own digits and classes (A, B) and their mean. 'zip stop=k' zips the first k "
        f"hidden layers (of {len(stops) - 1}) and keeps the rest side by side; zip uses the "
        "paper's alpha=0.5, beta=1 and each layer's own width (512).",
        "",
    ]
    table = []
    for r in rows:
        cells = [r["run"]]
        for h in ("shared", "per-task"):
            a = r[h]
            cells += [f"{100 * a['joint']:.2f}", *(f"{100 * v:.2f}" for v in a["per_task"]),
                      f"{100 * a['mean_task']:.2f}", f"{a['params']:,}"]  # fmt: skip
        table.append(cells)
    head = ["run"] + [f"{h} {c}" for h in ("shared", "per-task")
                      for c in ("joint", "A", "B", "mean", "params")]  # fmt: skip
    lines += md_table(head, table)
    (out / f"{NAME}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / NAME}.json and .md")


if __name__ == "__main__":
    main()
