"""The demo behind ``symmerge demo``: merging models of different datasets needs data.

An MLP trained on MNIST and one trained on Fashion-MNIST are merged into one model with a
shared 10-way head and tested on both test sets without a task id: without data, with 2000
train images of each dataset, and with a 200-image coreset (STE, beside naive averaging +
REPAIR on the same coreset, the baseline to beat). Yamada et al. (arXiv 2306.05641) find
that such merges need data and that a small stand-in set is enough; the demo measures it
on two CPU cores in minutes. Three MNIST MLPs are then merged at once (MergeMany, C2M3).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from symmerge.tables import format_table, pct

__all__ = [
    "DEMO_CORESET",
    "DEMO_DATASETS",
    "DEMO_DEPTH",
    "DEMO_EPOCHS",
    "DEMO_MANY",
    "DEMO_MERGES",
    "DEMO_SAMPLES",
    "DEMO_STE",
    "DEMO_WIDTH",
    "headline",
    "run_demo",
]

#: The demo's default MLP: 784-512-512-512-10 (Git Re-Basin's MNIST MLP) for 2 epochs.
DEMO_WIDTH = 512
DEMO_DEPTH = 3
DEMO_EPOCHS = 2
DEMO_DATASETS = ("mnist", "fashion-mnist")

#: Data of the demo's data-based merges: ``sample`` = DEMO_SAMPLES train images of each
#: dataset; ``coreset`` = DEMO_CORESET, 10 random train images per class of each dataset
#: (200 images), the small stand-in set Yamada et al. merge models of different datasets with.
DEMO_SAMPLES = 2000
DEMO_CORESET = "coreset:random:10"
#: STE on the coreset: steps and learning rate of the proxy (SGD, momentum 0.9).
DEMO_STE = {"steps": 300, "lr": 0.5}

#: (label, method, renorm, data) merges the demo shows: without data, on the sample, on the
#: coreset (naive averaging + REPAIR is the baseline each data-based merge should beat)
DEMO_MERGES = (
    ("naive average", "naive", None, None),
    ("weight matching (no data)", "weight", None, None),
    ("naive average + REPAIR", "naive", "repair", "sample"),
    ("activation matching", "activation", None, "sample"),
    ("weight matching + REPAIR", "weight", "repair", "sample"),
    ("activation matching + REPAIR", "activation", "repair", "sample"),
    ("naive average + REPAIR on the 200-image coreset", "naive", "repair", "coreset"),
    ("STE on a 200-image coreset", "ste", None, "coreset"),
    ("STE on a 200-image coreset + REPAIR", "ste", "repair", "coreset"),
)

#: (label, method, renorm) of the N-model part of the demo
DEMO_MANY = (
    ("naive average", "naive", None),
    ("MergeMany", "mergemany", None),
    ("MergeMany + REPAIR", "mergemany", "repair"),
    ("C2M3", "c2m3", None),
    ("C2M3 + REPAIR", "c2m3", "repair"),
)

_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}

Echo = Callable[[str], object]


def run_demo(
    data_root: str | Path | None = None,
    epochs: int = DEMO_EPOCHS,
    width: int = DEMO_WIDTH,
    out_dir: str | Path = "runs/demo",
    seed: int = 0,
    device: str | None = None,
    limit_train: int | None = None,
    progress: bool = True,
    echo: Echo = print,
) -> dict[str, Any]:
    """Train the demo's MLPs, merge them, evaluate everything; print tables through ``echo``.

    Four MLPs (``width`` units in each of DEMO_DEPTH hidden layers) are trained for
    ``epochs`` epochs: on MNIST (seed ``seed``), Fashion-MNIST (``seed + 1``) and MNIST again
    (``seed + 2``, ``seed + 3``), or reused from ``out_dir`` when it holds checkpoints of the
    same settings; otherwise a fresh ``<out_dir>-N`` is used (nothing is overwritten). The
    MNIST and Fashion-MNIST models are merged as listed in DEMO_MERGES and every merge is
    tested on both test sets; the three MNIST models are merged as listed in DEMO_MANY.

    Returns the payload also written to ``results.json`` in the checkpoint folder:
    ``test_accuracy`` (per model or ``"merged: <label>"``, per test set), ``cross_dataset``
    (the numbers of :func:`headline`), ``three_mnist_models``, ``settings``, ``merge_data``
    and ``checkpoints`` (the folder).

    Raises:
        ValueError: training or merge data cannot be loaded (e.g. a missing dataset), with
            the dataset named; FileNotFoundError from the loaders is reported the same way.
    """
    from symmerge.io import load_checkpoint, save_checkpoint
    from symmerge.models import format_model_name
    from symmerge.train import evaluate, resolve_config, resolve_device, train_model

    root = None if data_root is None else str(data_root)
    dev = resolve_device(device)
    # run name -> dataset; different seeds: independently initialised models, as in the
    # merging literature. The extra MNIST runs are for the N-model merge (C2M3).
    runs = {**{ds: ds for ds in DEMO_DATASETS}, **{f"mnist-{k}": "mnist" for k in (2, 3)}}
    configs = {
        r: resolve_config("mlp", ds, width=width, depth=DEMO_DEPTH) for r, ds in runs.items()
    }
    seeds = {r: seed + k for k, r in enumerate(runs)}
    wanted = {r: _settings(configs[r], epochs, seeds[r], limit_train) for r in runs}
    folder, note = _output_dir(Path(out_dir), wanted)
    echo(note)

    models = {}
    for run, ds in runs.items():
        path = folder / f"{run}.safetensors"
        if path.exists():
            models[run], _ = load_checkpoint(path, device=dev)
            echo(f"  {run}: reused {path}")
            continue
        try:
            net, info = train_model(
                configs[run],
                ds,
                epochs=epochs,
                seed=seeds[run],
                device=dev,
                data_root=root,
                progress=progress,
                limit_train=limit_train,
            )
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"training on {ds}: {exc}") from exc
        info["model_name"] = format_model_name("mlp", configs[run]["kwargs"])
        save_checkpoint(path, net, configs[run], info)
        models[run] = net
        echo(
            f"  {run}: test accuracy {pct(info['test_accuracy'])} after {epochs} epochs "
            f"({info['train_time_s']:.1f} s) -> {path}"
        )

    results: dict[str, dict[str, float]] = {}
    for ds_model in DEMO_DATASETS:
        net = models[ds_model]
        results[ds_model] = {
            ds: evaluate(net, ds, "test", data_root=root, device=dev)["accuracy"]
            for ds in DEMO_DATASETS
        }
    headers = ["model", *(f"{_NAMES[ds]} test" for ds in DEMO_DATASETS), "mean"]
    rows = []
    for ds_model, accs in results.items():
        mean = sum(accs.values()) / len(accs)
        rows.append(
            [
                f"MLP trained on {_NAMES[ds_model]}",
                *(pct(accs[ds]) for ds in DEMO_DATASETS),
                pct(mean),
            ]
        )
    merged_rows, merged_results = _cross_dataset_merges(
        [models[ds] for ds in DEMO_DATASETS], root, seed, limit_train, dev
    )
    results.update(merged_results)
    rows += merged_rows
    kw = configs[DEMO_DATASETS[0]]["kwargs"]
    layout = [math.prod(kw["input_shape"]), *[width] * DEMO_DEPTH, kw["num_classes"]]
    echo("")
    echo(
        f"MLP {'-'.join(map(str, layout))}, {epochs} epochs, seeds {seed} and {seed + 1}; "
        "test accuracy of "
        "each model, and of their merges (shared 10-way head, no task id):"
    )
    echo(format_table(headers, rows))
    text, summary = headline(merged_results)
    echo("")
    echo(text)
    many_rows, many = _many_merges([models[r] for r in runs if runs[r] == "mnist"], root,
                                   seed, limit_train, dev)  # fmt: skip
    echo("")
    echo(
        f"Three MNIST MLPs (seeds {seed}, {seed + 2}, {seed + 3}) merged at once: MNIST test "
        "accuracy, and the matching objective (summed pairwise weight overlap, higher = more "
        "aligned):"
    )
    echo(format_table(["model", "MNIST test", "objective", "match s"], many_rows))
    payload = {
        "test_accuracy": results,
        "cross_dataset": summary,
        "three_mnist_models": many,
        "settings": wanted,
        "merge_data": {"per_dataset": DEMO_SAMPLES, "coreset": DEMO_CORESET, "ste": DEMO_STE},
        "checkpoints": str(folder),
    }
    (folder / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    echo(f"results written to {folder / 'results.json'}")
    return payload


def _settings(config: dict, epochs: int, seed: int, limit: int | None) -> dict[str, Any]:
    """What a checkpoint's metadata must say for the demo to reuse it."""
    return {"config": config, "epochs": epochs, "seed": seed, "limit_train": limit}


