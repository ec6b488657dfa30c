"""OT fusion: align every model to a target by exact optimal transport, then average.

Group by group, input to output (:func:`~symmerge.methods.zipit.group_order`), the ground cost
``C_m[i, j]`` between unit i of the target model and unit j of model m is measured, and the
exact transport plan ``T_m = EMD(a, b, C_m)`` (:func:`symmerge.solvers.ot.transport`; ``a``,
``b`` the units' masses) gives the group's :class:`~symmerge.groupmap.GroupMap`:

    M_m = w_m diag(1/a) T_m      target unit i = the plan-weighted mean of model m's units
    U_m = diag(1/b) T_m^T        model m's unit j reads the mean of the target units it is sent to

and :func:`~symmerge.groupmap.build_state_dict` makes ``W* = sum_m M_m W_m U_m``. A plan that
sends every unit whole to one unit (always the case with equal widths and uniform masses: the
EMD optimum is then a permutation / n) is stored as that permutation, so OT fusion with equal
widths and uniform marginals *is* activation matching with ``kind="neg_sqdist"``: the same
permutations and the same merged weights (up to ties, e.g. between dead units, which EMD and
the LAP may break differently).

Ground metrics:

- ``"activation"`` (default): squared Euclidean distance between the units' activations on
  ``data``, from the collected moments (the sites activation matching uses; pass ``collect=``
  for pre-activations, which the paper's activation variant uses).
- ``"weight"``: squared Euclidean distance between the units' incoming weight vectors (every
  produced, "out" tensor of the group: weight rows, bias, norm parameters; not running
  statistics), model m's inputs first mapped into the target's units by the maps of the groups
  before (``W_m U_m``). This sequential alignment needs every other axis of those tensors to
  belong to an earlier group, which holds for chains of Linear/Conv layers (MLPs, VGG) but not
  for residual streams (the stream's producers read block-internal groups that come later):
  such groups raise a ``ValueError``; use the activation ground there. It needs no data, but
  ``merge()`` asks every call of this method for ``data=`` (the registry records the default
  ground); call the method itself (``get_method("otfusion")``) to fuse without data.

Marginals: ``"uniform"``, or ``"importance"``: each unit's mass proportional to its activation
RMS (activation ground) or the norm of its (aligned) incoming weights (weight ground), floored
at 1e-6 of the mean so that no unit is dropped.

Parents of different widths (``specs=``): every model is transported into the units of the
widest one (as weight and activation matching do), which fixes the merged widths; a narrower
model's unit is then spread over several target units. Blocked groups (GroupNorm groups,
attention heads) are refused: a plan may move single units across blocks.

.. warning:: The paper aligns a layer's inputs with ``T diag(1/beta)`` (a target unit reads the
   mean of the model units sent to it). Here model m's unit reads the mean of the target units
   it is sent to (``U_m``, the builder's convention), which does not count a split unit twice
   when widths differ; the two agree whenever the plan is a permutation.

Reference: Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020,
https://arxiv.org/abs/1910.05653
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from symmerge.groupmap import GroupMap, build_state_dict, check_specs
from symmerge.methods import MergeResult, register_method
from symmerge.methods.rebasin import (
    Models,
    _activation_sim,
    _check_equal_widths,
    _default_collect,
    _finish,
    _model_weights,
    _state_dicts,
    _widest,
)
from symmerge.methods.zipit import group_order
from symmerge.similarity import DEFAULT_IGNORE
from symmerge.solvers.ot import as_permutation, transport
from symmerge.spec import SymmetrySpec

__all__ = ["otfusion"]

GROUNDS = ("activation", "weight")
MARGINALS = ("uniform", "importance")

#: One model's plan in one group: (T, a, b), the plan and its row and column masses.
_Plan = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@register_method(
    "otfusion",
    paper="Singh & Jaggi, Model Fusion via Optimal Transport, NeurIPS 2020",
    url="https://arxiv.org/abs/1910.05653",
    needs_data=True,
    max_models=None,
    unequal_widths=True,
)
def otfusion(
    spec: SymmetrySpec,
    models: Models,
    *,
    data: Iterable[Any] | None = None,
    lam: float = 0.5,
    seed: int = 0,
    ground: str = "activation",
    marginals: str | Mapping[str, Sequence[torch.Tensor]] = "uniform",
    width: int | None = None,
    specs: Sequence[SymmetrySpec] | None = None,
    stats: Any = None,
    collect: Callable[..., Any] | None = None,
    device: str | torch.device | None = None,
    weights: Sequence[float] | None = None,
) -> MergeResult:
    """OT fusion: transport every model's units onto the target's by exact OT, then average.

    Args:
        data: batches for the activation ground (tensors or ``(inputs, labels)`` tuples);
            not used by the weight ground.
        lam: interpolation weight of model 1 for two models (``weights=`` for more).
        seed: unused (exact OT is deterministic); kept for the common signature.
        ground: ``"activation"`` (squared distance of unit activations, default) or
            ``"weight"`` (squared distance of incoming weights after aligning their inputs
            with the earlier groups' plans; chains of Linear/Conv layers only).
        marginals: ``"uniform"``, ``"importance"`` (activation RMS or incoming-weight norm),
            or ``{group: [mass of model 0's units, mass of model 1's units, ...]}``.
        width: the merged widths are the target's (the widest model's); ``None`` or that
            width. Methods with ``target_width`` choose other widths.
        specs: one spec per model when their widths differ; the widest model is the target.
        stats: precomputed statistics of all the models (activation ground; skips
            collecting); with ``specs``, their units concatenated model-major.
        collect: ``collect(spec, models, batches, device=...)`` returning statistics; default
            :func:`symmerge.stats.collect_statistics` (passed ``specs=`` with ``specs``).
        device: where statistics are collected.
        weights: model shares of the average (default ``(1 - lam, lam)`` or uniform).

    Returns:
        A :class:`~symmerge.methods.MergeResult`; ``objective[g]`` is the transport cost
        ``sum_m <T_m, C_m>`` of group g (lower is better), ``details`` names the target and
        the groups whose plans were all permutations.

    Example:
        >>> merged, res = merge([a, b], "otfusion", data=batches)  # doctest: +SKIP
        >>> merged, res = merge([a, b], "otfusion", data=batches, ground="weight")  # doctest: +SKIP

    Reference:
        Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020,
        https://arxiv.org/abs/1910.05653
    """
    t0 = time.perf_counter()
    _check_params(ground, marginals)
    n = len(models)
    w = _model_weights(n, lam, weights, "otfusion")
    sds = _state_dicts(models)
    if specs is None:
        _check_equal_widths(sds, "otfusion")
        all_specs, r = [spec] * n, 0
    else:
        all_specs = check_specs(specs, n)
        r = _widest(all_specs)
    target = all_specs[r]
    _check_unblocked(target)
    _check_width(width, target)
    order = group_order(target, list(sds[r]))
    if isinstance(marginals, Mapping):
        _check_given_marginals(marginals, all_specs)
    t_stats = time.perf_counter()
    if ground == "activation":
        stats = _statistics(spec, models, data, stats, collect, device, specs)
        cost_of: _Cost = _ActivationCost(target, stats, n, r, specs is not None, all_specs)
    else:
        cost_of = _WeightCost(all_specs, sds, r, order)
    t_stats = time.perf_counter() - t_stats
    maps: dict[str, GroupMap] = {}
    objective: dict[str, float] = {}
    permuted: list[str] = []
    ot_s = 0.0
    for g in order:
        plans: list[_Plan] = []
        for m in range(n):
            C, s_r, s_m = cost_of(g, m)
            a, b = _masses(marginals, g, r, m, s_r, s_m, C.shape)
            if m == r:
                plans.append((torch.diag(a), a, a))
                continue
            t1 = time.perf_counter()
            T = transport(C, a, b)
            ot_s += time.perf_counter() - t1
            plans.append((T, a, b))
            objective[g] = objective.get(g, 0.0) + float((T * C).sum())
        maps[g] = _group_map(plans, w)
        if maps[g].is_permutation:
            permuted.append(g)
        cost_of.done(g, plans)
    other = time.perf_counter() - t0 - ot_s
    log = [
        f"otfusion: ground={ground}, marginals="
        f"{marginals if isinstance(marginals, str) else 'given'}, target model {r}; "
        f"{len(permuted)} of {len(order)} groups aligned by permutations"
    ]
    maps = {g: maps[g] for g in target.groups}  # the spec's order, as other methods
    res = _finish("otfusion", specs if specs is not None else spec, sds, maps, objective, 0,
                  ot_s, other, log)  # fmt: skip
    if ground == "activation":
        res.timings["statistics"] = t_stats
    res.details.update({"ground": ground, "target": r, "permutation_groups": permuted})
    return res


# ---------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------


def _check_params(ground: str, marginals: Any) -> None:
    if ground not in GROUNDS:
        raise ValueError(
            f"The 'ground' parameter of otfusion must be one of {GROUNDS}. Got {ground!r} instead."
        )
    if not isinstance(marginals, Mapping) and marginals not in MARGINALS:
        raise ValueError(
            f"The 'marginals' parameter of otfusion must be one of {MARGINALS} or a mapping "
            f"group -> one mass vector per model. Got {marginals!r} instead."
        )


def _check_given_marginals(
    marginals: Mapping[str, Sequence[torch.Tensor]], specs: Sequence[SymmetrySpec]
) -> None:
    for g, masses in marginals.items():
        if g not in specs[0].groups:
            raise ValueError(f"marginals name a group the spec does not have: {g!r}")
        sizes = [sp.groups[g].size for sp in specs]
        got = [int(torch.as_tensor(x).numel()) for x in masses]
        if got != sizes:
            raise ValueError(
                f"marginals[{g!r}] must hold one mass vector per model of sizes {sizes}. "
                f"Got sizes {got} instead."
            )


def _check_unblocked(spec: SymmetrySpec) -> None:
    """Blocked groups are refused: a transport plan may split a unit across blocks."""
    heads = {grp.block_group for grp in spec.groups.values() if grp.block_group}
    blocked = [g for g, grp in spec.groups.items() if grp.blocks or grp.block_group or g in heads]
    if blocked:
        raise ValueError(
            f"otfusion transports single units, but groups {blocked[:5]} move in blocks "
            "(GroupNorm groups or attention heads) that a transport plan would split; use "
            "'activation' or 'weight' matching for such models"
        )


def _check_width(width: Any, spec: SymmetrySpec) -> None:
    sizes = {grp.size for grp in spec.groups.values()}
    if width is None or (isinstance(width, int) and sizes == {width}):
        return
    from symmerge.methods import list_methods, method_info

    can = [m for m in list_methods() if method_info(m).target_width]
    raise ValueError(
        "The 'width' parameter of otfusion must be None (the target model's widths, "
        f"{sorted(sizes)}): OT fusion transports into the target's units. Got {width!r} "
        f"instead; methods that choose the merged width: {', '.join(can)}"
    )


# ---------------------------------------------------------------------------------------
# ground costs
# ---------------------------------------------------------------------------------------


class _Cost(Protocol):
    """``cost(g, m) -> (C, s_target, s_m)``: the (n_target x n_m) ground cost of group g and
    the units' importances; ``done(g, plans)`` records a group's plans."""

    def __call__(self, g: str, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def done(self, g: str, plans: Sequence[_Plan]) -> None: ...


def _statistics(
    spec: SymmetrySpec,
    models: Models,
    data: Iterable[Any] | None,
    stats: Any,
    collect: Callable[..., Any] | None,
    device: str | torch.device | None,
    specs: Sequence[SymmetrySpec] | None,
) -> Any:
    if stats is not None:
        return stats
    if data is None:
        raise ValueError(
            "the 'otfusion' method with ground='activation' needs data= (batches) or stats=; "
            "ground='weight' is data-free"
        )
    if not all(isinstance(m, nn.Module) for m in models):
        raise ValueError(
            "otfusion's activation ground runs the models on data: pass nn.Modules, not state "
            "dicts (or pass precomputed stats=)"
        )
    collect = collect or _default_collect()
    extra = {} if specs is None else {"specs": list(specs)}
    return collect(spec, list(models), data, device=device, **extra)


class _ActivationCost:
    """Squared distances between unit activations (minus activation matching's
    ``"neg_sqdist"`` similarity, from the same moments); importance: activation RMS."""

    def __init__(
        self,
        target: SymmetrySpec,
        stats: Any,
        n: int,
        r: int,
        unequal: bool,
        specs: Sequence[SymmetrySpec],
    ) -> None:
        self.target, self.stats, self.n, self.r = target, stats, n, r
        self.specs, self.unequal = specs, unequal

    def __call__(self, g: str, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sizes = [sp.groups[g].size for sp in self.specs]
        sim = _activation_sim(self.target, self.stats, g, m, "neg_sqdist", self.n, False,
                              a=self.r, sizes=sizes if self.unequal else None)  # fmt: skip
        rms = torch.diagonal(torch.as_tensor(self.stats.second_moment(g))).double().cpu()
        start = [sum(sizes[:k]) for k in range(self.n)]
        s = [rms[start[k] : start[k] + sizes[k]].clamp(min=0).sqrt() for k in (self.r, m)]
        return -sim, s[0], s[1]

    def done(self, g: str, plans: Sequence[_Plan]) -> None:
        """Activation costs do not depend on other groups' plans."""


