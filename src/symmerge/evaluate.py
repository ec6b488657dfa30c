"""Evaluation of source and merged models: per-dataset and joint accuracy, interpolation
curves, loss/accuracy barriers and their plots (algorithms.md §6.2, Evaluators).

Accuracy and loss of one model on one dataset are computed by :func:`symmerge.train.evaluate`
(one implementation for training and merging); this module adds the forms merging papers
report: the mean over the datasets of several source models (Yamada et al.), joint and
per-task accuracy for models trained on disjoint class sets (ZipIt!, MuDSC), and the loss and
accuracy barriers along the linear path between two aligned models (Git Re-Basin, REPAIR),
and the cycle error of a set of pairwise alignments (C2M3).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from symmerge.train import evaluate as _evaluate_tensors

__all__ = [
    "barrier",
    "cycle_error",
    "evaluate",
    "evaluate_many",
    "interpolate_state_dicts",
    "interpolation_curve",
    "joint_accuracy",
    "pairwise_from_universe",
    "plot_curve",
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


def joint_accuracy(
    model: nn.Module,
    data: str | TensorDataset | Sequence[Tensor],
    class_sets: Sequence[Sequence[int]],
    **kwargs: Any,
) -> dict[str, Any]:
    """Joint and per-task accuracy of a shared-head model for sources with disjoint classes.

    ``data`` is a dataset name or ``(x, y)`` tensors whose labels index the shared head; each
    source model was trained on one of ``class_sets``. Returns:

    * ``joint``: on the union of the class sets, ``accuracy`` = argmax over the union's logits
      (the merged model must tell every class apart), plus ``accuracy_all_logits`` (argmax over
      the whole head) and ``loss`` (cross-entropy over the whole head);
    * ``tasks``: per class set, ``accuracy`` = argmax over that set's logits on its own samples
      (the "task head" number), plus ``loss`` and ``n``;
    * ``mean_task_accuracy``.
    """
    sets = [sorted({int(c) for c in s}) for s in class_sets]
    if not sets or any(not s for s in sets):
        raise ValueError("class_sets must be a non-empty list of non-empty class lists")
    union = sorted({c for s in sets for c in s})
    if sum(len(s) for s in sets) != len(union):
        raise ValueError(f"class_sets must be disjoint, got {sets}")

    def run(classes: list[int]) -> dict[str, Any]:
        if isinstance(data, str):
            return _evaluate_tensors(model, data, classes=classes, **kwargs)
        return _evaluate_tensors(model, _restrict(data, classes), classes=classes, **kwargs)

    j = run(union)
    joint = {
        "accuracy": j["subset_accuracy"],
        "accuracy_all_logits": j["accuracy"],
        "loss": j["loss"],
        "n": j["n"],
        "classes": union,
    }
    tasks = []
    for s in sets:
        r = run(s)
        tasks.append(
            {"classes": s, "accuracy": r["subset_accuracy"], "loss": r["loss"], "n": r["n"]}
        )
    return {
        "joint": joint,
        "tasks": tasks,
        "mean_task_accuracy": sum(t["accuracy"] for t in tasks) / len(tasks),
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
        model.load_state_dict(interpolate_state_dicts(sd_a, sd_b, lam))
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