def _output_dir(base: Path, wanted: dict[str, dict[str, Any]]) -> tuple[Path, str]:
    """Pick an output folder without clobbering: reuse one whose checkpoints match, else a
    fresh ``<base>-N``. Returns the folder and a sentence saying what was chosen."""
    from symmerge.io import CheckpointError, read_checkpoint_metadata

    def state(folder: Path) -> str:
        present = [folder / f"{ds}.safetensors" for ds in wanted]
        present = [p for p in present if p.exists()]
        if not present:
            return "empty"
        for p in present:
            try:
                meta = read_checkpoint_metadata(p)
            except (CheckpointError, OSError):
                return "different"
            settings = wanted[p.name.removesuffix(".safetensors")]
            if any(meta.get(k) != v for k, v in settings.items()):
                return "different"
        return "match"

    n = 1
    folder = base
    while True:
        s = state(folder)
        if s == "empty":
            note = "" if folder == base else f" ({base} holds a different demo run)"
            return folder, f"writing checkpoints to {folder}{note}"
        if s == "match":
            return folder, f"reusing matching checkpoints in {folder} (delete them to retrain)"
        n += 1
        folder = base.with_name(f"{base.name}-{n}")


def _batches(
    spec: str, root: str | None, samples: int, seed: int, datasets: Sequence[str] = ()
) -> list[tuple[Any, Any]]:
    """Merge data (batches of 500) from :func:`symmerge.sources.data_source_batches`."""
    from symmerge.sources import data_source_batches

    return data_source_batches(spec, 500, root=root, samples=samples, seed=seed,
                               datasets=datasets)  # fmt: skip


