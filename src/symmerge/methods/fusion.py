"""Neuron-interpolation fusion, linear variants: group the parents' neurons, then refit every
layer of the fused model, in order, to the groups' mean outputs on its *own* inputs. The
grouping (:func:`group_neurons`) is shared with the gradient variant ``kf-gradient``
(:mod:`symmerge.methods.fusion_gradient`), which instead trains the fused model with Adam level
by level (:mod:`symmerge.refine.levels`: a layer with its norm, or a residual block; the head).

For every group, the neurons of all N parents (their layer outputs before the nonlinearity,
measured on the fusion data) are clustered into the fused width K: importance-weighted K-means
(``kf-linear``, any N, parents of any widths, any K) or, for two parents of one width, the
optimal one-to-one pairing of the exact grouping cost ``s_a s_b / (s_a + s_b) ||z_a - z_b||^2``
(``hf-linear``). A cluster is a fused neuron whose target is the importance-weighted mean of
its members' outputs (:class:`~symmerge.groupmap.GroupMap`: ``M_m`` the weighted means, ``U_m``
the assignment). The head keeps the identity class map (logits averaged). Then every Linear /
Conv2d layer, from input to output, is refitted by least squares on the fused model's own
inputs, its earlier layers already replaced (:func:`symmerge.refine.lstsq.fit_layers` with
``inputs_from="merged"``): unlike Git Re-Basin or OT fusion, the fused model tracks its own
drift. Norm parameters are the clusters' weighted means; BatchNorm statistics are reset on the
fusion data before each layer is fitted.

Importance scores (``importance=``): ``"uniform"`` (every neuron weight 1), or a captum
attribution of each parent neuron to the true label on the fusion data (which must then be
labelled ``(inputs, labels)`` batches): ``"conductance"``, ``"deeplift"`` or ``"ablation"``
(:func:`symmerge.importance.neuron_importance`, on the same pre-activation layer outputs that are
clustered; needs ``pip install 'symmerge[attribution]'``). Attribution scores are normalised to
sum 1 per parent and group, the paper's default for the linear variants, so that a parent whose
scores run larger does not pull the clusters to itself. They weigh the K-means (or the pair cost)
and each cluster's mean, and the reported objective is the importance-weighted grouping error.

Differences from the official code (AndrewSpano/neuron-interpolation-model-fusion, compared in
``benchmarks/fusion_peer.py``): it groups each layer during the refit, on the fused model's
current inputs (neurons' least-squares predictions), with an unsquared cost; here every group is
clustered once, up front, on the parents' own outputs with the paper's squared cost (Theorem
2a for HF). It solves with an exact pseudo-inverse where this uses a relative ridge toward the
grouped weights (the parents' weights averaged within each cluster). Per-class
head weights are its gradient variant's; for the linear ones they are this library's option.

Reference: "Model Fusion via Neuron Interpolation", arXiv 2507.00037 (algorithms.md §5).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from symmerge.groupmap import GroupMap, build_state_dict, check_specs
from symmerge.importance import IMPORTANCE_METHODS, neuron_importance
from symmerge.methods import MergeResult, register_method
from symmerge.methods.rebasin import Models, _default_collect, _state_dicts
from symmerge.spec import ActivationSite, Group, SymmetrySpec

__all__ = ["Grouping", "group_neurons", "hf_linear", "kf_linear", "logit_kd"]

_PAPER = "Model Fusion via Neuron Interpolation (arXiv 2507.00037)"
_URL = "https://arxiv.org/abs/2507.00037"
_LAYER_OPS = ("linear", "conv1d", "conv2d", "conv3d", "addmm", "matmul")


@register_method("kf-linear", paper=_PAPER, url=_URL, needs_data=True, max_models=None,
                 unequal_widths=True, target_width=True)  # fmt: skip
def kf_linear(
    spec: SymmetrySpec,
    models: Models,
    *,
    data: Iterable[Any] | None = None,
    lam: float = 0.5,
    seed: int = 0,
    width: int | Mapping[str, int] | None = None,
    importance: str = "uniform",
    restarts: int = 10,
    samples: int = 4096,
    ridge: float = 1e-4,
    head: str = "auto",
    class_counts: Sequence[Sequence[float]] | None = None,
    weights: Sequence[float] | None = None,
    specs: Sequence[SymmetrySpec] | None = None,
    collect: Callable[..., Any] | None = None,
    device: str | torch.device | None = None,
) -> MergeResult:
    """KF-Linear: weighted K-means of all parents' neurons into the fused width, then every
    layer refitted in order on the fused model's own inputs (closed-form least squares).

    Args:
        data: the fusion set (batches; labels unused with uniform importance).
        lam: model 1's share of the logits for two parents (``weights`` for more).
        width: fused width of every group (an int) or ``{group: K}``; default model 0's.
        importance: the neurons' weights: ``"uniform"``, or ``"conductance"``, ``"deeplift"``
            or ``"ablation"`` (captum attributions to the true label, summing to 1 per parent
            and group; ``data`` must be labelled; the time goes to ``timings["importance"]``).
        restarts: K-means restarts (farthest-point initialisation, seeded by ``seed``).
        samples: rows (samples x positions) of each group's outputs kept for clustering.
        ridge: relative ridge of the least squares, toward the grouped weights.
        head: the head's target: ``"mean"`` (the parents' logits averaged with the model
            weights), ``"class-share"`` (each class's logit weighted by each parent's share of
            that class's training data, for non-IID parents; needs ``class_counts``) or
            ``"auto"`` (class-share when ``class_counts`` are given).
        class_counts: per parent, its training samples of every class (checkpoints made by
            ``symmerge train`` record them; the command line passes them).
        specs: one spec per parent when their widths differ (``merge`` passes them).
    """
    return _fuse("kf-linear", spec, models, data, lam, seed, width, importance, restarts,
                 samples, ridge, weights, specs, collect, device, head, class_counts)  # fmt: skip


@register_method("hf-linear", paper=_PAPER, url=_URL, needs_data=True, max_models=2)
def hf_linear(
    spec: SymmetrySpec,
    models: Models,
    *,
    data: Iterable[Any] | None = None,
    lam: float = 0.5,
    seed: int = 0,
    importance: str = "uniform",
    samples: int = 4096,
    ridge: float = 1e-4,
    head: str = "auto",
    class_counts: Sequence[Sequence[float]] | None = None,
    collect: Callable[..., Any] | None = None,
    device: str | torch.device | None = None,
) -> MergeResult:
    """HF-Linear: two parents of one width paired one to one by the exact grouping cost (a
    LAP), then every layer refitted in order on the fused model's own inputs (arguments as
    for kf-linear)."""
    return _fuse("hf-linear", spec, models, data, lam, seed, None, importance, 1, samples,
                 ridge, None, None, collect, device, head, class_counts)  # fmt: skip


@register_method("logit-kd", paper=_PAPER + ", its baseline", url=_URL, needs_data=True,
                 max_models=None)  # fmt: skip
def logit_kd(
    spec: SymmetrySpec,
    models: Models,
    *,
    data: Iterable[Any] | None = None,
    lam: float = 0.5,
    seed: int = 0,
    ridge: float = 1e-4,
    head: str = "auto",
    class_counts: Sequence[Sequence[float]] | None = None,
    weights: Sequence[float] | None = None,
    device: str | torch.device | None = None,
) -> MergeResult:
    """Logit distillation into the head only: model 0 with its head refitted (least squares)
    to the parents' logits (averaged, or weighted per class by ``class_counts``), the
    baseline of neuron-interpolation fusion that fits no other level."""
    from symmerge.methods.rebasin import _check_equal_widths, _model_weights
    from symmerge.refine.lstsq import fit_layers

    t0 = time.perf_counter()
    if data is None:
        raise ValueError("the 'logit-kd' method needs data= (the fusion set)")
    if not all(isinstance(m, nn.Module) for m in models):
        raise ValueError("the 'logit-kd' method runs the models: pass nn.Modules")
    models = list(models)
    sds = _state_dicts(models)
    _check_equal_widths(sds, "logit-kd")
    w = _model_weights(len(models), lam, weights, "logit-kd")
    keep = [1.0] + [0.0] * (len(models) - 1)  # the trunk is model 0's
    maps = {g: GroupMap.identity(grp.size, len(models), keep) for g, grp in spec.groups.items()}
    goals, used = _head_targets(spec, models[0], head, class_counts, len(models), "logit-kd")
    if not goals:  # the plain mean: the head's target from the model weights
        from symmerge.groupmap import merge_values

        def mean(ys: list[torch.Tensor]) -> torch.Tensor:
            return merge_values(ys, None, {}, -1, w)

        goals = {layer: mean for layer in _head_layers(spec, models[0])}
    fit = fit_layers(spec, models, maps, sds[0], data, inputs_from="merged", only=list(goals),
                     targets=goals, ridge=ridge, device=device)  # fmt: skip
    log = [f"logit-kd: head {list(goals)} refitted on model 0's features, target {used}"]
    return MergeResult(fit.state_dict, maps, {}, 0, 0.0, time.perf_counter() - t0, log,
                       "logit-kd", {"lstsq": fit.seconds})  # fmt: skip


def producer_sites(group: Group) -> list[ActivationSite]:
    """The outputs of the Linear / Conv layers producing the group (pre-activations), else
    its first module output."""
    outs = [s for s in group.sites if s.module_output]
    return [s for s in outs if s.op in _LAYER_OPS][:1] or outs[:1]


@dataclass
class Grouping:
    """The parents' neurons clustered into fused units (what every fusion variant shares).

    Attributes:
        maps: the GroupMap of every group (``M_m`` weighted means, ``U_m`` the assignment).
        objective: per group, the importance-weighted grouping error per unit of importance.
        mass: per group, every fused unit's importance ``S_k`` (its members' scores summed).
        specs: one spec per parent (the given ``specs``, else ``spec`` repeated).
        weights: the model weights (what no group holds: image channels, logits).
        timings: seconds of ``statistics``, ``importance`` and ``grouping``.
    """

    maps: dict[str, GroupMap]
    objective: dict[str, float]
    mass: dict[str, torch.Tensor]
    specs: list[SymmetrySpec]
    weights: tuple[float, ...]
    timings: dict[str, float]


def group_neurons(
    name: str,
    spec: SymmetrySpec,
    models: Sequence[nn.Module],
    data: Iterable[Any] | None,
    *,
    lam: float = 0.5,
    seed: int = 0,
    width: int | Mapping[str, int] | None = None,
    importance: str = "uniform",
    restarts: int = 10,
    samples: int = 4096,
    weights: Sequence[float] | None = None,
    specs: Sequence[SymmetrySpec] | None = None,
    collect: Callable[..., Any] | None = None,
    device: str | torch.device | None = None,
    init: str = "farthest",
    tol: float = 0.05,
) -> Grouping:
    """Validate the inputs of fusion method ``name`` and cluster every group's neurons: the
    pre-activation outputs of its producing layer (:func:`producer_sites`) on ``data``, by
    importance-weighted K-means into the fused width (``init``, ``restarts``, ``tol`` of
    :func:`~symmerge.solvers.kmeans.weighted_kmeans`), or for ``hf-linear`` by the exact
    pair cost."""
    from symmerge.methods.rebasin import _model_weights
    from symmerge.solvers.kmeans import (
        from_labels,
        hungarian_pairs,
        pair_clusters,
        weighted_kmeans,
    )

    t0 = time.perf_counter()
    if importance not in IMPORTANCE_METHODS:
        raise ValueError(
            f"The 'importance' parameter of {name} must be one of {IMPORTANCE_METHODS}. Got "
            f"{importance!r} instead."
        )
    if data is None:
        raise ValueError(f"the '{name}' method needs data= (the fusion set)")
    if not all(isinstance(m, nn.Module) for m in models):
        raise ValueError(f"the '{name}' method runs the models: pass nn.Modules")
    models = list(models)
    n = len(models)
    all_specs = check_specs(specs, n) if specs is not None else [spec] * n
    sizes = {g: [sp.groups[g].size for sp in all_specs] for g in spec.groups}
    if name == "hf-linear":
        if n != 2:
            raise ValueError(
                f"the 'hf-linear' method merges 2 models, got {n}; use kf-linear (K-means) for "
                "more parents"
            )
        unequal = sorted(g for g, s in sizes.items() if len(set(s)) > 1)
        if unequal:
            raise ValueError(
                "hf-linear pairs two parents of one width one to one; use kf-linear (K-means) "
                f"for parents of different widths ({unequal[:3]})"
            )
    blocked = sorted(g for g, grp in spec.groups.items() if grp.blocks or grp.block_group)
    if blocked:
        raise ValueError(
            f"{name} does not cluster blocked groups (GroupNorm groups, attention heads) yet: "
            f"{blocked[:4]}"
        )
    targets = _targets(spec, sizes, width, name)
    w = _model_weights(n, lam, weights, name)
    t3 = time.perf_counter()
    scores = None
    if importance != "uniform":  # per parent on its own spec, each summing to 1 per group
        scores = [neuron_importance(model, sp, data, method=importance, groups=list(spec.groups),
                                    normalize=True, seed=seed, device=device)
                  for model, sp in zip(models, all_specs, strict=True)]  # fmt: skip
    t_imp = time.perf_counter() - t3
    extra = {} if specs is None else {"specs": all_specs}
    stats = (collect or _default_collect())(spec, models, data, raw_samples=samples,
                                            sites=producer_sites, device=device, seed=seed,
                                            **extra)  # fmt: skip
    t_stats = time.perf_counter() - t0 - t_imp
    t1 = time.perf_counter()
    maps: dict[str, GroupMap] = {}
    objective: dict[str, float] = {}
    mass: dict[str, torch.Tensor] = {}
    for g in spec.groups:
        raw = stats.raw(g)
        if raw is None:
            raise ValueError(f"no activations were collected for group {g!r}")
        z = raw.to(torch.float64).T  # (units of all parents, samples)
        if scores is None:
            s = torch.ones(z.shape[0], dtype=torch.float64)
        else:  # model-major, like the columns of raw()
            s = torch.cat([sc[g] for sc in scores]).to(torch.float64)
        if name == "hf-linear":
            k = sizes[g][0]
            found = from_labels(z, s, pair_clusters(hungarian_pairs(z[:k], z[k:], s[:k], s[k:])))
        else:
            found = weighted_kmeans(z, s, targets[g], init=init, restarts=restarts, tol=tol,
                                    seed=seed)  # fmt: skip
        labels = found.labels.cpu()
        maps[g] = cluster_map(labels, s, sizes[g], targets[g], w)
        mass[g] = torch.zeros(targets[g], dtype=torch.float64).index_add_(0, labels, s)
        objective[g] = found.cost / float(s.sum())  # grouping error per unit of importance
    timings = {"statistics": t_stats, "importance": t_imp,
               "grouping": time.perf_counter() - t1}  # fmt: skip
    return Grouping(maps, objective, mass, all_specs, w, timings)


def _fuse(
    name: str,
    spec: SymmetrySpec,
    models: Models,
    data: Iterable[Any] | None,
    lam: float,
    seed: int,
    width: int | Mapping[str, int] | None,
    importance: str,
    restarts: int,
    samples: int,
    ridge: float,
    weights: Sequence[float] | None,
    specs: Sequence[SymmetrySpec] | None,
    collect: Callable[..., Any] | None,
    device: str | torch.device | None,
    head: str,
    class_counts: Sequence[Sequence[float]] | None,
) -> MergeResult:
    from symmerge.refine.lstsq import fit_layers

    t0 = time.perf_counter()
    grouped = group_neurons(name, spec, models, data, lam=lam, seed=seed, width=width,
                            importance=importance, restarts=restarts, samples=samples,
                            weights=weights, specs=specs, collect=collect,
                            device=device)  # fmt: skip
    models, maps = list(models), grouped.maps
    sds = _state_dicts(models)
    t2 = time.perf_counter()
    start = build_state_dict(grouped.specs if specs is not None else spec, sds, maps)
    goals, head_used = _head_targets(spec, models[0], head, class_counts, len(models), name)
    fit = fit_layers(grouped.specs if specs is not None else spec, models, maps, start, data,
                     inputs_from="merged", targets=goals, ridge=ridge, device=device,
                     dense=True)  # fmt: skip
    t_fit = time.perf_counter() - t2
    log = [
        f"{name}: {len(fit.layers)} layers refitted on the fused model's own inputs, head "
        f"target {head_used}" + (f"; left as grouped: {fit.skipped}" if fit.skipped else "")
    ]
    total = time.perf_counter() - t0
    return MergeResult(fit.state_dict, maps, grouped.objective, 0, 0.0, total, log, name,
                       {**grouped.timings, "lstsq": t_fit},
                       {"bn_statistics": "fitted"})  # fmt: skip


def _head_targets(
    spec: SymmetrySpec,
    model: nn.Module,
    head: str,
    class_counts: Sequence[Sequence[float]] | None,
    n: int,
    name: str,
) -> tuple[dict[str, Callable[[list[torch.Tensor]], torch.Tensor]], str]:
    """The head's target when its logits are weighted per class by each parent's share of
    the class's training data (``{}`` for the plain mean); and which one is used."""
    if head not in ("auto", "mean", "class-share"):
        raise ValueError(
            f"The 'head' parameter of {name} must be 'auto', 'mean' or 'class-share'. Got "
            f"{head!r} instead."
        )
    if head == "mean" or (head == "auto" and class_counts is None):
        return {}, "mean"
    if class_counts is None:
        raise ValueError(f"head='class-share' needs class_counts= (per parent, per class): {name}")
    counts = torch.as_tensor([list(c) for c in class_counts], dtype=torch.float64)
    heads = _head_layers(spec, model)
    if counts.shape[0] != n or len(heads) != 1:
        raise ValueError(
            f"class-share head targets need one class count row per parent ({counts.shape[0]} "
            f"for {n}) and one Linear head (found {sorted(heads)})"
        )
    (layer,) = heads
    width = model.get_submodule(layer).out_features
    if counts.shape[1] != width:
        raise ValueError(f"class_counts have {counts.shape[1]} classes; the head has {width}")
    total = counts.sum(0, keepdim=True)
    share = torch.where(total > 0, counts / total.clamp(min=1e-12), torch.full_like(counts, 1 / n))

    def weighted(ys: list[torch.Tensor]) -> torch.Tensor:
        pi = share.to(ys[0].device, ys[0].dtype)
        return sum(pi[m] * y for m, y in enumerate(ys))  # type: ignore[return-value]

    return {layer: weighted}, "class-share"


