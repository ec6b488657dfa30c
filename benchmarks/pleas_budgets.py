"""PLeaS at compute budgets 1x-2x beside every other method, at equal *measured* compute.

Two models are merged into one whose compute (multiply-adds of every Linear / Conv layer,
counted by :func:`symmerge.flops.count_compute` on the merged model exported block-sparse,
so structurally zero blocks are not counted) lies between one model's and two. Methods, on the
same checkpoints and merge data:

* PLeaS with closed-form least squares at budgets {1.0, 1.2, 1.5, 1.8, 2.0} for each allocator
  (``score``, ``stagewise``, ``uniform``); with the official code's Adam (400 steps, lr 5e-4,
  cosine) at each budget with ``score``; without least squares (partial matching alone);
  PLeaS-free (matching, least squares and BN reset on public data, never the models' own);
* PLeaS fitted on the merged model's own inputs, layer by layer (``ls_inputs=merged``), at
  1x and 1.5x;
* least squares without permutation at 1x (RegMean-like, ``match=none``);
* Git Re-Basin weight matching, activation matching, MuDSC (permute) at 1x; ZipIt! full and at
  every legal partial stop (its own measured compute); the side-by-side ensemble (2x).

Settings (``--setting``):

* ``mnist-fashion-mlp``: shared label space, different domains (stand-in for DomainNet): the
  zoo MLP trained on MNIST (seed 0) and on Fashion-MNIST (seed 1), one 10-way head. Merge data:
  ``--samples`` training images of each dataset; PLeaS-free uses CIFAR-10 converted to
  greyscale 28x28 (``cifar10@mnist``). Accuracy: the mean over the two test sets.
* ``cifar10-resnet20``: different label spaces, one shared 10-way head: ResNet-20 trained on
  CIFAR-10 classes 0-4 (seed 0) and 5-9 (seed 1) (``--checkpoints A,B``, e.g. the reference
  checkpoints in ``$SYMMERGE_CHECKPOINTS``). Merge data: ``--samples`` training images of all
  ten classes (labels unused); PLeaS-free uses Fashion-MNIST converted to 32x32 RGB
  (``fashion-mnist@cifar10``; CIFAR classes neither model saw do not exist for a 0-4 / 5-9
  split). Accuracy: joint (argmax over all ten logits) on the test set.

BatchNorm statistics of every model (sources included) are reset on the method's merge data.
Writes ``<out>/pleas_budgets_<setting>.{json,md,png}``.

    .venv/bin/python benchmarks/pleas_budgets.py --setting mnist-fashion-mlp
    .venv/bin/python benchmarks/pleas_budgets.py --setting cifar10-resnet20 --checkpoints \\
        $SYMMERGE_CHECKPOINTS/resnet20-cifar10-c0-4-s0.safetensors,\\
$SYMMERGE_CHECKPOINTS/resnet20-cifar10-c5-9-s1.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    add_common_args,
    batches,
    display_path,
    load_or_train,
    md_table,
    provenance,
    provenance_md,
    subset,
    write_json,
)
from torch import nn

BUDGETS = (1.0, 1.2, 1.5, 1.8, 2.0)
ALLOCATORS = ("score", "stagewise", "uniform")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Per image: 1.0 where the argmax over all logits is the label."""
    model.eval()
    hits = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            hits.append((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).double())
    return torch.cat(hits)