def _cross_dataset_merges(
    models: list[Any], root: str | None, seed: int, limit: int | None, dev: Any
) -> tuple[list[list[Any]], dict[str, dict[str, float]]]:
    """Merge the MNIST and Fashion-MNIST models as DEMO_MERGES lists: without data, with
    DEMO_SAMPLES train images of each dataset, and with a 10-per-class coreset of each (the
    same data for REPAIR); every merge is evaluated on both test sets."""
    import copy

    import torch

    from symmerge.merging import merge
    from symmerge.renorm import repair
    from symmerge.spec import trace
    from symmerge.train import evaluate

    cpu = [m.to("cpu") for m in models]
    n = min(DEMO_SAMPLES, limit or DEMO_SAMPLES)
    data = {
        "sample": _batches(",".join(DEMO_DATASETS), root, n, seed),
        "coreset": _batches(DEMO_CORESET, root, n, seed, datasets=DEMO_DATASETS),
    }
    spec = trace(cpu[0], (torch.randn(2, *cpu[0].input_shape),))
    rows, results = [], {}
    done: dict[tuple[str, str | None], tuple[Any, Any]] = {}
    for label, method, renorm, source in DEMO_MERGES:
        batches = data[source] if source else None
        kwargs = dict(DEMO_STE) if method == "ste" else {}
        if renorm == "repair" and (method, source) in done:  # REPAIR the merge just made
            merged, result = done[(method, source)]
            merged = copy.deepcopy(merged)
            aligned = [spec.permuted(m, result.perms(k)) for k, m in enumerate(cpu)]
            repair(merged, aligned, batches, spec=spec)
        else:
            merged, result = merge(
                cpu, method, data=batches, renorm=renorm, seed=seed, spec=spec, **kwargs
            )
            done[(method, source)] = (merged, result)
        accs = {ds: evaluate(merged, ds, "test", data_root=root, device=dev)["accuracy"]
                for ds in DEMO_DATASETS}  # fmt: skip
        mean = sum(accs.values()) / len(accs)
        rows.append([f"merged: {label}", *(pct(accs[ds]) for ds in DEMO_DATASETS), pct(mean)])
        results[f"merged: {label}"] = accs
    return rows, results