class _WeightCost:
    """Squared distances between the units' incoming weight vectors, model m's inputs mapped
    into the target's units by the plans of the groups already done; importance: their norm."""

    def __init__(
        self,
        specs: Sequence[SymmetrySpec],
        sds: Sequence[Mapping[str, torch.Tensor]],
        r: int,
        order: Sequence[str],
    ) -> None:
        self.specs, self.sds, self.r = specs, sds, r
        self.single: dict[str, list[GroupMap]] = {}  # group -> model m's one-model map
        self.tensors = {g: _producers(specs[r], g) for g in order}
        self.reads = _check_weight_order(specs[r], order, self.tensors)
        self.rows_r = {g: _unit_rows(specs[r], sds[r], g, self.tensors[g]) for g in order}

    def __call__(self, g: str, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_r = self.rows_r[g]
        if m == self.r:
            norm = x_r.norm(dim=1)
            return torch.zeros(len(x_r), len(x_r), dtype=torch.float64), norm, norm
        sub = {k: self.sds[m][k] for k in self.tensors[g]}
        maps = {h: self.single[h][m] for h in self.reads[g]}
        aligned = build_state_dict(self.specs[m], [sub], maps, weights=[1.0]) if maps else sub
        x_m = _unit_rows(self.specs[m], aligned, g, self.tensors[g])
        return torch.cdist(x_r, x_m).square(), x_r.norm(dim=1), x_m.norm(dim=1)

    def done(self, g: str, plans: Sequence[_Plan]) -> None:
        self.single[g] = [_group_map([p], [1.0]) for p in plans]


def _producers(spec: SymmetrySpec, g: str) -> list[str]:
    """The tensors that produce group g's units (its "out" members), running statistics
    excluded, in member order."""
    names = [
        mem.tensor
        for mem in spec.groups[g].members
        if mem.role == "out" and not mem.tensor.endswith(DEFAULT_IGNORE)
    ]
    names = list(dict.fromkeys(names))
    if not names:
        raise ValueError(
            f"group {g!r} has no produced weight tensor, so the weight ground metric cannot "
            "compare its units; use ground='activation'"
        )
    return names


def _check_weight_order(
    spec: SymmetrySpec, order: Sequence[str], tensors: Mapping[str, Sequence[str]]
) -> dict[str, list[str]]:
    """For every group, the earlier groups its producers read on their other axes; raises
    where a producer reads a group not aligned yet (residual streams) or lays another group
    out in one product with the units (the rows could not be compared)."""
    layout: dict[str, dict[int, Any]] = {}
    for mem in spec.members():  # a (tensor, axis) has the same segments in every group
        layout.setdefault(mem.tensor, {}).setdefault(mem.axis, mem.segments)
    reads: dict[str, list[str]] = {}
    before: set[str] = set()
    for g in order:
        units = {(mem.tensor, mem.axis) for mem in spec.groups[g].members if mem.role == "out"}
        found: list[str] = []
        for t in tensors[g]:
            for axis, segments in layout.get(t, {}).items():
                groups = [f.group for seg in segments for f in seg.factors if f.group]
                if (t, axis) in units:  # the unit axis: other segments hold other units
                    for seg in segments:
                        inner = {f.group for f in seg.factors if f.group}
                        if g in inner and inner != {g}:
                            raise ValueError(
                                f"group {g!r}: {t!r} lays its units out in one product with "
                                f"{sorted(inner - {g})}; the weight ground metric cannot "
                                "compare such units; use ground='activation'"
                            )
                    continue
                for h in groups:
                    if h not in before:
                        raise ValueError(
                            "the weight ground metric aligns each group's incoming weights "
                            f"with the plans of the groups before it (input to output), but "
                            f"{t!r}, which produces group {g!r}, also reads group {h!r}, "
                            "which is not aligned yet (a residual stream?); use "
                            "ground='activation' for this model"
                        )
                    found.append(h)
        reads[g] = list(dict.fromkeys(found))
        before.add(g)
    return reads


def _unit_rows(
    spec: SymmetrySpec, sd: Mapping[str, torch.Tensor], g: str, tensors: Sequence[str]
) -> torch.Tensor:
    """(n, features) float64: every unit's entries in the producing tensors, concatenated."""
    wanted = set(tensors)
    parts = []
    for mem in spec.groups[g].members:
        x = sd.get(mem.tensor)
        if mem.role != "out" or mem.tensor not in wanted or x is None:
            continue
        if not x.is_floating_point():
            continue
        ax = mem.axis
        for seg in mem.segments:
            for k, f in enumerate(seg.factors):
                if f.group != g:
                    continue
                piece = x.narrow(ax, seg.offset, seg.size)
                shape = list(piece.shape)
                sizes = [fac.size for fac in seg.factors]
                piece = piece.reshape(shape[:ax] + sizes + shape[ax + 1 :])
                parts.append(torch.movedim(piece, ax + k, 0).reshape(f.size, -1))
    return torch.cat(parts, 1).to(torch.float64)


# ---------------------------------------------------------------------------------------
# marginals and maps
# ---------------------------------------------------------------------------------------


def _masses(
    marginals: str | Mapping[str, Sequence[torch.Tensor]],
    g: str,
    r: int,
    m: int,
    s_r: torch.Tensor,
    s_m: torch.Tensor,
    shape: torch.Size,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability vectors of the target's and model m's units."""
    if isinstance(marginals, Mapping):
        if g in marginals:
            given = marginals[g]
            return _normalised(given[r]), _normalised(given[m])
        marginals = "uniform"
    if marginals == "uniform":
        n, k = shape
        return (torch.full((n,), 1.0 / n, dtype=torch.float64),
                torch.full((k,), 1.0 / k, dtype=torch.float64))  # fmt: skip
    return _importance(s_r), _importance(s_m)


def _normalised(x: Any) -> torch.Tensor:
    v = torch.as_tensor(x).detach().to("cpu", torch.float64).reshape(-1)
    if not bool(torch.isfinite(v).all()) or bool((v <= 0).any()):
        raise ValueError(
            "The 'marginals' parameter of otfusion must give positive finite unit masses. "
            f"Got min {float(v.min())} instead."
        )
    return v / v.sum()


def _importance(s: torch.Tensor) -> torch.Tensor:
    """Importances as masses, floored at 1e-6 of the mean (a dead unit still gets a share:
    its merged row is then well defined); all zero gives uniform."""
    s = s.clamp(min=0).to(torch.float64)
    total = float(s.sum())
    if total <= 0:
        return torch.full_like(s, 1.0 / s.numel())
    s = s + 1e-6 * total / s.numel()
    return s / s.sum()


def _group_map(plans: Sequence[_Plan], w: Sequence[float]) -> GroupMap:
    """``M_m = w_m diag(1/a) T_m`` and ``U_m = diag(1/b) T_m^T``; plans that all send units
    whole (permutations) give a permutation map."""
    perms = [as_permutation(T) for T, _, _ in plans]
    if all(p is not None for p in perms):
        return GroupMap.permutations(perms, w)  # type: ignore[arg-type]
    merges = [wm * T / a[:, None] for (T, a, _), wm in zip(plans, w, strict=True)]
    unmerges = [T.T / b[:, None] for T, _, b in plans]
    return GroupMap.from_matrices(merges, unmerges, w)