def measured(model: nn.Module, spec: Any, sds: list[dict], maps: dict, x: torch.Tensor) -> float:
    """Multiply-adds per example of the merged model exported block-sparse."""
    from symmerge.blocksparse import block_sparse
    from symmerge.flops import count_compute
    from symmerge.groupmap import merged_support

    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    masks = merged_support(spec, sds, maps, [f"{n}.weight" for n in layers])
    sparse = block_sparse(model, {n: masks[f"{n}.weight"] for n in layers})
    return count_compute(sparse, (x[:2],)).macs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--setting", choices=["mnist-fashion-mlp", "cifar10-resnet20"],
                        default="mnist-fashion-mlp")  # fmt: skip
    parser.add_argument("--checkpoints", default=None, help="A,B (cifar10-resnet20)")
    parser.add_argument("--epochs", type=int, default=10, help="MLP training epochs")
    parser.add_argument("--samples", type=int, default=None,
                        help="merge images (per dataset for the MLPs)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--limit-test", type=int, default=None, help="test images per set")
    parser.add_argument("--adam-steps", type=int, default=400)
    parser.add_argument("--runs", default=None, help="comma-separated run labels to keep")
    parser.add_argument("--render", default=None, help="redraw .md and .png from this JSON")
    args = parser.parse_args()
    if args.render:
        import json

        saved = json.loads(Path(args.render).read_text())
        base = Path(args.render).with_suffix("")
        write_markdown(base.with_suffix(".md"), saved["meta"], saved["rows"], args)
        plot(base.with_suffix(".png"), saved["rows"], saved["meta"]["setting"])
        return
    torch.set_num_threads(args.threads)

    import symmerge
    from symmerge.data import get_dataset
    from symmerge.io import load_checkpoint
    from symmerge.merging import has_bn_statistics, merge
    from symmerge.methods.zipit import group_order, legal_stops
    from symmerge.renorm import reset_bn
    from symmerge.sources import load_data_sources
    from symmerge.stats import collect_statistics

    meta0 = provenance({"data": args.data_seed})  # at the start: the code that runs
    root, limit = args.data_root, args.limit_test
    mlp = args.setting == "mnist-fashion-mlp"
    samples = args.samples or (1000 if mlp else 2000)
    tests: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    files: list[Path] = []
    if mlp:
        names = ("mnist", "fashion-mnist")
        models, metas = [], []
        for seed, name in enumerate(names):
            model, meta, path = load_or_train("mlp", name, seed, args.epochs, args.cache, root)
            models.append(model.eval())
            metas.append(meta)
            files.append(path)
        parts = [subset(*get_dataset(n, "train", root=root).tensors, samples, args.data_seed)
                 for n in names]  # fmt: skip
        x_merge = torch.cat([p[0] for p in parts])
        y_merge = torch.cat([p[1] for p in parts])
        for n in names:
            x, y = get_dataset(n, "test", root=root).tensors
            tests[n] = (x[:limit], y[:limit])
        public_spec = "cifar10@mnist"
    else:
        if not args.checkpoints:
            parser.error("cifar10-resnet20 needs --checkpoints A,B")
        files = [Path(p) for p in args.checkpoints.split(",")]
        loaded = [load_checkpoint(p) for p in files]
        models = [m.eval() for m, _ in loaded]
        metas = [meta for _, meta in loaded]
        x_merge, y_merge = subset(*get_dataset("cifar10", "train", root=root).tensors, samples,
                                  args.data_seed)  # fmt: skip
        x, y = get_dataset("cifar10", "test", root=root).tensors
        x, y = x[:limit], y[:limit]
        tests["joint"] = (x, y)
        public_spec = "fashion-mnist@cifar10"
    g = torch.Generator().manual_seed(args.data_seed)
    order = torch.randperm(len(x_merge), generator=g)
    data = batches(x_merge[order], y_merge[order], args.batch_size)
    x_pub, y_pub = load_data_sources(public_spec, root=root, samples=len(x_merge),
                                     seed=args.data_seed, model=models[0])  # fmt: skip
    public = batches(x_pub, y_pub, args.batch_size)
    bn = has_bn_statistics(models[0])
    renorm = "reset-bn" if bn else None

    def score(model: nn.Module) -> dict[str, float]:
        if mlp:
            accs = {k: accuracy(model, *v).mean().item() for k, v in tests.items()}
            return {"accuracy": sum(accs.values()) / len(accs), **accs}
        hits = accuracy(model, *tests["joint"])  # one pass; each task's images from it
        task = tests["joint"][1] >= 5
        return {"accuracy": hits.mean().item(), "task A images": hits[~task].mean().item(),
                "task B images": hits[task].mean().item()}  # fmt: skip

    sources = []
    for k, (model, meta, path) in enumerate(zip(models, metas, files, strict=True)):
        rec = {"path": display_path(path), "sha256": sha256(path), "seed": meta.get("seed"),
               "dataset": meta.get("dataset"), "classes": meta.get("classes"),
               "epochs": meta.get("epochs"), **score(model)}  # fmt: skip
        if bn:
            models[k] = reset_bn(model, data).eval()
            rec["after_bn_reset"] = score(models[k])
        sources.append(rec)
        print("source", k, {kk: v for kk, v in rec.items() if kk != "sha256"}, flush=True)

    x0 = x_merge[:2]
    spec = symmerge.trace(models[0], (x0,))
    sds = [{k: v.detach() for k, v in m.state_dict().items()} for m in models]
    t0 = time.perf_counter()
    stats = collect_statistics(spec, models, data)
    stats_s = time.perf_counter() - t0
    pub_stats = collect_statistics(spec, models, public)
    keys = list(sds[0])
    stops = legal_stops(spec, group_order(spec, keys), keys)

    runs: list[tuple[str, str, str, dict[str, Any]]] = []  # label, family, method, kwargs
    for alloc in ALLOCATORS:
        for b in BUDGETS:
            runs.append((f"pleas closed {alloc} {b}x", f"pleas closed ({alloc})", "pleas",
                         {"budget": b, "allocator": alloc, "stats": stats}))  # fmt: skip
    for b in BUDGETS:
        runs.append(
            (
                f"pleas adam score {b}x",
                "pleas adam (score)",
                "pleas",
                {"budget": b, "ls": "adam", "steps": args.adam_steps, "stats": stats},
            )
        )
        runs.append((f"partial matching score {b}x", "partial matching, no LS (score)", "pleas",
                     {"budget": b, "ls": "none", "stats": stats}))  # fmt: skip
        runs.append((f"pleas-free closed score {b}x", "PLeaS-free closed (score)", "pleas",
                     {"budget": b, "stats": pub_stats, "public": True}))  # fmt: skip
    for b in (1.0, 1.5):
        runs.append((f"pleas closed own-inputs score {b}x", "pleas closed, own inputs (score)",
                     "pleas", {"budget": b, "ls_inputs": "merged", "stats": stats}))  # fmt: skip
    runs += [
        ("pleas closed score 1.5x end to end", "end to end (statistics included)", "pleas",
         {"budget": 1.5, "allocator": "score"}),
        ("lstsq no permutation 1.0x", "least squares, no permutation", "pleas",
         {"budget": 1.0, "match": "none"}),
        ("weight matching", "Git Re-Basin (weight)", "weight", {}),
        ("activation matching", "activation matching", "activation", {"stats": stats}),
        ("mudsc", "MuDSC (permute)", "mudsc", {}),
        *[(f"zip stop={k}", "ZipIt! (partial stops)", "zip", {"stop": k})
          for k in stops[1:]],
        ("ensemble", "ensemble", "ensemble", {}),
    ]  # fmt: skip
    if args.runs:
        wanted = set(args.runs.split(","))
        runs = [r for r in runs if r[0] in wanted or r[1] in wanted]
    from symmerge.flops import count_compute

    one = count_compute(models[0], (x0,)).macs
    rows = []
    for label, family, method, kw in runs:
        kw = dict(kw)
        use = public if kw.pop("public", False) else data
        t1 = time.perf_counter()
        merged, res = merge(models, method, data=use, spec=spec, renorm=renorm, **kw)
        seconds = time.perf_counter() - t1
        t2 = time.perf_counter()
        macs = measured(merged, spec, sds, res.maps, x0)
        res.timings["export_and_count"] = time.perf_counter() - t2
        row = {"run": label, "family": family, "method": method,
               "params": {k: v for k, v in kw.items() if k != "stats"},
               "macs": macs, "compute": macs / one, "merge_s": round(seconds, 2),
               "timings": {k: round(v, 3) for k, v in res.timings.items()},
               "details": {k: v for k, v in res.details.items() if k != "ls_loss"},
               "data": public_spec if use is public else "own", **score(merged)}  # fmt: skip
        rows.append(row)
        print(f"{label}: acc {100 * row['accuracy']:.2f} compute {row['compute']:.3f}x "
              f"{seconds:.1f}s", flush=True)  # fmt: skip

    name = f"pleas_budgets_{args.setting}"
    out = Path(args.out)
    meta0["seeds"]["models"] = [s["seed"] for s in sources]
    meta0.update({"setting": args.setting, "sources": sources, "samples": samples,
                  "public": public_spec, "renorm": renorm, "limit_test": limit,
                  "statistics_s": round(stats_s, 2), "one_model_macs": one})  # fmt: skip
    write_json(out / f"{name}.json", {"meta": meta0, "rows": rows})
    write_markdown(out / f"{name}.md", meta0, rows, args)
    plot(out / f"{name}.png", rows, args.setting)
    print(f"wrote {out / name}.json, .md and .png")


