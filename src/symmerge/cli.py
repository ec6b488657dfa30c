"""Command-line interface: ``symmerge train | eval | demo``.

Commands share option decorators (``data_root_option``, ``dataset_option``, ...) and the
table formatter so new subcommands (e.g. ``check-symmetry``) stay consistent: add a
function decorated with ``@main.command()`` and reuse them. Heavy imports (torch, models)
happen inside commands so ``symmerge --help`` stays fast.
"""

from __future__ import annotations

import functools
import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from symmerge import __version__
from symmerge.demo import DEMO_EPOCHS, DEMO_WIDTH
from symmerge.tables import format_table
from symmerge.tables import pct as _pct

__all__ = [
    "ALL_CLASSES",
    "ClassSpec",
    "classes_option",
    "data_root_option",
    "dataset_option",
    "device_option",
    "format_table",
    "main",
    "parse_class_spec",
    "preprocessing_options",
]

#: What ``--classes all`` converts to, distinct from "option not given" (``None``).
ALL_CLASSES = "all"


# --------------------------------------------------------------------------------------
# shared parsing helpers and option decorators
# --------------------------------------------------------------------------------------


def parse_class_spec(spec: str | None) -> list[int] | None:
    """Parse ``"0-4"``, ``"5-9"``, ``"0,2,4"``, ``"0-2,7"`` or ``"all"`` into sorted labels.

    ``"all"``, an empty string and ``None`` mean every class (``None``). Raises
    ``ValueError`` with a readable message for anything else.
    """
    if spec is None:
        return None
    text = spec.strip().lower()
    if text in ("", "all", "*"):
        return None
    labels: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"empty item in class spec {spec!r}")
        lo_text, dash, hi_text = part.partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if dash else lo
        except ValueError:
            raise ValueError(
                f"bad class spec item {part!r} in {spec!r}; use e.g. '0-4', '5-9', '0,2,4' or 'all'"
            ) from None
        if lo < 0 or hi < lo:
            raise ValueError(f"bad class range {part!r} in {spec!r}: need 0 <= start <= end")
        labels.update(range(lo, hi + 1))
    return sorted(labels)


