"""Where weight matching starts: Git Re-Basin's identity against the dependency sweep.

Weight matching is coordinate descent over groups. Git Re-Basin starts it at the identity;
symmerge starts it at :func:`symmerge.solvers.coordinate.dependency_sweep` (each group solved
once from the tensors whose other axes are already solved). ``init=identity`` still runs the
published algorithm, so both are measured on the same models, one order seed at a time:

(a) Permuted copies (algorithms.md §6.4's invariant): a random-init model A (a bottleneck MLP,
    torchvision SqueezeNet, MobileNetV2, ResNet-18, and every trained checkpoint in
    ``--checkpoints``) and a randomly permuted copy B. Per start: how many order seeds recover
    every group's permutation, the objective ``sum <W_A, P(W_B)>`` found against the truth's,
    and the merged model's largest output difference from A (relative to A's output scale).
(b) Trained pairs: two checkpoints of one architecture (``--pair A B``, repeatable; default:
    consecutive files of the same model in ``--checkpoints``, in name order). Per start and
    order seed: the objective, the sweeps, and the test accuracy of the midpoint merge (one
    shared head, every class of the checkpoints' dataset; BatchNorm statistics reset on
    ``--reset-images`` training images), beside the endpoints' accuracies.

    .venv/bin/python benchmarks/matching_start.py [--orders 5] [--checkpoints DIR] [--pair A B]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, md_table, portable, provenance, provenance_md
from torch import nn

import symmerge
from symmerge.solvers.coordinate import weight_matching

STARTS = ("identity", "dependency")  # Git Re-Basin's; symmerge's default


def _bottleneck_mlp() -> nn.Module:
    """An MLP with 16-unit bottlenecks between 64-unit layers (a squeeze/expand pattern)."""
    widths = [20, 64, 16, 64, 16, 64, 10]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _init(start: str, spec: symmerge.SymmetrySpec) -> dict[str, torch.Tensor] | None:
    return spec.identity_permutations() if start == "identity" else None


def _objective(spec: symmerge.SymmetrySpec, sa: dict, sb: dict, perms: dict) -> float:
    pb = spec.permute_state_dict(sb, perms)
    keys = [k for k in sa if k in spec.shapes and not k.endswith(("running_mean", "running_var"))]
    return float(sum((sa[k].double() * pb[k].double()).sum() for k in keys))


def _copies(trained: Sequence[Path]) -> dict[str, tuple[Callable[[], nn.Module], tuple]]:
    import torchvision

    from symmerge.io import load_checkpoint

    tv = torchvision.models
    zoo = {f"mlp 20-64-16-64-16-64-10 (init seed {k})": (_bottleneck_mlp, (20,)) for k in range(4)}
    return {
        **zoo,
        "torchvision squeezenet1_0": (lambda: tv.squeezenet1_0(num_classes=10), (3, 64, 64)),
        "torchvision mobilenet_v2": (lambda: tv.mobilenet_v2(num_classes=10), (3, 64, 64)),
        "torchvision resnet18": (lambda: tv.resnet18(num_classes=10), (3, 64, 64)),
        **{f"trained {f.name} (sha256 {_sha256(f)[:12]})": (lambda f=f: load_checkpoint(f)[0],
                                 tuple(load_checkpoint(f)[0].input_shape)) for f in trained},
    }  # fmt: skip


def permuted_copies(orders: int, trained: Sequence[Path]) -> list[dict[str, Any]]:
    rows = []
    for i, (name, (make, shape)) in enumerate(_copies(trained).items()):
        torch.manual_seed(i)
        a = make().eval()
        x = torch.randn(8, *shape)
        spec = symmerge.trace(a, (x[:2],))
        truth = spec.random_permutations(seed=i + 1)
        b = spec.permuted(a, truth)
        sa, sb = a.state_dict(), b.state_dict()
        undo = {g: torch.argsort(p) for g, p in truth.items()}
        row: dict[str, Any] = {"model": name, "groups": len(spec.groups), "orders": orders,
                               "objective_truth": _objective(spec, sa, sb, undo)}  # fmt: skip
        for start in STARTS:
            found, recovered, diffs = [], 0, []
            for seed in range(orders):
                perms = weight_matching(spec, sa, sb, seed=seed, init=_init(start, spec)).perms
                found.append(_objective(spec, sa, sb, perms))
                recovered += all(torch.equal(perms[g], undo[g]) for g in undo)
                merged, _ = symmerge.merge([a, b], "weight", spec=spec, seed=seed,
                                           init=_init(start, spec))  # fmt: skip
                with torch.no_grad():
                    ya = a(x)
                    diffs.append(float((merged.eval()(x) - ya).abs().max() / ya.abs().max()))
            row[start] = {"recovered": recovered, "objective": found, "relative_output_diff": diffs}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _default_pairs(folder: Path | None) -> list[tuple[Path, Path]]:
    from symmerge.io import read_checkpoint_metadata

    if folder is None:
        return []
    by_model: dict[tuple, list[Path]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        meta = read_checkpoint_metadata(f)
        by_model.setdefault((meta.get("model_name"), meta.get("dataset")), []).append(f)
    return [(fs[k], fs[k + 1]) for fs in by_model.values() for k in range(0, len(fs) - 1, 2)]


def trained_pairs(
    pairs: Sequence[tuple[Path, Path]], orders: int, data_root: str | None, reset_images: int
) -> list[dict[str, Any]]:
    from symmerge.data import get_dataset, iterate_batches
    from symmerge.io import load_checkpoint
    from symmerge.train import evaluate

    rows = []
    for fa, fb in pairs:
        (a, meta_a), (b, _) = load_checkpoint(fa), load_checkpoint(fb)
        dataset = meta_a["dataset"]
        spec = symmerge.trace(a, (torch.randn(2, *a.input_shape),))
        sa, sb = a.state_dict(), b.state_dict()
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in a.modules())
        train = get_dataset(dataset, "train", root=data_root)
        reset = list(iterate_batches(train[:reset_images], 500, shuffle=False)) if has_bn else None

        def accuracy(model: nn.Module, dataset: str = dataset) -> float:
            return float(evaluate(model, dataset, data_root=data_root)["accuracy"])

        row: dict[str, Any] = {
            "pair": [fa.name, fb.name], "sha256": [_sha256(fa)[:12], _sha256(fb)[:12]],
            "dataset": dataset, "classes": [meta_a.get("classes"), load_checkpoint(fb)[1].get(
                "classes")], "endpoint_accuracy": [accuracy(a), accuracy(b)],
            "renorm": "reset-bn" if has_bn else None, "orders": orders,
        }  # fmt: skip
        for start in STARTS:
            objective, sweeps, acc = [], [], []
            for seed in range(orders):
                merged, res = symmerge.merge(
                    [a, b], "weight", spec=spec, seed=seed, init=_init(start, spec),
                    renorm=row["renorm"], renorm_data=reset,
                )  # fmt: skip
                objective.append(_objective(spec, sa, sb, res.perms(1)))
                sweeps.append(res.iterations)
                acc.append(accuracy(merged))
            row[start] = {"objective": objective, "sweeps": sweeps, "accuracy": acc}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _markdown(meta: dict[str, Any], copies: list[dict], pairs: list[dict]) -> str:
    lines = ["# Where weight matching starts: identity (Git Re-Basin) or dependency sweep", "",
             *provenance_md(meta), f"- Trained checkpoints: {meta['trained_checkpoints']}", "",
             "## (a) A random-init model and its permuted copy", ""]  # fmt: skip
    lines += md_table(
        ["model", "groups", "start", "orders recovering every group", "objective: truth",
         "objective found (per order seed)", "max rel. output diff (per order seed)"],
        [[r["model"], r["groups"], s, f"{r[s]['recovered']} of {r['orders']}",
          f"{r['objective_truth']:.2f}", ", ".join(f"{v:.2f}" for v in r[s]["objective"]),
          ", ".join(f"{v:.1e}" for v in r[s]["relative_output_diff"])]
         for r in copies for s in STARTS],
    )  # fmt: skip
    lines += ["", "## (b) Two trained checkpoints", "",
              "Accuracy: the midpoint merge (weights 1/2, 1/2) on the whole test set of the "
              "dataset, one shared head.", ""]  # fmt: skip
    lines += md_table(
        ["pair (sha256)", "endpoints %", "renorm", "start", "objective (per order seed)",
         "sweeps", "merged % (per order seed)", "mean merged %"],
        [[f"{r['pair'][0]} ({r['sha256'][0]}) + {r['pair'][1]} ({r['sha256'][1]})",
          " / ".join(f"{100 * v:.2f}" for v in r["endpoint_accuracy"]), r["renorm"] or "none",
          s, ", ".join(f"{v:.2f}" for v in r[s]["objective"]),
          ", ".join(map(str, r[s]["sweeps"])),
          ", ".join(f"{100 * v:.2f}" for v in r[s]["accuracy"]),
          f"{100 * _mean(r[s]['accuracy']):.2f}"] for r in pairs for s in STARTS],
    )  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=5, help="order seeds per model")
    parser.add_argument("--checkpoints", default=os.environ.get("SYMMERGE_CHECKPOINTS"),
                        help="a folder of trained symmerge checkpoints")  # fmt: skip
    parser.add_argument("--pair", nargs=2, action="append", metavar=("A", "B"),
                        help="two trained checkpoints to match (repeatable; replaces the "
                        "default pairs from --checkpoints)")  # fmt: skip
    parser.add_argument("--reset-images", type=int, default=5000,
                        help="training images that reset a merged model's BatchNorm")  # fmt: skip
    parser.add_argument("--data-root", default=os.environ.get("SYMMERGE_DATA"))
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    folder = Path(args.checkpoints) if args.checkpoints else None
    trained = sorted(folder.glob("*.safetensors")) if folder is not None else []
    pairs = [tuple(map(Path, p)) for p in args.pair] if args.pair else _default_pairs(folder)
    source = "none" if folder is None else f"every *.safetensors in {args.checkpoints}"
    seeds = {"init": "model index i", "permutation": "i + 1", "orders": "0..K-1"}
    meta = provenance(seeds, {"trained_checkpoints": portable(source)})  # the code run
    copies = permuted_copies(args.orders, trained)
    matched = trained_pairs(pairs, args.orders, args.data_root, args.reset_images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "permuted_copies": copies, "trained_pairs": matched}
    (out / "matching_start.json").write_text(json.dumps(doc, indent=1))
    (out / "matching_start.md").write_text(_markdown(meta, copies, matched))


if __name__ == "__main__":
    main()