def write_markdown(path: Path, meta: dict[str, Any], rows: list[dict], args: Any) -> None:
    what = ("MNIST vs Fashion-MNIST MLPs (shared 10-way head)" if meta["setting"].startswith(
        "mnist") else "CIFAR-10 ResNet-20, classes 0-4 vs 5-9 (shared 10-way head)")  # fmt: skip
    lines = [f"# PLeaS at compute budgets: {what}", ""] + provenance_md(meta)
    test = "full test sets" if meta["limit_test"] is None else f"first {meta['limit_test']}"
    lines += [
        f"- Merge data: {meta['samples']} images per source dataset, batches of "
        f"{args.batch_size}; PLeaS-free public data: `{meta['public']}` (as many images); "
        f"BatchNorm reset: {meta['renorm'] or 'none (no BatchNorm)'}; evaluation: {test}",
        f"- One model: {meta['one_model_macs']:,.0f} multiply-adds per example (Linear/Conv)",
        "",
        "Sources:",
        "",
    ]
    for s in meta["sources"]:
        accs = ", ".join(f"{k} {100 * v:.2f}%" for k, v in s.items()
                         if isinstance(v, float) and k != "accuracy")  # fmt: skip
        reset = s.get("after_bn_reset")
        extra = f"; after BN reset: {100 * reset['accuracy']:.2f}%" if reset else ""
        lines.append(f"- `{s['path']}` (sha256 {s['sha256'][:12]}, seed {s['seed']}, "
                     f"{s['dataset']}, classes {s['classes']}, {s['epochs']} epochs): "
                     f"{accs}{extra}")  # fmt: skip
    keys = [k for k in rows[0] if k not in ("run", "family", "method", "params", "macs",
                                           "compute", "merge_s", "timings", "details", "data",
                                           "accuracy")] if rows else []  # fmt: skip
    lines += [
        "",
        "Accuracy (%) against measured compute (x one model; multiply-adds counted on "
        "the merged model exported block-sparse, so zero blocks are not counted). Time: "
        "one merge in seconds, BatchNorm reset included; the activation statistics of "
        f"the merge data ({meta['statistics_s']:.1f} s) are collected once and shared by "
        "the PLeaS and activation-matching rows (not in their time) except the 'end to "
        "end' row; stages: match (matching and pair scores), alloc (budget allocation and "
        "maps), lstsq (least squares), export (block-sparse export and count).",
        "",
    ]
    table = []
    for r in rows:
        t = r["timings"]
        table.append([r["run"], f"{r['compute']:.3f}", f"{100 * r['accuracy']:.2f}",
                      *(f"{100 * r[k]:.2f}" for k in keys), f"{r['merge_s']:.1f}",
                      *(f"{t[k]:.2f}" if k in t else "" for k in
                        ("match", "allocate", "lstsq", "export_and_count"))])  # fmt: skip
    lines += md_table(["run", "compute", "accuracy", *keys, "merge s", "match s", "alloc s",
                       "lstsq s", "export s"], table)  # fmt: skip
    lines += ["", *gaps(rows), "", *equal_compute(rows)]
    path.write_text("\n".join(lines) + "\n")