def headline(results: dict[str, dict[str, float]]) -> tuple[str, dict[str, float]]:
    """The sentence the cross-dataset part ends with, and its numbers: the data-free merge
    (weight matching) against STE and naive averaging + REPAIR on the same 200-image coreset.

    ``results`` maps ``"merged: <label>"`` (DEMO_MERGES) to accuracy per test set.
    """

    def mean(key: tuple[str, str | None, str | None]) -> float:
        accs = results[f"merged: {label[key]}"]
        return sum(accs.values()) / len(accs)

    label = {(m[1], m[2], m[3]): m[0] for m in DEMO_MERGES}
    without = mean(("weight", None, None))
    ste = mean(("ste", None, "coreset"))
    naive = mean(("naive", "repair", "coreset"))
    gain, naive_gain = 100 * (ste - without), 100 * (naive - without)
    text = (
        "Cross-dataset merge, mean of the two test accuracies: without data (weight matching) "
        f"{pct(without)}; with 200 images (10 random train images per class of each dataset) "
        f"STE {pct(ste)}, {gain:+.1f} points, and naive averaging + REPAIR on the same images "
        f"{pct(naive)}, {naive_gain:+.1f} points. Yamada et al. (arXiv 2306.05641) report "
        "+25 points with a condensed set and +28 with the full datasets (100-epoch models)."
    )
    summary = {
        "weight_no_data": without,
        "ste_coreset": ste,
        "gain_points": gain,
        "naive_repair_sample": mean(("naive", "repair", "sample")),
        "naive_repair_coreset": naive,
        "naive_repair_coreset_gain_points": naive_gain,
    }
    return text, summary


def _many_merges(
    models: list[Any], root: str | None, seed: int, limit: int | None, dev: Any
) -> tuple[list[list[Any]], dict[str, dict[str, float]]]:
    """Merge three MNIST models at once with MergeMany and C2M3 (REPAIR on DEMO_SAMPLES
    MNIST train images), evaluated on the MNIST test set."""
    import torch

    from symmerge.merging import merge
    from symmerge.solvers import universe_objective
    from symmerge.spec import trace
    from symmerge.train import evaluate

    cpu = [m.to("cpu") for m in models]
    data = _batches("mnist", root, min(DEMO_SAMPLES, limit or DEMO_SAMPLES), seed)
    spec = trace(cpu[0], (torch.randn(2, *cpu[0].input_shape),))
    sds = [m.state_dict() for m in cpu]
    rows, out = [], {}
    for k, m in enumerate(cpu):
        acc = evaluate(m, "mnist", "test", data_root=root, device=dev)["accuracy"]
        rows.append([f"MNIST MLP {k + 1}", pct(acc), "", ""])
    for label, method, renorm in DEMO_MANY:
        merged, res = merge(cpu, method, data=data if renorm else None, renorm=renorm,
                            seed=seed, spec=spec)  # fmt: skip
        acc = evaluate(merged, "mnist", "test", data_root=root, device=dev)["accuracy"]
        objective = universe_objective(spec, sds, [res.perms(k) for k in range(len(cpu))])
        rows.append([f"merged: {label}", pct(acc), f"{objective:.1f}", f"{res.seconds:.1f}"])
        out[label] = {"accuracy": acc, "objective": objective, "match_seconds": res.seconds}
    return rows, out