def _head_layers(spec: SymmetrySpec, model: nn.Module) -> list[str]:
    """The Linear layers whose output rows are the model's outputs."""
    from symmerge.resize import output_axes

    found = {t.rsplit(".", 1)[0] for t, axis, _ in output_axes(spec) if axis == 0}
    return sorted(h for h in found if isinstance(model.get_submodule(h), nn.Linear))


def cluster_map(
    labels: torch.Tensor,
    importance: torch.Tensor,
    sizes: Sequence[int],
    k: int,
    weights: Sequence[float],
) -> GroupMap:
    """The GroupMap of a clustering of all parents' units (model-major): fused unit c is the
    importance-weighted mean of its members (``M_m``), and every unit reads its cluster
    (``U_m``); ``weights`` share what no group holds (the logits)."""
    s = importance.to(torch.float64)
    mass = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, s)
    merges, unmerges, offset = [], [], 0
    for size in sizes:
        lab, imp = labels[offset : offset + size], s[offset : offset + size]
        one_hot = torch.zeros(size, k, dtype=torch.float64)
        one_hot[torch.arange(size), lab] = 1.0
        merges.append((one_hot * (imp / mass[lab])[:, None]).T)
        unmerges.append(one_hot)
        offset += size
    return GroupMap.from_matrices(merges, unmerges, weights)


def _targets(
    spec: SymmetrySpec,
    sizes: Mapping[str, list[int]],
    width: int | Mapping[str, int] | None,
    name: str,
) -> dict[str, int]:
    """The fused width of every group, in [1, total units of the parents]."""
    out = {g: s[0] for g, s in sizes.items()}
    if isinstance(width, Mapping):
        unknown = sorted(set(width) - set(out))
        if unknown:
            raise ValueError(f"The 'width' parameter of {name} names unknown groups {unknown}")
        out.update(width)
    elif width is not None:
        out = {g: width for g in out}
    for g, k in out.items():
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= sum(sizes[g]):
            raise ValueError(
                f"The fused width of group {g!r} must be an int in [1, {sum(sizes[g])}] (the "
                f"parents' units). Got {k!r} instead."
            )
    return out