#: Secondary numbers (a third-party summary of the CVPR version, not checked against the PDF):
#: DomainNet, ResNet-50, 1x, average accuracy over domains.
PAPER_1X = {"Git Re-Basin": 17.8, "ZipIt!": 25.9, "MuDSC": 30.7, "PLeaS": 38.6, "RegMean": 12.1}


def gaps(rows: list[dict]) -> list[str]:
    """PLeaS's lead at 1x over each baseline, beside the paper's (same-label DomainNet)."""
    by = {r["run"]: 100 * r["accuracy"] for r in rows}
    zips = [r for r in rows if r["method"] == "zip"]
    full_zip = max(zips, key=lambda r: r["params"].get("stop", 0), default=None)
    ours = by.get("pleas closed score 1.0x")
    if ours is None:
        return []
    pairs = [("Git Re-Basin", by.get("weight matching")), ("MuDSC", by.get("mudsc")),
             ("ZipIt!", None if full_zip is None else 100 * full_zip["accuracy"]),
             ("RegMean", by.get("lstsq no permutation 1.0x"))]  # fmt: skip
    out = ["PLeaS (closed form, score allocator) at 1x against each baseline at 1x, in points, "
           "beside the paper's gap (DomainNet ResNet-50, secondary numbers from a third-party "
           "summary, not checked against the PDF; a different setting, so compare direction and "
           "rough size only):", ""]  # fmt: skip
    table = []
    for name, value in pairs:
        if value is None:
            continue
        paper = PAPER_1X["PLeaS"] - PAPER_1X[name]
        table.append([name, f"{value:.2f}", f"{ours - value:+.2f}", f"{paper:+.1f}"])
    ens = by.get("ensemble")
    if ens is not None:
        table.append(["ensemble (2x)", f"{ens:.2f}", f"{ours - ens:+.2f}", "—"])
    return out + md_table(["baseline", "its accuracy", "PLeaS 1x lead (ours)", "paper"], table)


