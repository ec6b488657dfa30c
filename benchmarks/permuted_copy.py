"""Does weight matching recover a permuted copy? (algorithms.md §6.4's invariant, off the zoo)

For each random-init model A and a randomly permuted copy B (the same function), weight
matching (Git Re-Basin's coordinate descent, groups in a random order per sweep) is run with
``--orders`` different order seeds. Per model: how many seeds recover every group's
permutation, the objective ``sum <W_A, P(W_B)>`` each found against the true permutation's,
and the merged model's largest output difference from A (relative to A's output scale).
A miss is a local optimum of the coordinate descent (every found objective is below the
truth's), not a wrong cost: the best of the orders often reaches the truth. ``--checkpoints
DIR`` (default ``$SYMMERGE_CHECKPOINTS``) adds every trained symmerge checkpoint in DIR.

    .venv/bin/python benchmarks/permuted_copy.py [--orders 5] [--checkpoints DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from _common import RESULTS, md_table, portable, provenance, provenance_md
from torch import nn

import symmerge
from symmerge.solvers.coordinate import weight_matching


def _bottleneck_mlp() -> nn.Module:
    """An MLP with 16-unit bottlenecks between 64-unit layers (a squeeze/expand pattern)."""
    widths = [20, 64, 16, 64, 16, 64, 10]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        layers += [nn.Linear(a, b), nn.ReLU()] if i < len(widths) - 2 else [nn.Linear(a, b)]
    return nn.Sequential(*layers)


def _models(trained: Path | None) -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    import torchvision

    from symmerge.io import load_checkpoint

    tv = torchvision.models
    zoo = {f"mlp 20-64-16-64-16-64-10 (init seed {k})": (_bottleneck_mlp, (20,)) for k in range(4)}
    files = sorted(trained.glob("*.safetensors")) if trained is not None else []
    return {
        **zoo,
        "torchvision squeezenet1_0": (lambda: tv.squeezenet1_0(num_classes=10), (3, 64, 64)),
        "torchvision mobilenet_v2": (lambda: tv.mobilenet_v2(num_classes=10), (3, 64, 64)),
        "torchvision resnet18": (lambda: tv.resnet18(num_classes=10), (3, 64, 64)),
        **{f"trained {f.name} (sha256 {_sha256(f)[:12]})": (lambda f=f: load_checkpoint(f)[0],
                                 tuple(load_checkpoint(f)[0].input_shape)) for f in files},
    }  # fmt: skip


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _objective(spec: symmerge.SymmetrySpec, sa: dict, sb: dict, perms: dict) -> float:
    pb = spec.permute_state_dict(sb, perms)
    return float(sum((sa[k].double() * pb[k].double()).sum() for k in sa if k in spec.shapes))


def run(orders: int, trained: Path | None) -> list[dict]:
    rows = []
    for i, (name, (make, shape)) in enumerate(_models(trained).items()):
        torch.manual_seed(i)
        a = make().eval()
        x = torch.randn(8, *shape)
        spec = symmerge.trace(a, (x[:2],))
        truth = spec.random_permutations(seed=i + 1)
        b = spec.permuted(a, truth)
        sa, sb = a.state_dict(), b.state_dict()
        undo = {g: torch.argsort(p) for g, p in truth.items()}
        found, recovered, diffs = [], 0, []
        for seed in range(orders):
            perms = weight_matching(spec, sa, sb, seed=seed).perms
            found.append(_objective(spec, sa, sb, perms))
            recovered += all(torch.equal(perms[g], undo[g]) for g in undo)
            merged, _ = symmerge.merge([a, b], "weight", spec=spec, seed=seed)
            with torch.no_grad():
                ya = a(x)
                diffs.append(float((merged.eval()(x) - ya).abs().max() / ya.abs().max()))
        rows.append({
            "model": name, "groups": len(spec.groups), "orders": orders,
            "recovered": recovered, "objective_truth": _objective(spec, sa, sb, undo),
            "objective_found": found, "relative_output_diff": diffs,
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=5, help="order seeds per model")
    parser.add_argument("--checkpoints", default=os.environ.get("SYMMERGE_CHECKPOINTS"),
                        help="a folder of trained symmerge checkpoints to add")  # fmt: skip
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = run(args.orders, Path(args.checkpoints) if args.checkpoints else None)
    trained = "none" if not args.checkpoints else f"every *.safetensors in {args.checkpoints}"
    seeds = {"init": "model index i", "permutation": "i + 1", "orders": "0..K-1"}
    meta = provenance(seeds, {"trained_checkpoints": portable(trained)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "permuted_copy.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = md_table(
        ["model", "groups", "orders recovering every group", "objective: truth",
         "objective found (per order seed)", "max rel. output diff (per order seed)"],
        [[r["model"], r["groups"], f"{r['recovered']} of {r['orders']}",
          f"{r['objective_truth']:.2f}", ", ".join(f"{v:.2f}" for v in r["objective_found"]),
          ", ".join(f"{v:.1e}" for v in r["relative_output_diff"])] for r in rows],
    )  # fmt: skip
    lines = ["# Weight matching on a permuted copy", "", *provenance_md(meta),
             f"- Trained checkpoints: {meta['trained_checkpoints']}", "", *table]  # fmt: skip
    (out / "permuted_copy.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