class ClassSpec(click.ParamType):
    """Click type for class specs; converts to ``list[int]`` or :data:`ALL_CLASSES`."""

    name = "CLASSES"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or isinstance(value, list) or value == ALL_CLASSES:
            return value
        try:
            parsed = parse_class_spec(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return ALL_CLASSES if parsed is None else parsed


def _classes_arg(value: list[int] | str | None) -> list[int] | None:
    return None if value in (None, ALL_CLASSES) else list(value)  # type: ignore[arg-type]


def _describe_classes(classes: Sequence[int] | None) -> str:
    if not classes:
        return "all"
    classes = list(classes)
    if classes == list(range(classes[0], classes[-1] + 1)) and len(classes) > 2:
        return f"{classes[0]}-{classes[-1]}"
    return ",".join(str(c) for c in classes)


def _dataset_info(name: str, param_hint: str = "--dataset") -> dict[str, Any]:
    """Dataset description, or a usage error that says which names exist."""
    from symmerge import data

    try:
        return data.dataset_info(name)
    except (KeyError, ValueError) as exc:
        message = exc.args[0] if exc.args else str(exc)
        raise click.BadParameter(str(message), param_hint=param_hint) from None


def _validate_dataset(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(_validate_dataset(ctx, param, v) for v in value)
    _dataset_info(value)
    return value


def _check_classes(classes: Sequence[int] | None, dataset: str) -> None:
    if classes is None:
        return
    n = int(_dataset_info(dataset)["num_classes"])
    bad = [c for c in classes if c >= n]
    if bad:
        raise click.BadParameter(
            f"{dataset} has classes 0-{n - 1}; got {', '.join(map(str, bad))}",
            param_hint="--classes",
        )


def _validate_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    import torch

    try:
        dev = torch.device(value)
    except RuntimeError as exc:
        raise click.BadParameter(f"{value!r} is not a torch device: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA was requested but no CUDA device is available")
    return value


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def data_root_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--data-root`` (env ``SYMMERGE_DATA``): where datasets are read or downloaded."""
    return click.option(
        "--data-root",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="SYMMERGE_DATA",
        show_envvar=True,
        default=None,
        help="Dataset folder (default: ~/.cache/symmerge/data).",
    )(fn)


def dataset_option(*, required: bool = True, multiple: bool = False) -> Decorator:
    """``--dataset/-d NAME``, validated against :func:`symmerge.data.dataset_info`."""
    return click.option(
        "--dataset",
        "-d",
        "datasets" if multiple else "dataset",
        required=required,
        multiple=multiple,
        callback=_validate_dataset,
        help="Dataset name, e.g. mnist, fashion-mnist, cifar10."
        + (" Repeat to evaluate on several." if multiple else ""),
    )


def classes_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--classes SPEC``: class subset such as 0-4, 5-9, 0,2,4 or all."""
    return click.option(
        "--classes",
        type=ClassSpec(),
        default=None,
        help="Class subset: 0-4, 5-9, 0,2,4 or all (labels keep their original values).",
    )(fn)


def device_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--device``: torch device; default CUDA when available, else CPU."""
    return click.option(
        "--device",
        default=None,
        callback=_validate_device,
        help="Torch device (cpu, cuda, cuda:1); default: cuda if available, else cpu.",
    )(fn)


#: Prefixes of model references that name an architecture (:mod:`symmerge.resolve`).
REFERENCE_PREFIXES = ("timm:", "torchvision:", "module:", "hf:")

#: The model forms the commands that load models accept (help texts).
MODEL_HELP = (
    "MODEL is a symmerge checkpoint, timm:NAME=FILE, torchvision:NAME=FILE, "
    "module:package.module:factory=FILE (FILE: a state dict, safetensors or weights-only "
    ".pt/.pth), hf:DIRECTORY (a save_pretrained directory) or a whole module saved with "
    "torch.save (only with --trust-pickle)."
)


class ModelRef(click.ParamType):
    """A model reference: a prefixed form (checked when loaded) or an existing file.

    Cheap on purpose (no torch import) so ``--help`` stays fast; a missing file is a usage
    error here, as ``click.Path(exists=True)`` made it."""

    name = "MODEL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        text = str(value)
        if text.startswith(REFERENCE_PREFIXES):
            return text
        path = Path(text).expanduser()
        if not path.exists():
            self.fail(f"Path {text!r} does not exist. {MODEL_HELP}", param, ctx)
        if path.is_dir():
            self.fail(f"{text!r} is a directory; a save_pretrained directory is hf:{text}",
                      param, ctx)  # fmt: skip
        return text


def trust_pickle_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--trust-pickle``: allow unpickling (runs code from the file), never by default."""
    return click.option(
        "--trust-pickle",
        is_flag=True,
        help="Also load .pt/.pth files that hold pickled Python objects (a whole module "
        "saved with torch.save). Unpickling runs code from the file: use it only for files "
        "you trust; a state dict with a named architecture needs no such trust.",
    )(fn)


def input_shape_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--input-shape C,H,W``: example input for tracing models that do not record one."""
    return click.option(
        "--input-shape",
        default=None,
        help="Example input shape C,H,W (no batch) for models that do not record one "
        "(a module: reference, a pickled module; torchvision: default 3,224,224).",
    )(fn)


def _numbers(kind: type, counts: tuple[int, ...]) -> Callable[..., Any]:
    """A click callback: ``"a,b,..."`` -> a tuple of ``kind`` with one of ``counts`` values."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        try:
            out = tuple(kind(v) for v in value.split(","))
        except ValueError:
            out = ()
        if len(out) not in counts:
            wanted = " or ".join(map(str, counts))
            raise click.BadParameter(f"give {wanted} comma-separated {kind.__name__}s, not "
                                     f"{value!r}")  # fmt: skip
        return out

    return parse


def preprocessing_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--image-size``, ``--mean``, ``--std``, ``--max-length``: how ``imagefolder:`` and
    ``text:`` data are preprocessed where the model's own recipe is not wanted. The command
    gets them as one ``preprocessing`` (:class:`symmerge.realdata.Preprocessing`)."""

    @functools.wraps(fn)
    def command(*args: Any, image_size: Any, mean: Any, std: Any, max_length: int,
                **kwargs: Any) -> Any:  # fmt: skip
        from symmerge.realdata import Preprocessing

        size = None if image_size is None else (image_size[0], image_size[-1])
        try:
            prep = Preprocessing(image_size=size, mean=mean, std=std, max_length=max_length)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="'--mean' / '--std'") from None
        return fn(*args, preprocessing=prep, **kwargs)

    for option in reversed([
        click.option("--image-size", callback=_numbers(int, (1, 2)), metavar="H[,W]",
                     help="imagefolder: images resized and centre-cropped to H x W "
                     "(default: the model's own preprocessing)."),
        click.option("--mean", callback=_numbers(float, (1, 3)), metavar="A,B,C",
                     help="imagefolder: per-channel mean to normalise with (default: "
                     "the model's)."),
        click.option("--std", callback=_numbers(float, (1, 3)), metavar="A,B,C",
                     help="imagefolder: per-channel std to normalise with (default: the "
                     "model's)."),
        click.option("--max-length", type=click.IntRange(min=1), default=128,
                     show_default=True, help="text: tokens per line (truncated or padded)."),
    ]):  # fmt: skip
        command = option(command)
    return command


# --------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="symmerge")
def main() -> None:
    """symmerge: merge independently trained networks through permutation symmetry."""


@main.command()
@click.argument("model")
@dataset_option()
@classes_option
@click.option("--seed", type=int, default=0, show_default=True, help="Init/shuffle seed.")
@click.option(
    "--split",
    "split_kind",
    type=click.Choice(["iid", "dirichlet", "shards"]),
    default=None,
    help="Train on one part of a split of the training set (needs --part): iid = equal random "
    "parts; dirichlet = per-class Dir proportions; shards = disjoint whole classes.",
)
@click.option(
    "--part",
    "part_spec",
    metavar="K/N",
    default=None,
    help="Which part: K of N, K counted from 1 (e.g. 1/2 and 2/2 for two parents).",
)
@click.option(
    "--alpha",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Dirichlet concentration of every part. Default: linspace(1, 5, N) shuffled per class.",
)
@click.option(
    "--split-seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the split; keep it the same for all N parts so they are disjoint.",
)
@click.option(
    "--epochs", type=click.IntRange(min=0), default=None, help="Default: the arch's recipe."
)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Peak LR.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@data_root_option
@device_option
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Checkpoint path (.safetensors); metadata also goes to <path>.json.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint.")
@click.option("--limit-train", type=click.IntRange(min=1), default=None, hidden=True)
@click.option("--limit-test", type=click.IntRange(min=1), default=None, hidden=True)
@click.option("--progress/--no-progress", default=True, help="Per-epoch progress bars.")
def train(
    model: str,
    dataset: str,
    classes: list[int] | str | None,
    seed: int,
    split_kind: str | None,
    part_spec: str | None,
    alpha: float | None,
    split_seed: int,
    epochs: int | None,
    lr: float | None,
    batch_size: int | None,
    data_root: Path | None,
    device: str | None,
    output: Path,
    overwrite: bool,
    limit_train: int | None,
    limit_test: int | None,
    progress: bool,
) -> None:
    """Train MODEL (e.g. mlp, mlp-w256-d4, vgg11, resnet20x4-ln) on a dataset and save a
    checkpoint.

    With --split KIND --part K/N, train one of N parents on part K of a seeded split of the
    training set (of --classes, if given), e.g. for neuron-interpolation fusion. The
    metadata records the split and the part's per-class training counts (class_counts).
    """
    from symmerge.data import parse_part, validate_split
    from symmerge.io import save_checkpoint, sidecar_path
    from symmerge.train import resolve_config, train_model

    class_list = _classes_arg(classes)
    _check_classes(class_list, dataset)
    part = n_parts = None
    ctx = click.get_current_context()
    if split_kind is None:
        split_options = {"--part": "part_spec", "--alpha": "alpha", "--split-seed": "split_seed"}
        given = [
            flag
            for flag, name in split_options.items()
            if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT
        ]
        if given:
            raise click.UsageError(f"{', '.join(given)} given without --split iid|dirichlet|shards")
    else:
        if part_spec is None:
            raise click.UsageError(f"--split {split_kind} needs --part K/N (e.g. --part 1/2)")
        try:
            part, n_parts = parse_part(part_spec)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--part") from None
        try:
            validate_split(split_kind, n_parts, part, alpha)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        n_classes = len(class_list) if class_list else int(_dataset_info(dataset)["num_classes"])
        if split_kind == "shards" and n_parts > n_classes:
            raise click.BadParameter(
                f"{n_parts} shards of whole classes need at least {n_parts} classes; "
                f"there are {n_classes}",
                param_hint="--part",
            )
    _check_checkpoint_name(output)
    if not overwrite:
        for p in (output, sidecar_path(output)):
            if p.exists():
                raise click.BadParameter(
                    f"{p} already exists; pass --overwrite to replace it",
                    param_hint="'-o' / '--output'",
                )
    try:
        config = resolve_config(model, dataset)
    except (KeyError, ValueError, TypeError) as exc:
        message = exc.args[0] if exc.args else str(exc)
        raise click.BadParameter(str(message), param_hint="MODEL") from None
    try:
        net, info = train_model(
            config,
            dataset,
            classes=class_list,
            epochs=epochs,
            seed=seed,
            lr=lr,
            batch_size=batch_size,
            device=device,
            data_root=None if data_root is None else str(data_root),
            progress=progress,
            limit_train=limit_train,
            limit_test=limit_test,
            split=split_kind,
            part=part,
            n_parts=n_parts,
            split_seed=split_seed,
            alpha=alpha,
        )
    except (ValueError, FloatingPointError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    info["model_name"] = model
    save_checkpoint(output, net, config, info, overwrite=overwrite)
    where = f"classes {_describe_classes(class_list)}"
    if split_kind is not None:
        where += f", {split_kind} part {part}/{n_parts} (split seed {split_seed})"
    click.echo(
        f"saved {output}: {model} on {dataset} ({where}), n_train {info['n_train']}, "
        f"seed {seed}, {info['epochs']} epochs, test accuracy {_pct(info['test_accuracy'])} "
        f"(n={info['n_test']}), trained in {info['train_time_s']:.1f} s on {info['device']}"
    )


@main.command("eval")
@click.argument("checkpoint", type=ModelRef())
@dataset_option(required=False, multiple=True)
@classes_option
@click.option(
    "--task",
    "task_specs",
    type=ClassSpec(),
    multiple=True,
    help="One task's classes, e.g. --task 0-4 --task 5-9: per-task and joint accuracy. "
    "Default: the tasks a merged checkpoint records.",
)
@data_root_option
@device_option
@click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--split", default="test", show_default=True, help="Dataset split.")
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    default=None,
    help="Also write results as JSON to this file ('-' for stdout).",
)
@click.option(
    "--probe",
    "probe_steps",
    type=click.IntRange(min=1),
    default=None,
    metavar="STEPS",
    help="Also fit a linear probe per task on the features feeding the final Linear "
    "(seeded L-BFGS for STEPS iterations on the training split) and report its accuracy and "
    "fit time.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the probe.")
@click.option(
    "--data",
    "data_spec",
    default=None,
    help="Your own labelled examples instead of a named dataset: imagefolder:DIR (a folder per "
    "class, preprocessed as merge's --data preprocesses it) or text:FILE (LABEL<TAB>text lines).",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, hidden=True)
@trust_pickle_option
def eval_(
    checkpoint: str,
    datasets: tuple[str, ...],
    classes: list[int] | str | None,
    task_specs: tuple[list[int] | str, ...],
    data_root: Path | None,
    device: str | None,
    batch_size: int,
    split: str,
    json_out: Path | None,
    probe_steps: int | None,
    seed: int,
    data_spec: str | None,
    limit: int | None,
    trust_pickle: bool,
) -> None:
    """Evaluate CHECKPOINT (a model reference: symmerge .safetensors, timm:NAME=FILE, ...).

    Without --dataset, the checkpoint's training dataset and class subset are used. With
    --task (or a checkpoint recording several tasks): per-task accuracy (argmax within the
    task's classes and logits) and joint accuracy (all tasks' classes compete, no task id).
    With --data: accuracy and loss on your own labelled examples.
    """
    from symmerge.resolve import load_model
    from symmerge.train import evaluate, resolve_device

    phases = _Phases()
    try:
        loaded = load_model(checkpoint, trust_pickle=trust_pickle)
    except (ValueError, OSError) as exc:  # CheckpointError is a ValueError
        raise click.ClickException(str(exc)) from None
    model, meta = loaded.model.to(resolve_device(device)), loaded.metadata
    phases.lap("load")
    trained_on = meta.get("dataset")
    if data_spec is not None:
        if datasets or task_specs or classes is not None or probe_steps is not None:
            raise click.UsageError("--data takes no --dataset, --classes, --task or --probe")
        if not data_spec.startswith(("imagefolder:", "text:")):
            raise click.BadParameter(
                "eval reads imagefolder:DIR or text:FILE; a named dataset is --dataset",
                param_hint="'--data'",
            )
    if not datasets and data_spec is None:
        if not trained_on:
            raise click.UsageError(
                f"{checkpoint} does not record a training dataset; pass --dataset"
            )
        datasets = (trained_on,)
    plan = None if data_spec is not None else _eval_task_plan(task_specs, classes, meta)
    results = []
    if data_spec is not None:
        results.append(_eval_on_data(model, data_spec, checkpoint, data_root, device, batch_size,
                                     limit))  # fmt: skip
    for name in datasets:
        name = str(_dataset_info(name)["name"])  # canonical spelling
        if plan is not None:
            results.append(
                _eval_tasks_on(model, name, plan, split, data_root, device, batch_size, limit)
            )
            continue
        if classes is not None:
            class_list = _classes_arg(classes)
        elif name == trained_on:
            class_list = meta.get("classes")  # default: the subset the model was trained on
        else:
            class_list = None
        _check_classes(class_list, name)
        try:
            res = evaluate(
                model,
                name,
                split=split,
                classes=class_list,
                data_root=None if data_root is None else str(data_root),
                device=device,
                batch_size=batch_size,
                limit=limit,
            )
        except (ValueError, KeyError, FileNotFoundError, RuntimeError) as exc:
            raise click.ClickException(f"evaluating on {name}: {exc}") from None
        results.append(res)
    phases.lap("evaluate")

    arch = meta.get("model_name") or meta.get("config", {}).get("arch") or type(model).__name__
    click.echo(f"checkpoint: {checkpoint} ({arch}; trained on {trained_on or 'unknown'})")
    click.echo(_eval_table(results) if plan is None else _task_table(results))
    probes = []
    if probe_steps is not None:
        sets = plan[0] if plan is not None else [meta.get("classes") or list(range(10))]
        for name in datasets:
            name = str(_dataset_info(name)["name"])
            probes.append(_probe(model, name, sets, probe_steps, seed, split, data_root,
                                 device, batch_size, limit))  # fmt: skip
    if json_out is not None:
        payload = {"checkpoint": str(checkpoint), "config": meta.get("config"), "results": results}
        if probes:
            payload["probes"] = probes
            phases.lap("probe")
        payload.update(phases.summary())
        text = json.dumps(payload, indent=2)
        if str(json_out) == "-":
            click.echo(text)
        else:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(text + "\n")
            click.echo(f"wrote {json_out}")


def _eval_on_data(
    model: Any, spec: str, reference: str, root: Path | None, device: str | None,
    batch_size: int, limit: int | None,
) -> dict[str, Any]:  # fmt: skip
    """``eval --data``: accuracy and loss on every example of a labelled ``imagefolder:`` or
    ``text:`` source, preprocessed for ``model`` as ``merge --data`` preprocesses it."""
    import torch

    from symmerge.train import evaluate

    batches = _data_batches(spec, root, sys.maxsize, batch_size, 0, models=[model],
                            reference=reference)  # fmt: skip
    assert batches is not None  # a spec was given
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    try:
        res = evaluate(model, (x, y), device=device, batch_size=batch_size, limit=limit)
    except (ValueError, RuntimeError, IndexError) as exc:
        raise click.ClickException(f"evaluating on {spec}: {exc}") from None
    return {**res, "dataset": spec, "split": "-"}


def _eval_table(results: Sequence[dict[str, Any]]) -> str:
    """``eval``'s table of :func:`symmerge.train.evaluate` results, one row per dataset."""
    has_subset = any("subset_accuracy" in r for r in results)
    headers = ["dataset", "classes", "split", "n", "accuracy", "loss"]
    if has_subset:
        headers.append("acc. within classes")
    rows = []
    for r in results:
        row = [
            r["dataset"],
            _describe_classes(r["classes"]),
            r["split"],
            r["n"],
            _pct(r["accuracy"]),
            r["loss"],
        ]
        if has_subset:
            row.append(_pct(r["subset_accuracy"]) if "subset_accuracy" in r else None)
        rows.append(row)
    return format_table(headers, rows)


#: What ``eval`` reports per task: the tasks' class sets, and their recorded tasks (logit
#: slices) on a multi-head checkpoint or ``None`` when every set reads the whole head.
TaskPlan = tuple[list[list[int]], list[dict[str, Any]] | None]


def _eval_task_plan(
    specs: Sequence[list[int] | str], classes: list[int] | str | None, meta: dict[str, Any]
) -> TaskPlan | None:
    """``eval``'s tasks from ``--task`` and the checkpoint's recorded ``tasks``, or ``None``
    for the per-dataset report. Usage errors here, before any data is read."""
    from symmerge.evaluate import check_tasks

    recorded = None
    if meta.get("tasks"):
        try:
            recorded = check_tasks(meta["tasks"])
        except ValueError as exc:
            raise click.ClickException(
                f"the checkpoint's recorded tasks are invalid: {exc}"
            ) from None
    multi_head = recorded is not None and len({tuple(t["logits"]) for t in recorded}) > 1
    if not specs:
        if classes is None and recorded is not None and len(recorded) > 1:
            return [t["classes"] for t in recorded], recorded  # what the merge recorded
        return None
    if classes is not None:
        raise click.UsageError("use either --classes or --task, not both")
    if ALL_CLASSES in specs:
        raise click.BadParameter("a task needs explicit classes such as 0-4", param_hint="--task")
    sets = [list(s) for s in specs]
    for i, a in enumerate(sets):
        for b in sets[:i]:
            shared = sorted(set(a) & set(b))
            if shared:
                raise click.BadParameter(
                    f"tasks {_describe_classes(b)} and {_describe_classes(a)} share classes "
                    f"{_describe_classes(shared)}; tasks must be disjoint",
                    param_hint="--task",
                )
    if not multi_head or recorded is None:
        return sets, None  # a single head: every task reads all of it
    by_classes = {tuple(t["classes"]): t for t in recorded}
    for s in sets:
        if tuple(s) not in by_classes:
            have = ", ".join(_describe_classes(t["classes"]) for t in recorded)
            raise click.BadParameter(
                f"{_describe_classes(s)} is not one of this multi-head checkpoint's tasks "
                f"({have}); each --task must name one of them",
                param_hint="--task",
            )
    return sets, [by_classes[tuple(s)] for s in sets]


def _eval_tasks_on(
    model: Any,
    name: str,
    plan: TaskPlan,
    split: str,
    data_root: Path | None,
    device: str | None,
    batch_size: int,
    limit: int | None,
) -> dict[str, Any]:
    """Per-task and joint accuracy on dataset ``name`` (click errors, never a traceback)."""
    from symmerge.evaluate import joint_accuracy, task_accuracy

    sets, tasks = plan
    n = int(_dataset_info(name)["num_classes"])
    bad = sorted({c for s in sets for c in s if c >= n})
    if bad:
        raise click.BadParameter(
            f"{name} has classes 0-{n - 1}; got {', '.join(map(str, bad))}", param_hint="--task"
        )
    kwargs: dict[str, Any] = {
        "split": split,
        "data_root": None if data_root is None else str(data_root),
        "device": device,
        "batch_size": batch_size,
        "limit": limit,
    }
    try:
        if tasks is None:
            return joint_accuracy(model, name, sets, **kwargs)
        return task_accuracy(model, name, tasks, **kwargs)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as exc:
        raise click.ClickException(f"evaluating on {name}: {exc}") from None


def _probe(
    model: Any, name: str, sets: Sequence[Sequence[int]], steps: int, seed: int, split: str,
    data_root: Path | None, device: str | None, batch_size: int, limit: int | None,
) -> dict[str, Any]:  # fmt: skip
    """``eval --probe``: a linear probe per task on ``name``, printed as a table."""
    from symmerge.evaluate import linear_probe

    try:
        res = linear_probe(
            model, name, [list(s) for s in sets], steps=steps, seed=seed, split=split,
            data_root=None if data_root is None else str(data_root), device=device,
            batch_size=batch_size, limit=limit, train_limit=None if limit is None else 4 * limit,
        )  # fmt: skip
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as exc:
        raise click.ClickException(f"probing on {name}: {exc}") from None
    rows = [
        [name, f"task {i}", _describe_classes(t["classes"]), t["train_n"], t["n"],
         _pct(t["train_accuracy"]), _pct(t["accuracy"])]
        for i, t in enumerate(res["tasks"])
    ]  # fmt: skip
    if len(res["tasks"]) > 1:
        rows.append([name, "joint", "", "", res["joint"]["n"], "", _pct(res["joint"]["accuracy"])])
    click.echo(
        f"\nlinear probe on the input of '{res['layer']}' ({res['feature_dim']} features, "
        f"{steps} L-BFGS steps, seed {seed}, fit {res['fit_time_s']:.2f} s):"
    )
    headers = ["dataset", "task", "classes", "train n", "n", "train acc.", "accuracy"]
    click.echo(format_table(headers, rows))
    return {"dataset": name, **res}


def _task_table(results: Sequence[dict[str, Any]]) -> str:
    """``eval``'s table with tasks: a row per task and a joint row per dataset."""
    headers = ["dataset", "task", "classes", "logits", "n", "accuracy", "loss"]
    rows: list[list[Any]] = []
    for r in results:
        for i, t in enumerate(r["tasks"]):
            start, stop = t["logits"]
            row = [r["dataset"], f"task {i}", _describe_classes(t["classes"]), f"{start}:{stop}"]
            rows.append([*row, t["n"], _pct(t["accuracy"]), t["loss"]])
        j = r["joint"]
        row = [r["dataset"], "joint", _describe_classes(j["classes"]), "all tasks", j["n"]]
        rows.append([*row, _pct(j["accuracy"]), j["loss"]])
        mean = _pct(r["mean_task_accuracy"])
        rows.append([r["dataset"], "mean of tasks", "", "", "", mean, None])
    return format_table(headers, rows)


# --------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------


@main.command()
@data_root_option
@click.option("--epochs", type=click.IntRange(min=0), default=DEMO_EPOCHS, show_default=True)
@click.option(
    "--width",
    type=click.IntRange(min=1),
    default=DEMO_WIDTH,
    show_default=True,
    help="Hidden units per layer of the MLPs.",
)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/demo"),
    show_default=True,
)
@click.option("--seed", type=int, default=0, show_default=True)
@device_option
@click.option("--limit-train", type=click.IntRange(min=1), default=None, hidden=True)
@click.option("--progress/--no-progress", default=True)
def demo(
    data_root: Path | None,
    epochs: int,
    width: int,
    out_dir: Path,
    seed: int,
    device: str | None,
    limit_train: int | None,
    progress: bool,
) -> None:
    """Train an MLP on MNIST and one on Fashion-MNIST, merge them, evaluate everything.

    The merges share one 10-way head and are tested on both test sets without a task id:
    naive averaging, weight matching (no data), naive averaging + REPAIR, activation
    matching and REPAIR (2000 train images of each dataset), and STE on a coreset of 10
    random train images per class of each dataset beside naive averaging + REPAIR on the
    same coreset (Yamada et al.: merging models of different datasets needs data, and a
    small stand-in set is enough). Then three MNIST MLPs are merged at once (MergeMany,
    C2M3). Takes about two minutes on two CPU cores with the defaults. Checkpoints are
    reused when the out-dir already holds a matching run, and never overwritten. The logic
    is symmerge.demo.run_demo.
    """
    from symmerge.demo import run_demo

    try:
        run_demo(
            data_root=data_root,
            epochs=epochs,
            width=width,
            out_dir=out_dir,
            seed=seed,
            device=device,
            limit_train=limit_train,
            progress=progress,
            echo=click.echo,
        )
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None


def _parse_shape(value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    try:
        shape = tuple(int(v) for v in value.replace("x", ",").split(","))
    except ValueError:
        raise click.BadParameter(f"expected C,H,W (e.g. 3,32,32), got {value!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise click.BadParameter(f"expected positive sizes, got {value!r}")
    return shape


@main.command("check-symmetry")
@click.argument("model")
@click.option("--seed", type=int, default=0, show_default=True, help="Permutation seed.")
@click.option("--show", is_flag=True, help="List every group, its members and frozen axes.")
@click.option("--input-shape", default=None, help="Example input shape C,H,W (no batch).")
@click.option(
    "--unknown-ops",
    type=click.Choice(["error", "freeze"]),
    default="error",
    show_default=True,
    help="What to do with an op that has no symmetry rule.",
)
@click.option(
    "--tol",
    type=click.FloatRange(min=0),
    default=1e-6,
    show_default=True,
    help="Pass when max |diff| <= tol * max(1, max |output|) (float64).",
)
@trust_pickle_option
def check_symmetry(
    model: str,
    seed: int,
    show: bool,
    input_shape: str | None,
    unknown_ops: str,
    tol: float,
    trust_pickle: bool,
) -> None:
    """Trace MODEL's permutation symmetry and verify it: a random permutation of every group
    must leave the outputs unchanged.

    MODEL is a zoo name (mlp, vgg11, vgg16, resnet20x4, resnet20x4-ln, resnet20x4-gn,
    resnet18), timm:NAME or torchvision:NAME (random init), hf:TYPE (small random init), a
    checkpoint path, or a model with its weights: timm:NAME=FILE, torchvision:NAME=FILE,
    module:package.module:factory=FILE, hf:DIRECTORY. Exit status 0 only when the function
    is preserved.
    """
    from symmerge.resolve import resolve_model
    from symmerge.spec import TraceError, trace

    try:
        resolved = resolve_model(
            model, input_shape=_parse_shape(input_shape), seed=seed, trust_pickle=trust_pickle
        )
    except (ValueError, FileNotFoundError) as e:
        raise click.UsageError(str(e)) from e
    net, inputs = resolved.model, resolved.example_inputs
    click.echo(f"model: {resolved.description}, input {tuple(inputs[0].shape)}")
    try:
        spec = trace(net, inputs, unknown_ops=unknown_ops)
    except TraceError as e:
        raise click.ClickException(str(e)) from e
    click.echo(spec.show(members=True) if show else spec.show(members=False).splitlines()[0])
    click.echo(f"groups: {len(spec.groups)}")
    result = spec.check(net, *inputs, seed=seed, tol=tol)
    click.echo(
        f"output scale (max |output|): {result.output_scale:.3e}; "
        f"{'function preserved' if result.ok else 'FUNCTION CHANGED'}"
    )
    click.echo(f"max |diff| = {result.max_abs_diff:.3e}")
    if not result.ok:
        raise SystemExit(1)


def _method_choice() -> click.Choice:
    from symmerge.methods import list_methods

    return click.Choice(list_methods())


def _check_method(method: str, num_models: int, data_spec: str | None) -> None:
    """Usage errors from the method's registered capabilities, before anything is loaded."""
    from symmerge.methods import list_methods, method_info

    info = method_info(method)
    if not info.accepts(num_models):
        able = [m for m in list_methods() if method_info(m).accepts(num_models)]
        raise click.UsageError(
            f"the '{method}' method merges at most {info.max_models} models, got {num_models}; "
            f"methods that merge {num_models}: {', '.join(able) or 'none'}"
        )
    if info.needs_data and data_spec is None:
        raise click.UsageError(
            f"the '{method}' method needs data: pass --data (e.g. --data mnist or "
            "--data coreset:random:10)"
        )


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


@main.command("methods")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def methods_cmd(as_json: bool) -> None:
    """List the registered merging methods: what each does and can do."""
    from symmerge.methods import list_methods, method_info

    infos = [method_info(name) for name in list_methods()]
    if as_json:
        click.echo(json.dumps([info.to_dict() for info in infos], indent=2))
        return
    headers = ["method", "needs data", "N>2 models", "unequal widths", "target width"]
    rows = [
        [i.name, _yes(i.needs_data), _yes(i.accepts(3)), _yes(i.unequal_widths),
         _yes(i.target_width)]
        for i in infos
    ]  # fmt: skip
    click.echo(format_table(headers, rows))
    for info in infos:
        click.echo(f"\n{info.name}: {info.summary}")
        reference = ", ".join(x for x in (info.paper, info.url) if x)
        if reference:
            click.echo(f"  {reference}")


def _load_models(
    refs: Sequence[str], *, trust_pickle: bool, input_shape: str | None = None, seed: int = 0
) -> tuple[list[Any], list[dict[str, Any]], tuple[Any, ...] | None]:
    """The models that ``refs`` name (:func:`symmerge.resolve.resolve_model`), their
    metadata, and example inputs for tracing when the first model records no input shape
    (token ids for Hugging Face text models; ``None`` keeps ``merge``'s own default)."""
    from symmerge.resolve import resolve_model

    shape = _parse_shape(input_shape)
    models, metas, inputs = [], [], None
    for k, ref in enumerate(refs):
        try:
            resolved = resolve_model(ref, input_shape=shape, seed=seed, trust_pickle=trust_pickle)
        except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
            raise click.BadParameter(str(e), param_hint="MODEL") from e
        if k == 0 and (shape or not hasattr(resolved.model, "input_shape")):
            inputs = resolved.example_inputs
        models.append(resolved.model)
        metas.append(resolved.metadata)
    return models, metas, inputs


def _short(ref: str) -> str:
    """A table label for a model reference: the file name, with its prefix if any."""
    head, eq, file = ref.partition("=")
    if ref.startswith(REFERENCE_PREFIXES):
        return f"{head}={Path(file).name}" if eq else ref
    return Path(ref).name


def _reference_files(refs: Sequence[str]) -> set[Path]:
    """The files ``refs`` read, resolved (an output must never replace one)."""
    from symmerge.resolve import reference_files

    try:
        return {f.resolve() for ref in refs for f in reference_files(ref)}
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="MODEL") from e


#: What ``--data`` accepts (the ``merge`` and ``interpolate`` help texts).
DATA_HELP = (
    "Data for data-based methods and REPAIR: comma-separated sources, concatenated. "
    "DATASET: its train split (e.g. mnist,fashion-mnist; --data-samples of each); "
    "condensed:FILE: every image of a set written by `symmerge condense`; "
    "coreset:random:K or coreset:herding:K: K images per class of each dataset the "
    "checkpoints were trained on (coreset:random:K:DATASET names one); "
    "noise:DATASET (or noise): --data-samples N(0,1) images in its normalised space, random "
    "labels (a floor; not for ste). Suffixes: SOURCE[CLASSES] keeps those classes "
    "(e.g. cifar10[8-9], cifar10[0,2,5-7]); SOURCE@TARGET converts the images to TARGET's "
    "input (greyscale or channel copies, resize, TARGET's mean/std), e.g. "
    "'cifar10[8-9]@mnist' for MNIST models. Quote such specs in a shell. "
    "For timm, torchvision and hf: models: imagefolder:DIR: a folder per class of PNG/JPEG "
    "images (--data-samples of them), preprocessed the first model's way (timm's data "
    "config, the hf:DIR image processor, or resize/crop with ImageNet mean/std; "
    "--image-size, --mean, --std override); text:FILE: a line per example, tokenised by the "
    "first model's hf:DIR tokenizer to --max-length tokens; LABEL<TAB>text gives a label, "
    "other lines get label 0 (a placeholder; not for ste). These take no suffixes."
)


def _data_batches(
    spec: str | None,
    root: Path | None,
    samples: int,
    batch_size: int,
    seed: int,
    *,
    models: Sequence[Any] = (),
    datasets: Sequence[str | None] = (),
    reference: str | None = None,
    preprocessing: Any = None,
) -> list[tuple[Any, Any]] | None:
    """``--data`` batches from :func:`symmerge.sources.data_source_batches` (``None`` when
    ``spec`` is None), checked against ``models[0]`` (whose ``reference`` and explicit
    ``preprocessing`` preprocess ``imagefolder:``/``text:`` data). A bad source is a usage
    error (``BadParameter``); dataset files that cannot be read are a ``ClickException``."""
    if spec is None:
        return None
    from symmerge.sources import DataSourceError, DataUnavailableError, data_source_batches

    try:
        model = models[0] if models else None
        return data_source_batches(
            spec, batch_size, root=root, samples=samples, seed=seed, datasets=datasets,
            model=model, reference=reference, preprocessing=preprocessing,
        )  # fmt: skip
    except DataUnavailableError as exc:
        raise click.ClickException(f"--data {exc.source}: {exc.reason}") from None
    except DataSourceError as exc:
        raise click.BadParameter(str(exc), param_hint="'--data'") from None


def _eval_targets(metas: Sequence[dict[str, Any]], datasets: Sequence[str]) -> list[tuple]:
    if datasets:
        return [(d, None) for d in datasets]
    seen: list[tuple] = []
    for meta in metas:
        key = (meta.get("dataset"), tuple(meta["classes"]) if meta.get("classes") else None)
        if key[0] and key not in seen:
            seen.append(key)
    if not seen:
        raise click.UsageError("the checkpoints do not say their dataset; pass --eval-dataset")
    return seen


def _eval_rows(
    named: Sequence[tuple[str, Any]], targets: Sequence[tuple], root: Path | None, limit: int | None
) -> tuple[list[str], list[list[Any]], dict[str, dict[str, Any]]]:
    from symmerge.train import evaluate

    headers = ["model", *(f"{d}" + (f" {_describe_classes(c)}" if c else "") for d, c in targets),
               "mean acc", "mean loss"]  # fmt: skip
    rows, results = [], {}
    for label, model in named:
        res = [evaluate(model, d, classes=list(c) if c else None, data_root=root, limit=limit)
               for d, c in targets]  # fmt: skip
        acc = sum(r["accuracy"] for r in res) / len(res)
        loss = sum(r["loss"] for r in res) / len(res)
        rows.append([label, *(_pct(r["accuracy"]) for r in res), _pct(acc), loss])
        results[label] = {"per_dataset": res, "mean_accuracy": acc, "mean_loss": loss}
    return headers, rows, results


def _merged_tasks(
    metas: Sequence[dict[str, Any]], models: Sequence[Any], heads: str
) -> list[dict[str, Any]]:
    """The label space of a merge: one task per source (its classes, or its own tasks when it
    is itself a merge) and where its logits are: the shared head, or its own slice."""
    tasks: list[dict[str, Any]] = []
    offset = 0
    for meta, model in zip(metas, models, strict=True):
        width = _num_outputs(model)
        own = meta.get("tasks") or [
            {"classes": meta.get("classes") or list(range(width)), "logits": [0, width]}
        ]
        for t in own:
            start, stop = t["logits"]
            shift = offset if heads == "per-task" else 0
            tasks.append({"classes": list(t["classes"]), "logits": [start + shift, stop + shift]})
        offset += width
    unique: list[dict[str, Any]] = []
    for t in tasks:  # sources trained on the same classes share one task on a shared head
        if t not in unique:
            unique.append(t)
    return unique


def _num_outputs(model: Any) -> int:
    """Output width of a classifier: its last Linear's out_features, or, for a fully
    convolutional one (a segmentation head), its last conv's out_channels."""
    import torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if linears:
        return int(linears[-1].out_features)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    if not convs:
        raise click.UsageError("cannot tell the number of outputs: the model has no Linear or conv")
    return int(convs[-1].out_channels)


def _class_counts(method: str, metas: Sequence[dict], given: dict[str, Any]) -> dict[str, Any]:
    """``class_counts`` from the checkpoints' metadata for a method that takes them (fusion
    weights each parent's logits by its share of every class), when every checkpoint has them
    and the user did not pass them."""
    import inspect

    from symmerge.methods import get_method

    takes = "class_counts" in inspect.signature(get_method(method)).parameters
    counts = [m.get("class_counts") for m in metas]
    if not takes or "class_counts" in given:
        return {}
    if any(c is None for c in counts):
        classes = [m.get("classes") for m in metas]
        if len({str(c) for c in classes}) > 1 and "head" not in given:
            raise click.UsageError(
                f"the parents were trained on different classes ({classes}) and not every "
                f"checkpoint records its per-class training counts (class_counts), which "
                f"{method} needs to weight each class's logits by the parents that saw it; "
                "retrain with `symmerge train` (it records them) or pass -p head=mean to "
                "average the logits"
            )
        return {}
    return {"class_counts": counts}


def _params(items: Sequence[str], method: str) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> keywords of ``method``: ints, floats, true/false/none, else
    strings. Keys the method does not take, and values its type hints rule out, are usage
    errors (listing the keys it takes, or the type it wants)."""
    import inspect
    import typing

    from symmerge.methods import get_method

    fixed = {"spec", "models", "data", "lam", "seed"}  # set by merge itself
    accepted = [k for k in inspect.signature(get_method(method)).parameters if k not in fixed]
    hints = typing.get_type_hints(get_method(method))
    accepted.append("finetune")  # merge's own: epochs of training on --data after the merge
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--param")
        value: Any = text
        low = text.strip().lower()
        if low in ("true", "false", "none"):
            value = {"true": True, "false": False, "none": None}[low]
        else:
            for cast in (int, float):
                try:
                    value = cast(text)
                    break
                except ValueError:
                    pass
        if key.strip() not in accepted:
            raise click.BadParameter(
                f"method '{method}' takes no {key.strip()!r}; it takes: {', '.join(accepted)}",
                param_hint="--param",
            )
        hint = hints.get(key.strip(), Any) if key.strip() != "finetune" else int
        if not _fits(value, hint):
            raise click.BadParameter(
                f"method '{method}' takes {key.strip()} as {_hint_text(hint)}; got {text!r}",
                param_hint="--param",
            )
        out[key.strip()] = value
    return out


def _fits(value: Any, hint: Any) -> bool:
    """Whether a converted ``-p`` value (a number, bool, ``None`` or string) can be of type
    ``hint``."""
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint in (bool, str):
        return isinstance(value, hint)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return hint is Any  # a mapping, sequence, callable or tensor: only the Python API gives one


def _hint_text(hint: Any) -> str:
    """A type hint as a user reads it: ``int | None``, ``float``, ``'a' | 'b'``."""
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_hint_text(h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "none"
    name = getattr(typing.get_origin(hint) or hint, "__name__", str(hint))
    return name if hint in (bool, int, float, str) else f"{name} (from Python only)"


class _Phases:
    """A command's wall time, split into named phases, and the process's peak memory, for
    its ``--json`` summary: ``lap(name)`` adds the time since the previous lap to ``name``."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now

    def summary(self) -> dict[str, Any]:
        """``seconds`` (wall, so far), ``timings`` (seconds per phase), ``peak_rss_mb``."""
        from symmerge.progress import peak_rss_mb

        return {
            "seconds": round(time.perf_counter() - self.start, 4),
            "timings": {k: round(v, 4) for k, v in self.seconds.items()},
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }


def _hf_directories(refs: Sequence[str], output: Path, overwrite: bool) -> list[Path] | None:
    """The directories of ``refs`` when all are ``hf:`` save_pretrained directories (the
    merge is then written as one), after checking that ``output`` overlaps none of them."""
    from symmerge.export import check_output_dir
    from symmerge.resolve import parse_reference

    parsed = [parse_reference(r) for r in refs]
    dirs = [Path(p.name).expanduser() for p in parsed if p.kind == "hf"]
    if len(dirs) != len(refs) or not all(d.is_dir() for d in dirs):
        return None
    try:
        check_output_dir(output, dirs, overwrite)
    except (ValueError, FileExistsError) as e:
        raise click.UsageError(str(e)) from None
    return dirs


def _from_disk(method: str, params: Sequence[str]) -> bool:
    """Whether :func:`symmerge.lazy.merge_pretrained` runs this merge (its methods, and no
    keyword but the sweep bound)."""
    from symmerge.lazy import LAZY_METHODS

    return method in LAZY_METHODS and all(p.startswith("max_sweeps=") for p in params)


def _merge_from_disk(
    dirs: Sequence[Path],
    method: str,
    lam: float,
    seed: int,
    params: Sequence[str],
    output: Path,
    overwrite: bool,
    json_path: Path | None,
) -> bool:
    """Merge from disk; False (after a note) when these directories must be loaded whole."""
    from symmerge.lazy import NotFromDisk, merge_pretrained
    from symmerge.methods import method_info

    phases = _Phases()
    kwargs = _params(params, method)
    card = {"paper": method_info(method).paper, **kwargs}
    say = functools.partial(click.echo, err=True)
    try:
        res = merge_pretrained(dirs, output, method=method, lam=lam, seed=seed, card=card,
                               overwrite=overwrite, log=say, **kwargs)  # fmt: skip
    except NotFromDisk as e:
        say(f"note: not merging from disk ({e}); loading the models whole")
        return False
    except (ValueError, FileExistsError) as e:
        raise click.UsageError(str(e)) from None
    phases.seconds.update(res.timings)
    click.echo(f"merged {len(dirs)} models from disk ({method}); saved {output}")
    _write_json(json_path, {
        "method": method, "lam": lam, "seed": seed, "inputs": [f"hf:{d}" for d in dirs],
        "output": str(output), "from_disk": True, "iterations": res.iterations,
        "objective": res.objective, **phases.summary(),
    })  # fmt: skip
    return True


def _save_merged(
    output: Path,
    merged: Any,
    config: dict[str, Any],
    info: dict[str, Any],
    metas: Sequence[dict[str, Any]],
    dirs: Sequence[Path] | None,
    overwrite: bool,
) -> str:
    """Write the merge the way its inputs came (:mod:`symmerge.export`); says what it wrote."""
    from symmerge.blocksparse import block_record
    from symmerge.export import save_hf_directory
    from symmerge.io import save_checkpoint
    from symmerge.resize import RECORD

    dtype = metas[0].get("dtype")
    reshaped = getattr(merged, RECORD, None) or block_record(merged)
    if dirs and not reshaped:
        card = {k: info[k] for k in ("method", "lam", "seed", "data", "renorm") if info.get(k)}
        save_hf_directory(merged, output, dirs, {**card, **info["params"]}, overwrite=overwrite)
        return f"{output} (a save_pretrained directory)"
    if dirs:  # other widths than the config's: only symmerge's checkpoint can rebuild it
        output.mkdir(parents=True, exist_ok=True)
        path = output / "merged.safetensors"
        save_checkpoint(path, merged, config, info, overwrite=overwrite, dtype=dtype)
        return (f"{path} (a symmerge checkpoint: the merge's widths differ from the "
                "inputs' config, which a Hugging Face config cannot record)")  # fmt: skip
    save_checkpoint(output, merged, config, info, overwrite=overwrite, dtype=dtype)
    return str(output) + (f" ({dtype})" if dtype and dtype != "float32" else "")


def _check_checkpoint_name(output: Path) -> None:
    """A checkpoint is safetensors: a name that promises torch.save's pickle (``.pt``,
    ``.pth``, ``.bin``, ``.ckpt``) would fail ``torch.load`` later, so it is refused now."""
    if output.suffix.lower() in (".pt", ".pth", ".bin", ".ckpt"):
        raise click.BadParameter(
            f"{output}: symmerge writes checkpoints as safetensors (a plain state dict that "
            "safetensors.torch.load_file reads, with the recipe in its metadata), which "
            f"torch.load cannot read; name it {output.with_suffix('.safetensors').name}",
            param_hint="'-o' / '--output'",
        )


def _write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    click.echo(f"results written to {path}")


@main.command("merge")
@click.argument("checkpoints", nargs=-1, required=True, type=ModelRef())
@click.option("--method", "-m", type=_method_choice(), default="weight", show_default=True,
              help="Merging method; `symmerge methods` lists what each can do.")  # fmt: skip
@click.option(
    "--data",
    "data_spec",
    default=None,
    help=DATA_HELP,
)
@click.option(
    "--data-samples",
    type=click.IntRange(min=1),
    default=5000,
    show_default=True,
    help="Samples drawn from each --data dataset.",
)
@click.option("--repair", "renorm", flag_value="repair", help="REPAIR the merged model.")
@click.option("--reset-bn", "renorm", flag_value="reset-bn", help="Reset BatchNorm statistics.")
@click.option(
    "--lam",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Weight of the second model (two models).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--param",
    "-p",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="A keyword of the method, e.g. -p steps=600 -p lr=0.5 (ste), -p max_iter=400 "
    "-p init=sinkhorn (c2m3); numbers and true/false are converted. Any method also takes "
    "-p finetune=EPOCHS: epochs of Adam on --data after the merge (default 0, zero-shot).",
)
@click.option(
    "--eval-dataset",
    "eval_datasets",
    multiple=True,
    help="Evaluate on these test sets (default: the checkpoints' own).",
)
@click.option("--eval-limit", type=click.IntRange(min=1), default=None, hidden=True)
@click.option(
    "--heads",
    type=click.Choice(["shared", "per-task"]),
    default="shared",
    show_default=True,
    help="shared: one head over the union label index; per-task: each model's own head on "
    "the merged features, one multi-head checkpoint (eval reports joint and per-task accuracy).",
)
@click.option(
    "--block-sparse",
    is_flag=True,
    help="Save the merged model computing only its non-zero blocks (partial merges such as "
    "pleas, partial zips, the ensemble): the compute spent is the compute counted.",
)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="The merged checkpoint file, or directory for hf: inputs.")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace an existing output (never an input).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
@data_root_option
@trust_pickle_option
@input_shape_option
@preprocessing_options
def merge_cmd(
    checkpoints: tuple[str, ...],
    method: str,
    data_spec: str | None,
    data_samples: int,
    renorm: str | None,
    lam: float,
    seed: int,
    params: tuple[str, ...],
    eval_datasets: tuple[str, ...],
    eval_limit: int | None,
    heads: str,
    block_sparse: bool,
    output: Path,
    overwrite: bool,
    json_path: Path | None,
    data_root: Path | None,
    trust_pickle: bool,
    input_shape: str | None,
    preprocessing: Any,
) -> None:
    """Merge two or more models of one architecture and evaluate the result.

    Each model is a symmerge checkpoint, timm:NAME=FILE, torchvision:NAME=FILE,
    module:package.module:factory=FILE (FILE: a state dict, safetensors or weights-only
    .pt/.pth) or hf:DIRECTORY (a save_pretrained directory). Models that do not record a
    dataset are evaluated only with --eval-dataset. The merge is saved the way its inputs
    came: hf: directories give a save_pretrained directory (the inputs' dtype, their shared
    tokenizer files, a model card), other inputs a symmerge checkpoint in the inputs' dtype,
    a plain state dict that timm or torchvision load and `symmerge eval` reloads. naive and
    weight merges of hf: directories run from disk, tensor by tensor, in bounded memory.
    """
    from symmerge.merging import BatchNormStatsWarning, merge

    phases = _Phases()
    if len(checkpoints) < 2:
        raise click.UsageError("merge needs at least two checkpoints")
    _check_method(method, len(checkpoints), data_spec)
    if output.resolve() in _reference_files(checkpoints):
        raise click.UsageError(f"output {output} is one of the inputs; it is never overwritten")
    if output.exists() and not overwrite:
        raise click.UsageError(f"{output} exists; pass --overwrite to replace it")
    dirs = _hf_directories(checkpoints, output, overwrite)
    if dirs is None and output.is_dir():
        raise click.UsageError(f"{output} is a directory; the merge is one checkpoint file")
    if dirs is None:
        _check_checkpoint_name(output)
    plain = not (data_spec or renorm or eval_datasets or block_sparse or heads != "shared")
    if dirs and plain and _from_disk(method, params):
        done = _merge_from_disk(dirs, method, lam, seed, params, output, overwrite, json_path)
        if done:
            return
    models, metas, inputs = _load_models(
        checkpoints, trust_pickle=trust_pickle, input_shape=input_shape, seed=seed
    )
    phases.lap("load")
    config = metas[0].get("config")
    if config is None:  # checked before merging: nothing could be saved
        raise click.UsageError(
            f"{checkpoints[0]} records no architecture to rebuild (a whole pickled module "
            "does not), so the merge could not be saved: save its state_dict and name the "
            "architecture, e.g. module:package.module:factory=FILE"
        )
    kwargs = _params(params, method)
    kwargs.update(_class_counts(method, metas, kwargs))
    data = _data_batches(data_spec, data_root, data_samples, 500, seed, models=models,
                         datasets=[m.get("dataset") for m in metas], reference=checkpoints[0],
                         preprocessing=preprocessing)  # fmt: skip
    phases.lap("data")
    known = eval_datasets or any(m.get("dataset") for m in metas)
    targets = _eval_targets(metas, eval_datasets) if known else []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", BatchNormStatsWarning)
            merged, result = merge(
                models, method, data=data, renorm=renorm, lam=lam, seed=seed, heads=heads,
                block_sparse=block_sparse, example_inputs=inputs, **kwargs,
            )  # fmt: skip
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    phases.lap("merge")
    stats_note = False
    for w in caught:  # the BatchNorm one becomes a note after the table; others pass on
        if issubclass(w.category, BatchNormStatsWarning):
            stats_note = True
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    tasks = _merged_tasks(metas, models, heads)
    union = sorted({c for t in tasks for c in t["classes"]})
    info = {"method": method, "inputs": [str(p) for p in checkpoints], "lam": lam,
            "renorm": renorm, "data": data_spec, "seed": seed, "params": kwargs,
            "heads": heads, "dataset": metas[0].get("dataset"), "classes": union,
            "tasks": tasks, "result": {"objective": result.objective,
                                       "iterations": result.iterations,
                                       "log": result.log[:20], "details": result.details,
                                       "timings": result.timings}}  # fmt: skip
    saved = _save_merged(output, merged, config, info, metas, dirs, overwrite)
    phases.lap("save")
    named = [
        (f"model {k} ({_short(ref)})", m)
        for k, (ref, m) in enumerate(zip(checkpoints, models, strict=True))
    ]
    named.append((f"merged ({method}{', ' + renorm if renorm else ''})", merged))
    results: dict[str, dict[str, Any]] = {}
    if targets:
        headers, rows, results = _eval_rows(named, targets, data_root, eval_limit)
        click.echo(format_table(headers, rows))
    else:
        click.echo("not evaluated: the models record no dataset (pass --eval-dataset)")
    dataset = metas[0].get("dataset")
    if len(tasks) > 1 and dataset:  # the label space the merge records, as `eval` reports it
        plan = ([t["classes"] for t in tasks], tasks)
        task_result = _eval_tasks_on(merged, str(dataset), plan, "test", data_root, None,
                                     1000, eval_limit)  # fmt: skip
        click.echo(f"\nmerged model, tasks ({heads} head{'s' if heads == 'per-task' else ''}):")
        click.echo(_task_table([task_result]))
    phases.lap("evaluate")
    click.echo(f"merge time {result.seconds:.2f} s (LAP {result.lap_seconds:.2f} s); saved {saved}")
    if stats_note:
        click.echo(
            "note: the merged model's BatchNorm statistics are averages of the inputs', which "
            "rarely fit merged weights; add --reset-bn or --repair (with --data) to recompute them",
            err=True,
        )
    _write_json(
        json_path,
        {
            "method": method,
            "renorm": renorm,
            "lam": lam,
            "seed": seed,
            "inputs": info["inputs"],
            "output": str(output),
            "merge_seconds": result.seconds,
            "lap_seconds": result.lap_seconds,
            "result": info["result"],
            "results": results,
            **phases.summary(),
        },
    )


@main.command("interpolate")
@click.argument("model_a", type=ModelRef())
@click.argument("model_b", type=ModelRef())
@click.option("--method", "-m", type=_method_choice(), default="weight", show_default=True,
              help="Merging method; `symmerge methods` lists what each can do.")  # fmt: skip
@click.option("--data", "data_spec", default=None, help=DATA_HELP)
@click.option("--data-samples", type=click.IntRange(min=1), default=5000, show_default=True)
@click.option("--repair", "renorm", flag_value="repair", help="REPAIR every point of the path.")
@click.option("--reset-bn", "renorm", flag_value="reset-bn", help="Reset BN at every point.")
@click.option("--steps", type=click.IntRange(min=2), default=11, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-dataset", "eval_datasets", multiple=True)
@click.option("--eval-limit", type=click.IntRange(min=1), default=None, hidden=True)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
@data_root_option
@trust_pickle_option
@input_shape_option
@preprocessing_options
def interpolate_cmd(
    model_a: str,
    model_b: str,
    method: str,
    data_spec: str | None,
    data_samples: int,
    renorm: str | None,
    steps: int,
    seed: int,
    eval_datasets: tuple[str, ...],
    eval_limit: int | None,
    plot: Path | None,
    json_path: Path | None,
    data_root: Path | None,
    trust_pickle: bool,
    input_shape: str | None,
    preprocessing: Any,
) -> None:
    """Loss and accuracy along (1-λ)·A + λ·aligned(B), with the barrier at the worst point.

    MODEL_A and MODEL_B are checkpoints or references to your own weights (as for merge)."""
    from symmerge.evaluate import barrier, plot_curve
    from symmerge.merging import interpolation
    from symmerge.progress import progress_bar

    phases = _Phases()
    _check_method(method, 2, data_spec)
    models, metas, inputs = _load_models(
        [model_a, model_b], trust_pickle=trust_pickle, input_shape=input_shape, seed=seed
    )
    phases.lap("load")
    data = _data_batches(data_spec, data_root, data_samples, 500, seed, models=models,
                         datasets=[m.get("dataset") for m in metas], reference=model_a,
                         preprocessing=preprocessing)  # fmt: skip
    phases.lap("data")
    if renorm and data is None:
        raise click.UsageError(f"--{renorm} needs --data")
    targets = _eval_targets(metas, eval_datasets)
    lambdas = [k / (steps - 1) for k in range(steps)]
    curve = []
    try:
        points = interpolation(models, method, lambdas, data=data, renorm=renorm, seed=seed,
                               example_inputs=inputs)  # fmt: skip
        for lam, model in progress_bar(points, total=steps, desc="interpolating", leave=False):
            phases.lap("merge")
            _, _, res = _eval_rows([("m", model)], targets, data_root, eval_limit)
            phases.lap("evaluate")
            curve.append(
                {"lam": lam, "accuracy": res["m"]["mean_accuracy"], "loss": res["m"]["mean_loss"]}
            )
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    rows = [[f"{p['lam']:.2f}", _pct(p["accuracy"]), p["loss"]] for p in curve]
    click.echo(format_table(["lambda", "mean acc", "mean loss"], rows))
    loss_b, acc_b = barrier(curve, "loss"), barrier(curve, "accuracy")
    click.echo(f"loss barrier {loss_b:.4f}; accuracy barrier {100 * acc_b:.2f} points")
    label = f"{method}{' + ' + renorm if renorm else ''}"
    if plot is not None:
        plot_curve({label: curve}, plot)
        click.echo(f"plot written to {plot}")
        phases.lap("plot")
    _write_json(
        json_path,
        {
            "method": method,
            "renorm": renorm,
            "curve": curve,
            "loss_barrier": loss_b,
            "accuracy_barrier": acc_b,
            "inputs": [str(model_a), str(model_b)],
            **phases.summary(),
        },
    )


#: Same as ``symmerge.condense.METHODS`` (spelled out so ``--help`` does not import torch).
CONDENSE_METHODS = ("dm", "dc", "random", "herding")


@main.command("condense")
@dataset_option()
@click.option(
    "--model", default="mlp", show_default=True, help="Zoo name (mlp, resnet20x4...) or convnet."
)
@click.option("--ipc", type=click.IntRange(min=1), default=10, show_default=True,
              help="Images per class.")  # fmt: skip
@click.option(
    "--method", "-m", type=click.Choice(CONDENSE_METHODS), default="dm", show_default=True
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--iterations",
    type=click.IntRange(min=0),
    default=None,
    help="DM: image updates (default 1000); DC: fresh networks (default 50).",
)
@click.option("--lr-img", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Image learning rate (default: the method's).")  # fmt: skip
@data_root_option
@device_option
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also save a PNG grid (rows = classes).")  # fmt: skip
@click.option("--eval", "do_eval", is_flag=True,
              help="Train a fresh MODEL on the set only and report its test accuracy.")  # fmt: skip
@click.option("--eval-epochs", type=click.IntRange(min=1), default=300, show_default=True)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Output .safetensors (metadata also in <path>.json); never overwritten.",
)
@click.option("--progress/--no-progress", default=True)
def condense_cmd(
    dataset: str,
    model: str,
    ipc: int,
    method: str,
    seed: int,
    iterations: int | None,
    lr_img: float | None,
    data_root: Path | None,
    device: str | None,
    png: Path | None,
    do_eval: bool,
    eval_epochs: int,
    output: Path,
    progress: bool,
) -> None:
    """Condense a dataset's train split to IPC images per class (DM, DC, random, herding)."""
    from symmerge.condense import condense, evaluate_condensed, save_condensed, save_grid_png
    from symmerge.io import sidecar_path

    for p in (output, sidecar_path(output), png):
        if p is not None and p.exists():
            raise click.BadParameter(f"{p} already exists; it is never overwritten")
    try:
        cset = condense(
            dataset, model=model, ipc=ipc, method=method, seed=seed, iterations=iterations,
            data_root=data_root, device=device, progress=progress, lr_img=lr_img,
        )  # fmt: skip
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        raise click.ClickException(str(exc)) from None
    meta = cset.metadata
    result = None
    if do_eval:
        result = evaluate_condensed(
            cset, epochs=eval_epochs, seed=seed, data_root=data_root, device=device
        )
        meta["eval"] = {k: result[k] for k in ("accuracy", "loss", "n", "eval_epochs")}
    save_condensed(cset, output)
    if png is not None:
        save_grid_png(cset, png)
    click.echo(
        f"saved {output}: {len(cset)} images ({ipc} per class) of {meta['dataset']} by "
        f"{method} ({meta['model']}, {meta['iterations']} iterations, seed {seed})"
        + (f", grid {png}" if png is not None else "")
    )
    click.echo(
        f"time {meta['time_s']:.1f} s on {meta['device']}; peak RSS {meta['peak_rss_mb']:.0f} MB "
        f"(+{meta['peak_rss_delta_mb']:.0f} MB during condensation)"
    )
    if result is not None:
        click.echo(
            f"fresh {model} trained only on it ({eval_epochs} epochs): test accuracy "
            f"{_pct(result['accuracy'])} (n={result['n']})"
        )


def _names(value: str | None) -> list[str] | None:
    """``"a,b"`` -> ``["a", "b"]`` (``None`` stays ``None``: everything)."""
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


@main.command("report")
@click.option("--scale", type=click.Choice(["smoke", "cpu", "paper"]), default="smoke",
              show_default=True, help="smoke: tiny MLPs, minutes; cpu: full-size MLPs and "
              "ResNet-20 on CIFAR-10, about a day on a CPU, run in chunks with "
              "--settings/--resume; paper: needs a CUDA GPU.")  # fmt: skip
@click.option("--methods", default=None, help="Comma-separated methods (default: every "
              "method `symmerge methods` lists).")  # fmt: skip
@click.option("--settings", default=None, help="Comma-separated settings of the scale "
              "(default: all; an unknown name lists them).")  # fmt: skip
@click.option("--seeds", default=None, help="Comma-separated report seeds (default: the "
              "scale's; with --resume, some of the folder's, to run a setting a seed at a "
              "time).")  # fmt: skip
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Report folder: results.json, report.md, plots, checkpoints/.")  # fmt: skip
@click.option("--resume", is_flag=True, help="Continue the report in the folder (same scale, "
              "methods and code): the settings named are run or reused at the seeds named and "
              "the folder's others kept, so a long scale runs in chunks (--settings A -o R, "
              "then --settings B -o R --resume, ...).")  # fmt: skip
@click.option("--render-only", is_flag=True, help="Redraw report.md and the plots from the "
              "folder's results.json.")  # fmt: skip
@click.option(
    "--peers/--no-peers",
    default=True,
    show_default=True,
    help="Run the peers' own code (PyPI rebasin) beside ours where installed; else record why not.",
)
@click.option("--peer-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              envvar="SYMMERGE_PEERS", help="Folder of the peers' packages (default "
              "~/.cache/symmerge/peers; rebasin in its rebasin/ subfolder).")  # fmt: skip
@click.option(
    "--join",
    "join",
    multiple=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Join the settings and seeds this report folder finished "
    "into OUTPUT, as if they had run there (chunks run side by side, each in a copy "
    "of the folder), and redraw it; repeatable. Runs nothing.",
)
@click.option("--train-jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train the source checkpoints the call needs this many at a time, in "
              "separate processes sharing the torch threads (the same files, sooner).")  # fmt: skip
@data_root_option
@click.option("--progress/--no-progress", default=True)
def report_cmd(
    scale: str,
    methods: str | None,
    settings: str | None,
    seeds: str | None,
    output: Path,
    resume: bool,
    render_only: bool,
    peers: bool,
    peer_root: Path | None,
    join: tuple[Path, ...],
    train_jobs: int,
    data_root: Path | None,
    progress: bool,
) -> None:
    """Every registered method side by side on the same checkpoints, data and seeds.

    Trains (or reuses) each setting's source checkpoints, runs every method that can run
    there, evaluates, and writes OUTPUT/results.json, OUTPUT/report.md and plots. Reference
    checkpoints in $SYMMERGE_CHECKPOINTS made with the same recipe (`symmerge train`) are
    used instead of training, and the report says so.
    """
    from symmerge.report import ReportError, join_reports, load_results, run_report, write_report
    from symmerge.report.schema import RESULTS_FILE

    try:
        if join:
            doc = join_reports(output, join)
        elif render_only:
            doc = load_results(output)
        else:
            try:
                seed_list = None if seeds is None else [int(s) for s in _names(seeds) or []]
            except ValueError:
                raise click.BadParameter(f"seeds must be integers, got {seeds!r}",
                                         param_hint="--seeds") from None  # fmt: skip
            _warn_fixed_seeds(output, scale, seed_list)
            doc = run_report(output, scale=scale, settings=_names(settings),
                             methods=_names(methods), seeds=seed_list, data_root=data_root,
                             resume=resume, progress=progress, peers=peers,
                             peer_root=peer_root, train_jobs=train_jobs)  # fmt: skip
    except ReportError as exc:
        raise click.ClickException(str(exc)) from None
    files = write_report(doc, output)
    failed = sum(r["status"] != "ok" for r in doc["runs"])
    written = files if render_only else [output / RESULTS_FILE, *files]
    click.echo(f"{len(doc['runs'])} runs ({failed} failed); wrote "
               + ", ".join(str(f) for f in written))  # fmt: skip


def _warn_fixed_seeds(output: Path, scale: str, seeds: list[int] | None) -> None:
    """A folder's first call fixes its seeds: say so when it names fewer than the scale's."""
    from symmerge.report.schema import RESULTS_FILE
    from symmerge.report.settings import DEFAULT_SEEDS

    every = DEFAULT_SEEDS.get(scale, ())
    if seeds is not None and not (Path(output) / RESULTS_FILE).exists() \
            and set(every) - set(seeds):  # fmt: skip
        click.echo(f"note: this new folder holds seeds {', '.join(map(str, seeds))} only: a "
                   f"folder's first call fixes its seeds (the {scale} scale's are "
                   f"{', '.join(map(str, every))}); to run one seed of a folder of all of them, "
                   "make that folder first, or join this one into it later (--join)",
                   err=True)  # fmt: skip


if __name__ == "__main__":  # pragma: no cover
    main()
