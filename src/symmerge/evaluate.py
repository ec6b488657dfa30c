"""Evaluation of source and merged models: per-dataset and joint accuracy, interpolation
curves, loss/accuracy barriers and their plots (algorithms.md §6.2, Evaluators).

Accuracy and loss of one model on one dataset are computed by :func:`symmerge.train.evaluate`
(one implementation for training and merging); this module adds the forms merging papers
report: the mean over the datasets of several source models (Yamada et al.), joint and
per-task accuracy for models trained on disjoint class sets (ZipIt!, MuDSC), with one shared
head or per-task logit slices (``tasks``), linear probes of their features, the loss and
accuracy barriers along the linear path between two aligned models (Git Re-Basin, REPAIR),
and the cycle error of a set of pairwise alignments (C2M3).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from symmerge.io import load_state
from symmerge.train import evaluate as _evaluate_tensors

__all__ = [
    "barrier",
    "cycle_error",
    "evaluate",
    "check_tasks",
    "evaluate_many",
    "final_linear",
    "interpolate_state_dicts",
    "interpolation_curve",
    "joint_accuracy",
    "linear_probe",
    "pairwise_from_universe",
    "plot_curve",
    "task_accuracy",
    "tasks_from_classes",
]

Data = str | TensorDataset | Sequence[Tensor] | Iterable[Any]


def _is_dataset(data: Any) -> bool:
    """A name, a TensorDataset or an ``(x, y)`` pair of tensors (not an iterable of batches)."""
    if isinstance(data, (str, TensorDataset)):
        return True
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(torch.is_tensor(t) for t in data)
        and data[0].shape[:1] == data[1].shape[:1]
        and data[1].ndim == 1
    )


def evaluate(model: nn.Module, data: Data, **kwargs: Any) -> dict[str, Any]:
    """Accuracy and mean cross-entropy of ``model``: a dict with ``accuracy``, ``loss``, ``n``.

    ``data`` is a dataset name, a ``TensorDataset``, an ``(x, y)`` pair of tensors, or an
    iterable of ``(x, y)`` batches. The first three go straight to
    :func:`symmerge.train.evaluate` (keyword arguments such as ``split``, ``classes``,
    ``data_root``, ``device``, ``batch_size``, ``limit`` are passed on); batches are each
    evaluated by it (``classes`` and ``device`` apply) and the results combined, weighted by
    batch size. With ``classes``,
    ``subset_accuracy`` is the argmax restricted to those classes' logits.
    """
    if _is_dataset(data):
        return _evaluate_tensors(model, data, **kwargs)  # type: ignore[arg-type]
    unused = sorted(set(kwargs) & {"split", "data_root", "batch_size", "limit"})
    if unused:
        raise TypeError(f"{unused} only apply when data is a dataset, not an iterable of batches")
    total: dict[str, float] = {}
    n = 0
    for batch in data:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise TypeError("evaluate needs labelled (inputs, labels) batches")
        x, y = batch[0], batch[1]
        res = _evaluate_tensors(model, (x, y), batch_size=max(1, len(x)), **kwargs)
        for key in ("accuracy", "loss", "subset_accuracy"):
            if key in res:
                total[key] = total.get(key, 0.0) + res[key] * res["n"]
        n += res["n"]
    out: dict[str, Any] = {"n": n}
    for key, value in total.items():
        out[key] = value / n if n else math.nan
    out.setdefault("accuracy", math.nan)
    out.setdefault("loss", math.nan)
    return out


def evaluate_many(model: nn.Module, datasets: Mapping[str, Data], **kwargs: Any) -> dict[str, Any]:
    """:func:`evaluate` on each named dataset, plus the unweighted mean accuracy and loss.

    The mean over datasets (not over samples) is what papers merging models trained on
    different datasets report, so a small dataset counts as much as a large one.
    """
    if not datasets:
        raise ValueError("evaluate_many needs at least one dataset")
    per = {name: evaluate(model, data, **kwargs) for name, data in datasets.items()}
    return {
        "per_dataset": per,
        "accuracy": sum(r["accuracy"] for r in per.values()) / len(per),
        "loss": sum(r["loss"] for r in per.values()) / len(per),
    }


def _restrict(data: Any, classes: Sequence[int]) -> tuple[Tensor, Tensor]:
    if isinstance(data, TensorDataset):
        x, y = data.tensors[0], data.tensors[1]
    else:
        x, y = data
    keep = torch.isin(y, torch.as_tensor(list(classes), device=y.device))
    return x[keep], y[keep]


# ---------------------------------------------------------------------------------------
# label spaces: tasks trained on class subsets, per-task and joint accuracy, linear probes
# ---------------------------------------------------------------------------------------

#: One task: ``{"classes": [int, ...], "logits": [start, stop]}``. Its logits are
#: ``output[:, start:stop]``, indexed by dataset label (class c is column ``start + c``).
Task = Mapping[str, Any]


def check_tasks(tasks: Sequence[Task], num_outputs: int | None = None) -> list[dict[str, Any]]:
    """Validated copies of ``tasks`` with sorted ``classes`` and ``logits`` as ``[start, stop]``.

    Checked here, before any evaluation, because each mistake would otherwise give a plausible
    but wrong number: overlapping class sets (a sample would count for two tasks), a class
    beyond its slice's width, or a slice beyond the model's ``num_outputs`` (when given).
    Raises ``ValueError`` naming the task (numbered from 0).
    """
    if not tasks:
        raise ValueError("need at least one task")
    out: list[dict[str, Any]] = []
    owner: dict[int, int] = {}
    for i, task in enumerate(tasks):
        try:
            classes = sorted({int(c) for c in task["classes"]})
            start, stop = (int(v) for v in task["logits"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"task {i} must be {{'classes': [int, ...], 'logits': [start, stop]}}, got {task!r}"
            ) from None
        if not classes or classes[0] < 0:
            raise ValueError(f"task {i} needs a non-empty list of class labels >= 0, got {classes}")
        if not 0 <= start < stop:
            raise ValueError(f"task {i} has logits [{start}, {stop}]; need 0 <= start < stop")
        if num_outputs is not None and stop > num_outputs:
            raise ValueError(
                f"task {i}'s logits [{start}, {stop}] go beyond the model's {num_outputs} outputs"
            )
        if classes[-1] >= stop - start:
            raise ValueError(
                f"task {i}'s class {classes[-1]} does not fit its logits [{start}, {stop}] "
                f"({stop - start} wide; a task's logits are indexed by dataset label)"
            )
        shared = [c for c in classes if c in owner]
        if shared:
            raise ValueError(
                f"tasks {owner[shared[0]]} and {i} share classes {shared}; "
                "the tasks' class sets must be disjoint"
            )
        owner.update(dict.fromkeys(classes, i))
        out.append({"classes": classes, "logits": [start, stop]})
    return out


def tasks_from_classes(
    class_sets: Sequence[Sequence[int]], num_outputs: int
) -> list[dict[str, Any]]:
    """Tasks for one shared head: every class set reads the whole head ``[0, num_outputs]``.

    The layout of a model with a full-width head trained on a class subset, and of a merge
    that keeps a single head; a multi-head model records its own ``tasks`` instead.
    """
    return check_tasks(
        [{"classes": list(s), "logits": [0, int(num_outputs)]} for s in class_sets], num_outputs
    )


def _load(
    data: str | TensorDataset | Sequence[Tensor],
    classes: Sequence[int],
    split: str,
    data_root: str | None,
) -> tuple[Tensor, Tensor]:
    """``(x, y)`` of the samples whose label is in ``classes``, in dataset order."""
    if isinstance(data, str):
        from symmerge.data import get_dataset

        ds = get_dataset(data, split, root=data_root, classes=list(classes))
        return ds.tensors[0], ds.tensors[1]
    return _restrict(data, classes)


def _first_per_task(y: Tensor, tasks: Sequence[Task], limit: int | None) -> Tensor:
    """The indices of the first ``limit`` samples of every task (all with ``None``), in order.

    Per task, so that a limited evaluation of a task sees the same samples as a limited
    single-task evaluation (:func:`evaluate` with that task's ``classes``).
    """
    keep = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    for task in tasks:
        idx = torch.nonzero(torch.isin(y, torch.as_tensor(task["classes"], device=y.device)))
        keep[idx.flatten()[:limit]] = True
    return torch.nonzero(keep).flatten()


@contextlib.contextmanager
def _inference(
    model: nn.Module, device: str | torch.device | None
) -> Iterator[tuple[torch.device, torch.dtype | None]]:
    """Eval mode on ``device`` (default: the model's) with :func:`symmerge.train.evaluate`'s
    autocast, so task numbers match its numbers; mode and device are restored afterwards."""
    from symmerge.train import _autocast_dtype, _model_device, resolve_device

    dev = resolve_device(device) if device is not None else _model_device(model)
    model_dev = _model_device(model)
    was_training = model.training
    model.to(dev).eval()
    try:
        with torch.inference_mode():
            yield dev, _autocast_dtype(dev)
    finally:
        model.train(was_training)
        model.to(model_dev)


def _outputs(
    model: nn.Module, x: Tensor, y: Tensor, device: str | torch.device | None, batch_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(float32 model outputs, labels)`` batch by batch (see :func:`_inference`)."""
    from symmerge.data import iterate_batches

    with _inference(model, device) as (dev, amp):
        for xb, yb in iterate_batches((x, y), batch_size, shuffle=False, device=dev):
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                out = model(xb)
            yield out.float(), yb


def _output_width(model: nn.Module, x: Tensor, device: str | torch.device | None) -> int:
    if not len(x):
        raise ValueError("no samples to evaluate: the data has none of the tasks' classes")
    with contextlib.closing(_outputs(model, x[:1], torch.zeros(1), device, 1)) as outs:
        out, _ = next(outs)
    return int(out.shape[-1])


def _task_pass(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    tasks: list[dict[str, Any]],
    device: str | torch.device | None,
    batch_size: int,
    limit: int | None,
) -> dict[str, Any]:
    """Per-task and joint accuracy from one pass over the tasks' samples (logits once)."""
    idx = _first_per_task(y, tasks, limit)
    x, y = x[idx.to(x.device)], y[idx]
    union = sorted(c for t in tasks for c in t["classes"])
    slices = {tuple(t["logits"]) for t in tasks}
    shared = next(iter(slices)) if len(slices) == 1 else None  # one head: whole-head metrics
    stop_max = max(t["logits"][1] for t in tasks)
    cls = [torch.as_tensor(t["classes"]) for t in tasks]
    cols = [c + t["logits"][0] for c, t in zip(cls, tasks, strict=True)]  # absolute columns
    joint_cols, joint_cls = torch.cat(cols), torch.cat(cls)
    hits = torch.zeros(len(tasks) + 2, dtype=torch.int64)  # tasks, joint, joint over the head
    loss = torch.zeros(len(tasks) + 1, dtype=torch.float64)
    count = torch.zeros(len(tasks), dtype=torch.int64)
    with contextlib.closing(_outputs(model, x, y, device, batch_size)) as outs:
        for out, yb in outs:
            if out.ndim != 2 or out.shape[1] < stop_max:
                raise ValueError(
                    f"the tasks need logits up to {stop_max} but the model outputs shape "
                    f"{tuple(out.shape)}"
                )
            yb = yb.to(out.device)
            pred = joint_cls.to(out.device)[out[:, joint_cols.to(out.device)].argmax(1)]
            hits[-2] += int((pred == yb).sum())
            if shared is not None:
                head = out[:, shared[0] : shared[1]]
                hits[-1] += int((head.argmax(1) == yb).sum())
                loss[-1] += float(F.cross_entropy(head, yb, reduction="sum"))
            for i, (task, c, col) in enumerate(zip(tasks, cls, cols, strict=True)):
                mine = torch.isin(yb, c.to(yb.device))
                o, t = out[mine], yb[mine]
                pred = c.to(o.device)[o[:, col.to(o.device)].argmax(1)]
                hits[i] += int((pred == t).sum())
                start, stop = task["logits"]
                loss[i] += float(F.cross_entropy(o[:, start:stop], t, reduction="sum"))
                count[i] += len(t)

    def frac(total: Tensor, n: int) -> float:
        return float(total) / n if n else math.nan

    n = len(y)
    results = [
        {
            **task,
            "n": int(count[i]),
            "accuracy": frac(hits[i], int(count[i])),
            "loss": frac(loss[i], int(count[i])),
        }
        for i, task in enumerate(tasks)
    ]
    return {
        "joint": {
            "classes": union,
            "n": n,
            "accuracy": frac(hits[-2], n),
            "accuracy_all_logits": frac(hits[-1], n) if shared is not None else None,
            "loss": frac(loss[-1], n) if shared is not None else None,
        },
        "tasks": results,
        "mean_task_accuracy": sum(r["accuracy"] for r in results) / len(results),
    }


def task_accuracy(
    model: nn.Module,
    data: str | TensorDataset | Sequence[Tensor],
    tasks: Sequence[Task],
    *,
    split: str = "test",
    data_root: str | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 1000,
    limit: int | None = None,
) -> dict[str, Any]:
    """Per-task and joint accuracy of a model whose tasks are class subsets with logit slices.

    ``data`` is a dataset name (``split``, ``data_root``) or ``(x, y)`` tensors; ``tasks`` as
    :func:`check_tasks` takes them (a model's recorded ``tasks``, or
    :func:`tasks_from_classes` for one shared head). ``limit``: the first ``limit`` samples
    of each task. The model runs once over the tasks' samples. Returns:

    * ``tasks``: per task, ``accuracy`` = argmax over its own classes within its own logit
      slice on its own samples (the task id is known), ``loss`` = cross-entropy over its whole
      slice, ``n``, ``classes``, ``logits``;
    * ``joint``: on the union of the tasks' samples with no task id, ``accuracy`` = argmax
      over every task's own-class logits together, predicting the winning entry's class;
      when all tasks share one slice (one head), also ``accuracy_all_logits`` (argmax over
      the whole slice) and ``loss`` (cross-entropy over it), else ``None``;
    * ``mean_task_accuracy``; ``dataset`` and ``split`` when ``data`` is a name.
    """
    checked = check_tasks(tasks)
    x, y = _load(data, [c for t in checked for c in t["classes"]], split, data_root)
    res = _task_pass(model, x, y, checked, device, batch_size, limit)
    if isinstance(data, str):
        res = {"dataset": data, "split": split, **res}
    return res


def joint_accuracy(
    model: nn.Module,
    data: str | TensorDataset | Sequence[Tensor],
    class_sets: Sequence[Sequence[int]],
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`task_accuracy` of a shared-head model for sources with disjoint ``class_sets``.

    Every class set reads the whole head (:func:`tasks_from_classes`); keyword arguments as
    :func:`task_accuracy` takes them.
    """
    if not class_sets or any(not list(s) for s in class_sets):
        raise ValueError("class_sets must be a non-empty list of non-empty class lists")
    split, root = kwargs.pop("split", "test"), kwargs.pop("data_root", None)
    union = sorted({int(c) for s in class_sets for c in s})
    x, y = _load(data, union, split, root)
    tasks = tasks_from_classes(class_sets, _output_width(model, x, kwargs.get("device")))
    res = task_accuracy(model, (x, y), tasks, **kwargs)
    if isinstance(data, str):
        res = {"dataset": data, "split": split, **res}
    return res


def final_linear(model: nn.Module, x: Tensor, device: str | torch.device | None = None) -> str:
    """Name of the last ``nn.Linear`` whose output is the model's output (its classifier).

    Found by running ``x`` (a few inputs) with forward hooks, not by module order, because
    modules may be registered in any order. Raises ``ValueError`` when no Linear produces
    the output (e.g. a conv head, or a post-processing step after the last Linear).
    """
    names = {m: n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    calls: list[tuple[nn.Module, Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, _, out: calls.append((mod, out))) for m in names]
    try:
        with _inference(model, device) as (dev, amp):
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                out = model(x.to(dev))
    finally:
        for h in hooks:
            h.remove()
    for mod, o in reversed(calls):
        if o is out or (o.shape == out.shape and torch.equal(o, out)):
            return names[mod]
    raise ValueError(
        f"linear_probe needs a model whose output comes from a final nn.Linear; "
        f"{type(model).__name__}'s does not ({len(names)} Linear modules, none gives the output)"
    )


def _features(
    model: nn.Module, layer: nn.Module, x: Tensor, device: str | torch.device | None, bs: int
) -> Tensor:
    """The inputs of ``layer`` for every sample of ``x``, float32, on ``device``."""
    feats: list[Tensor] = []
    hook = layer.register_forward_pre_hook(lambda _, args: feats.append(args[0].float()))
    try:
        with contextlib.closing(_outputs(model, x, torch.zeros(len(x)), device, bs)) as outs:
            for _ in outs:
                pass
    finally:
        hook.remove()
    out = torch.cat(feats) if feats else torch.zeros(0, 0)
    if out.ndim != 2:
        raise ValueError(f"the final Linear's input has shape {tuple(out.shape)}, not (N, D)")
    return out


def _fit_probe(
    f: Tensor, y: Tensor, k: int, steps: int, lr: float, seed: int, wd: float
) -> nn.Linear:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS)."""
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(f.shape[1], k).to(f.device)
    with torch.no_grad():
        head.weight.copy_(0.01 * torch.randn(head.weight.shape, generator=gen))
        head.bias.zero_()
    opt = torch.optim.LBFGS(
        head.parameters(), lr=lr, max_iter=steps, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(f), y) + wd * head.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return head.requires_grad_(False)


def linear_probe(
    model: nn.Module,
    data: str | tuple[Sequence[Tensor], Sequence[Tensor]],
    tasks: Sequence[Task] | Sequence[Sequence[int]],
    *,
    steps: int = 100,
    lr: float = 1.0,
    seed: int = 0,
    weight_decay: float = 1e-4,
    split: str = "test",
    train_split: str = "train",
    data_root: str | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 1000,
    limit: int | None = None,
    train_limit: int | None = None,
) -> dict[str, Any]:
    """Accuracy of a fresh linear head per task on the model's features (a linear probe).

    A merged model's heads can be poor while its features are good; a probe separates the
    two. Features are the inputs of the model's final Linear (:func:`final_linear`). Per
    task, a ``nn.Linear`` over its classes is fitted (seeded init, full-batch L-BFGS for
    ``steps`` iterations, L2 ``weight_decay``, on standardised features) on the task's
    samples of ``train_split`` (first ``train_limit`` per task) and scored on ``split``
    (first ``limit`` per task). ``data`` is a dataset name or ``((x, y) train, (x, y) test)``;
    ``tasks`` are task dicts (only ``classes`` is used) or class lists.

    Returns ``tasks`` (per task ``classes``, ``accuracy``, ``n``, ``train_accuracy``,
    ``train_n``), ``joint`` (on all tasks' samples without a task id: argmax over every
    probe's logits together), ``mean_task_accuracy``, ``fit_time_s`` (the fits, without
    feature extraction), ``layer`` and ``feature_dim``.
    """
    sets = [t["classes"] if isinstance(t, Mapping) else t for t in tasks]
    checked = check_tasks([{"classes": s, "logits": [0, max(s, default=0) + 1]} for s in sets])
    union = sorted(c for t in checked for c in t["classes"])
    if isinstance(data, str):
        train = _load(data, union, train_split, data_root)
        test = _load(data, union, split, data_root)
    else:
        train, test = (_restrict(d, union) for d in data)
    if not len(train[0]) or not len(test[0]):
        raise ValueError(f"linear_probe needs train and test samples of classes {union}")
    name = final_linear(model, train[0][:2], device)
    layer = model.get_submodule(name)
    feats, labels = {}, {}
    for part, (x, y), lim in (("train", train, train_limit), ("test", test, limit)):
        idx = _first_per_task(y, checked, lim)
        feats[part] = _features(model, layer, x[idx.to(x.device)], device, batch_size)
        labels[part] = y[idx].to(feats[part].device)
    results, probe_logits = [], []
    fit_time = 0.0
    for i, task in enumerate(checked):
        cls = torch.as_tensor(task["classes"], device=labels["train"].device)
        mine = torch.isin(labels["train"], cls)
        if not mine.any():
            raise ValueError(f"linear_probe: no training samples of task {i}'s classes {cls}")
        f, y = feats["train"][mine], torch.searchsorted(cls, labels["train"][mine])
        mean, std = f.mean(0), f.std(0, unbiased=False).clamp_min(1e-6)
        start = time.perf_counter()
        head = _fit_probe((f - mean) / std, y, len(cls), steps, lr, seed, weight_decay)
        if f.is_cuda:
            torch.cuda.synchronize(f.device)
        fit_time += time.perf_counter() - start
        logits = head((feats["test"] - mean) / std)
        probe_logits.append(logits)
        test_mine = torch.isin(labels["test"], cls)
        pred = cls[logits[test_mine].argmax(1)]
        n, hits = int(test_mine.sum()), int((pred == labels["test"][test_mine]).sum())
        train_hits = int((head((f - mean) / std).argmax(1) == y).sum())
        results.append(
            {
                "classes": task["classes"],
                "n": n,
                "accuracy": hits / n if n else math.nan,
                "train_n": len(y),
                "train_accuracy": train_hits / len(y) if len(y) else math.nan,
            }
        )
    joint_cls = torch.as_tensor([c for t in checked for c in t["classes"]])  # probe column order
    joint_pred = joint_cls.to(labels["test"].device)[torch.cat(probe_logits, 1).argmax(1)]
    return {
        "tasks": results,
        "joint": {
            "classes": union,
            "n": len(labels["test"]),
            "accuracy": int((joint_pred == labels["test"]).sum()) / len(labels["test"]),
        },
        "mean_task_accuracy": sum(r["accuracy"] for r in results) / len(results),
        "fit_time_s": fit_time,
        "layer": name,
        "feature_dim": int(feats["train"].shape[1]),
        "steps": steps,
        "lr": lr,
        "seed": seed,
    }


# ---------------------------------------------------------------------------------------
# interpolation paths and barriers
# ---------------------------------------------------------------------------------------


def interpolate_state_dicts(
    a: Mapping[str, Tensor], b: Mapping[str, Tensor], lam: float
) -> dict[str, Tensor]:
    """``(1 − λ)·a + λ·b`` for floating tensors; integer buffers (BN counters) come from ``a``.

    Written as a weighted sum, not ``a + λ(b − a)``, so λ = 0 and λ = 1 return the endpoints
    bit for bit.
    """
    if a.keys() != b.keys():
        missing = sorted(set(a) ^ set(b))
        raise ValueError(f"state dicts have different keys: {missing[:5]}")
    out = {}
    for k, ta in a.items():
        tb = b[k]
        if ta.shape != tb.shape:
            raise ValueError(f"'{k}' has shape {tuple(ta.shape)} in a, {tuple(tb.shape)} in b")
        if ta.is_floating_point():
            out[k] = ((1.0 - lam) * ta + lam * tb.to(ta.device, ta.dtype)).to(ta.dtype)
        else:
            out[k] = ta.clone()
    return out


def interpolation_curve(
    model_a: nn.Module,
    model_b: nn.Module | Mapping[str, Tensor],
    lambdas: Iterable[float],
    eval_fn: Callable[[nn.Module], Mapping[str, Any]],
    renorm: Callable[[nn.Module, float], nn.Module | None] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate the models on the line ``(1 − λ)·θ_a + λ·θ_b`` between two endpoints.

    Args:
        model_a: the first endpoint (not modified).
        model_b: the second endpoint, a model or state dict, already aligned to ``model_a``.
        lambdas: the λ values, e.g. ``torch.linspace(0, 1, 11).tolist()``.
        eval_fn: metrics of one model, e.g. ``lambda m: evaluate(m, "cifar10")``.
        renorm: optional ``renorm(model, λ)`` applied to each interpolated copy before it is
            evaluated (in place, or returning a new model), e.g.
            ``lambda m, lam: reset_bn(m, batches)`` or
            ``lambda m, lam: repair(m, [a, b], batches, weights=(1 - lam, lam))``.

    Returns:
        One dict per λ: ``{"lambda": λ, **eval_fn(model)}``. At λ = 0 and 1 (without renorm)
        the models are the endpoints exactly, so the metrics equal the endpoints' own.
    """
    sd_a = model_a.state_dict()
    sd_b = model_b.state_dict() if isinstance(model_b, nn.Module) else dict(model_b)
    curve = []
    for lam in lambdas:
        lam = float(lam)
        model = copy.deepcopy(model_a)  # fresh each time: renorm may change the architecture
        load_state(model, interpolate_state_dicts(sd_a, sd_b, lam))
        if renorm is not None:
            out = renorm(model, lam)
            model = out if out is not None else model
        curve.append({"lambda": lam, **eval_fn(model)})
    return curve


def _lam(point: Mapping[str, Any]) -> float:
    """A curve point's λ: key ``"lambda"`` (as :func:`interpolation_curve` writes), or ``"lam"``."""
    return float(point["lambda"] if "lambda" in point else point["lam"])


def barrier(
    curve: Sequence[Mapping[str, Any]], key: str = "loss", higher_is_better: bool | None = None
) -> float:
    """Height of the bump of ``key`` above the straight line between the curve's endpoints.

    Loss barrier: max_λ [loss(λ) − ((1 − t)·loss(λ_0) + t·loss(λ_1))], t = (λ − λ_0)/(λ_1 − λ_0),
    over the points of the curve (λ_0, λ_1: its smallest and largest λ, usually 0 and 1).
    Accuracy barrier (``higher_is_better``, inferred True for keys containing "acc"): the
    same with the sign flipped, max_λ [line(λ) − acc(λ)], i.e. minus the minimum of
    acc(λ) − line(λ), so both barriers are >= 0 and larger is worse.
    """
    points = sorted(curve, key=_lam)
    if len(points) < 2:
        raise ValueError("a barrier needs a curve with at least two points")
    if higher_is_better is None:
        higher_is_better = "acc" in key.lower()
    l0, l1 = _lam(points[0]), _lam(points[-1])
    v0, v1 = float(points[0][key]), float(points[-1][key])
    if l1 == l0:
        raise ValueError("the curve's endpoints have the same lambda")
    worst = -math.inf
    for p in points:
        t = (_lam(p) - l0) / (l1 - l0)
        line = (1.0 - t) * v0 + t * v1
        gap = line - float(p[key]) if higher_is_better else float(p[key]) - line
        worst = max(worst, gap)
    return worst


def plot_curve(
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    keys: Sequence[str] = ("loss", "accuracy"),
    title: str | None = None,
) -> Path:
    """Write a PNG with one panel per metric in ``keys`` and one line per curve.

    ``curves`` maps a label (e.g. "naive", "weight matching", "+ REPAIR") to a curve from
    :func:`interpolation_curve`. Metrics no curve has are skipped. Needs matplotlib (the
    ``plot`` extra); uses its Agg canvas directly, so no global pyplot state is touched.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plot_curve needs matplotlib, an optional dependency: pip install 'symmerge[plot]'"
        ) from e
    if not curves:
        raise ValueError("plot_curve needs at least one curve")
    present = [k for k in keys if any(c and k in c[0] for c in curves.values())]
    if not present:
        raise ValueError(f"no curve has any of the metrics {list(keys)}")
    fig = Figure(figsize=(4.2 * len(present), 3.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    for ax, key in zip(axes, present, strict=True):
        for label, curve in curves.items():
            pts = sorted((p for p in curve if key in p), key=_lam)
            if pts:
                ax.plot([_lam(p) for p in pts], [p[key] for p in pts], marker="o", label=label)
        ax.set_xlabel("λ")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def cycle_error(
    pairwise: Mapping[tuple[int, int], Mapping[str, Tensor]],
) -> dict[str, Any]:
    """How far pairwise alignments are from composing consistently (C2M3's cycle error).

    ``pairwise[(i, j)][g]`` (i < j) aligns model j to model i in the convention of
    :meth:`SymmetrySpec.permute_state_dict`: unit u of model i matches unit ``perm[u]`` of
    model j. For every triangle i < j < k, unit u of model i goes to j and on to k
    (``p_jk[p_ij[u]]``) and should land where the direct map sends it (``p_ik[u]``), so that
    the cycle i -> j -> k -> i is the identity. Returns the fraction of units that do not,
    per group and over all units (``"mean"``), averaged over the triangles, and the number of
    triangles. Maps to a shared universe (C2M3, MergeMany) give zero by construction.
    """
    models = sorted({m for pair in pairwise for m in pair})
    triangles = list(itertools.combinations(models, 3))
    if not triangles:
        raise ValueError("cycle_error needs pairwise maps between at least 3 models")
    missing = [p for t in triangles for p in itertools.combinations(t, 2) if p not in pairwise]
    if missing:
        raise ValueError(f"cycle_error needs every pair (i < j); missing {missing[:3]}")
    groups = list(pairwise[triangles[0][:2]])
    wrong = dict.fromkeys(groups, 0.0)
    for i, j, k in triangles:
        for g in groups:
            p_ij, p_jk, p_ik = (torch.as_tensor(pairwise[key][g]).cpu() for key in
                                ((i, j), (j, k), (i, k)))  # fmt: skip
            wrong[g] += float((p_jk[p_ij] != p_ik).double().mean())
    per_group = {g: w / len(triangles) for g, w in wrong.items()}
    sizes = {g: torch.as_tensor(pairwise[triangles[0][:2]][g]).numel() for g in groups}
    total = sum(sizes.values())
    mean = sum(per_group[g] * sizes[g] for g in groups) / total if total else 0.0
    return {"mean": mean, "per_group": per_group, "triangles": len(triangles)}


def pairwise_from_universe(
    model_perms: Sequence[Mapping[str, Tensor]],
) -> dict[tuple[int, int], dict[str, Tensor]]:
    """Pairwise alignments implied by maps to one common order: ``model_perms[i][g][u]`` is
    the unit of model i at common unit u, so model j aligns to model i by
    ``perm_j[argsort(perm_i)]``."""
    out: dict[tuple[int, int], dict[str, Tensor]] = {}
    for i, j in itertools.combinations(range(len(model_perms)), 2):
        out[(i, j)] = {
            g: torch.as_tensor(model_perms[j][g])[torch.argsort(torch.as_tensor(p))]
            for g, p in model_perms[i].items()
        }
    return out