def equal_compute(rows: list[dict], tol: float = 0.1) -> list[str]:
    """Every PLeaS run beside the ZipIt! partial zip of nearest measured compute (within
    ``tol`` x one model), and the difference."""
    zips = [r for r in rows if r["method"] == "zip"]
    pleas = [r for r in rows if r["method"] == "pleas" and r["compute"] > 1.0 + 1e-6]
    table = []
    for r in pleas:
        near = min(zips, key=lambda z: abs(z["compute"] - r["compute"]), default=None)
        if near is None or abs(near["compute"] - r["compute"]) > tol:
            continue
        table.append([r["run"], f"{r['compute']:.3f}", f"{100 * r['accuracy']:.2f}", near["run"],
                      f"{near['compute']:.3f}", f"{100 * near['accuracy']:.2f}",
                      f"{100 * (r['accuracy'] - near['accuracy']):+.2f}"])  # fmt: skip
    if not table:
        return []
    head = ["PLeaS run", "compute", "accuracy", "nearest partial zip", "its compute",
            "its accuracy", "PLeaS lead"]  # fmt: skip
    intro = (f"At equal measured compute: every PLeaS run above 1x beside the ZipIt! partial "
             f"zip nearest in measured compute (within {tol}x):")  # fmt: skip
    return [intro, "", *md_table(head, table)]


def plot(path: Path, rows: list[dict], setting: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list[dict]] = {}
    for r in rows:
        families.setdefault(r["family"], []).append(r)
    cmap = plt.get_cmap("tab20")
    for k, (fam, rs) in enumerate(families.items()):
        rs = sorted(rs, key=lambda r: r["compute"])
        xs, ys = [r["compute"] for r in rs], [100 * r["accuracy"] for r in rs]
        style = ("--^" if fam.startswith("ZipIt") else "-o") if len(rs) > 1 else "s"
        ax.plot(xs, ys, style, label=fam, markersize=4, color=cmap(k % 20))
    ax.set_xlabel("measured compute (x one model)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"PLeaS budgets: {setting}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
