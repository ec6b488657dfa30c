"""Similarity between the units of two models, in weight space or activation space.

Weight similarity (Git Re-Basin weight matching, MuDSC's weight space): for group ``g`` every
member tensor is unfolded with ``g``'s factor in front and all *other* group axes of model B
permuted by the current permutations, and

    C_g = sum_members  unfold_g(W_A) . unfold_g(P(W_B))^T          (kind "inner")

so ``C_g[i, j]`` scores unit i of A against unit j of B. :class:`WeightSimilarity` unfolds every
tensor once and caches each member's contribution until a neighbouring permutation changes,
which keeps everything outside the assignment solves cheap during coordinate descent. With
``cache=False`` it holds nothing: each call reads the tensors it needs from the state dicts
again (lazy state dicts over files, :mod:`symmerge.lazy`), so memory stays at a few tensors
whatever the model size.

Activation similarity works from streamed statistics (:mod:`symmerge.stats`): the mean and the
second moment of the units of all N models stacked, so a cross block of the ``(N n x N n)``
moment matrix compares model a with model b. One kind, ``"neg_batch_dist"`` (PLeaS's cost), is
a sum over batches of per-batch distances that no moment gives; it reads the statistics'
per-batch accumulator (``collect_statistics(..., batch_distances=True)``) instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from symmerge.spec import Member, SymmetrySpec

__all__ = [
    "ACTIVATION_KINDS",
    "BATCH_KINDS",
    "WEIGHT_KINDS",
    "WeightSimilarity",
    "activation_similarity",
    "activation_similarity_from_moments",
    "mix",
    "weight_similarity",
]

WEIGHT_KINDS = ("inner", "corr", "cos")
ACTIVATION_KINDS = ("inner", "cov", "corr", "neg_dist", "neg_sqdist", "neg_batch_dist")
#: Kinds that need more than moments: only :func:`activation_similarity` on statistics
#: collected with ``batch_distances=True`` computes them.
BATCH_KINDS = ("neg_batch_dist",)

#: State-dict suffixes left out of weight similarity by default: running statistics are
#: permuted with their group but are not weights (Git Re-Basin excludes them too).
DEFAULT_IGNORE = ("running_mean", "running_var")

_EPS = 1e-12


# ---------------------------------------------------------------------------------------
# weight similarity
# ---------------------------------------------------------------------------------------


@dataclass
class _Occurrence:
    """One place where a group's units sit in a tensor: (member, segment, factor)."""

    #: ``(a, b)``: A's tensor unfolded to (n, rest) and B's as (n, *rest_dims), the group's
    #: factor in front; read from the state dicts on each call unless ``held``
    load: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    perms: list[tuple[int, Callable[[Mapping[str, torch.Tensor]], torch.Tensor | None]]]
    keys: tuple[str, ...]  # the groups whose permutations ``perms`` read
    size: int  # elements of A's unfolded tensor
    held: tuple[torch.Tensor, torch.Tensor] | None = None

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.held if self.held is not None else self.load()


@dataclass
class _Cached:
    """A contribution and the permutations it was computed with (``seen``)."""

    total: torch.Tensor
    seen: dict[str, torch.Tensor] = field(default_factory=dict)


class WeightSimilarity:
    """Weight similarity of two models for every group, for repeated calls.

    Args:
        spec: symmetry of the models.
        state_a, state_b: state dicts of the reference model A and the model B to align.
        groups: the groups to prepare (default all).
        kind: ``"inner"`` (Git Re-Basin), ``"corr"`` (Pearson correlation of the concatenated
            unit vectors, MuDSC) or ``"cos"`` (cosine).
        ignore: tensors whose name ends with one of these are left out.
        dtype: arithmetic dtype (float32 by default; float64 for exact ties in tests).
        cache: hold the unfolded tensors and the partial sums between calls (fast); False
            reads every tensor from the state dicts at each call and keeps nothing, for
            models larger than memory.
        spec_b: B's own spec when B has other widths than A (same groups and layouts, other
            sizes); ``spec`` is then A's.

    Call ``sim(group, perms)`` with ``perms`` the current permutations of B (group name ->
    index vector, convention ``new[i] = old[perm[i]]``; missing groups are unpermuted) to get the
    ``(n, n)`` matrix ``C[i, j]`` = similarity of A's unit i and B's unit j. With ``spec_b``
    the matrix is ``(n_A, n_B)`` and every group must be in ``perms``: length ``n_A``, entry -1
    where A's unit has no B unit (B's entries there count as zero).
    """

    def __init__(
        self,
        spec: SymmetrySpec,
        state_a: Mapping[str, torch.Tensor],
        state_b: Mapping[str, torch.Tensor],
        *,
        groups: Sequence[str] | None = None,
        kind: str = "inner",
        ignore: Sequence[str] = DEFAULT_IGNORE,
        dtype: torch.dtype = torch.float32,
        spec_b: SymmetrySpec | None = None,
        cache: bool = True,
    ) -> None:
        if kind not in WEIGHT_KINDS:
            raise ValueError(
                f"The 'kind' parameter of WeightSimilarity must be one of {WEIGHT_KINDS}. "
                f"Got {kind!r} instead."
            )
        self.spec, self.kind, self.dtype, self.cache = spec, kind, dtype, cache
        self.groups = list(spec.groups) if groups is None else list(groups)
        self._occ: dict[str, list[_Occurrence]] = {}
        self._cached: dict[tuple[str, int], _Cached] = {}
        self._norms: dict[str, tuple[torch.Tensor, ...]] = {}
        self.spec_b = spec if spec_b is None else spec_b
        by_tensor, by_tensor_b = _by_tensor(spec), _by_tensor(self.spec_b)
        for g in self.groups:
            occs = []
            for mem in spec.groups[g].members:
                if mem.tensor.endswith(tuple(ignore)):
                    continue
                axes, axes_b = by_tensor[mem.tensor], by_tensor_b.get(mem.tensor, {})
                _check_same_layout(axes, axes_b)
                if cache:
                    wa, wb = state_a[mem.tensor], state_b[mem.tensor]
                    if not wa.is_floating_point():
                        continue
                    pair = _holder(wa.to(dtype), wb.to(dtype))
                else:
                    pair = _reader(state_a, state_b, mem.tensor, dtype)
                shape = spec.shapes.get(mem.tensor) or tuple(state_a[mem.tensor].shape)
                found = _occurrences(g, mem, axes, pair, axes_b, shape)
                for occ in found:
                    if cache:
                        occ.held = occ.load()
                occs += found
            self._occ[g] = occs  # empty for a head group with no tensor of its own
            if kind != "inner" and occs:
                self._norms[g] = _unit_norms(occs, kind)

    def __call__(
        self,
        group: str,
        perms: Mapping[str, torch.Tensor] | None = None,
        *,
        known: Collection[str] | None = None,
    ) -> torch.Tensor:
        """``C`` of ``group``; with ``known``, only from the tensors whose other permuted
        axes all belong to groups in ``known`` (``"corr"`` and ``"cos"``: of those tensors'
        unit vectors)."""
        perms = perms or {}
        total = None
        used = []
        for i, occ in enumerate(self._occ[group]):
            if known is not None and not set(occ.keys) <= set(known):
                continue
            used.append(occ)
            c = self._contribution(group, i, occ, perms)
            total = c.clone() if total is None else total + c  # never hand out the cache
        if total is None:
            n, n_b = self.spec.groups[group].size, self.spec_b.groups[group].size
            return torch.zeros(n, n_b, dtype=self.dtype)
        if self.kind == "inner":
            return total
        every = len(used) == len(self._occ[group])
        sa, sb, na, nb, length = self._norms[group] if every else _unit_norms(used, self.kind)
        if self.kind == "corr":
            total = total - torch.outer(sa, sb) / length
        return total / torch.outer(na, nb)

    def known_share(self, group: str, known: Collection[str]) -> float:
        """The share of ``group``'s weight elements that ``self(group, perms, known=known)``
        reads (1.0 for a group with no tensor)."""
        occs = self._occ[group]
        total = sum(o.size for o in occs)
        if not total:
            return 1.0 if not occs else sum(set(o.keys) <= set(known) for o in occs) / len(occs)
        return sum(o.size for o in occs if set(o.keys) <= set(known)) / total

    def _contribution(
        self, group: str, i: int, occ: _Occurrence, perms: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Occurrence ``i``'s contribution, recomputed only when a permutation it reads
        changed (with ``cache``)."""
        hit = self._cached.get((group, i))
        if hit is not None and all(_same(hit.seen.get(k), perms.get(k)) for k in occ.keys):
            return hit.total
        total = _contribution(occ, perms)
        if self.cache:
            seen = {k: torch.as_tensor(perms[k]).clone() for k in occ.keys if k in perms}
            self._cached[(group, i)] = _Cached(total, seen)
        return total


def _holder(a: torch.Tensor, b: torch.Tensor) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    return lambda: (a, b)


def _reader(
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    name: str,
    dtype: torch.dtype,
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    return lambda: (state_a[name].to(dtype), state_b[name].to(dtype))


def _by_tensor(spec: SymmetrySpec) -> dict[str, dict[int, Member]]:
    out: dict[str, dict[int, Member]] = {}
    for mem in spec.members():
        out.setdefault(mem.tensor, {})[mem.axis] = mem
    return out


def _check_same_layout(axes: Mapping[int, Member], axes_b: Mapping[int, Member]) -> None:
    """A and B must lay a tensor out alike (same axes, segments and groups; sizes may differ)."""

    def shape(axes: Mapping[int, Member]) -> list[Any]:
        return [
            (a, [[f.group or f.size for f in s.factors] for s in axes[a].segments])
            for a in sorted(axes)
        ]

    if shape(axes) != shape(axes_b):
        name = next(iter(axes.values())).tensor
        raise ValueError(
            f"{name!r} is laid out differently in the two specs: {shape(axes)} vs "
            f"{shape(axes_b)}; the models must share one architecture up to group widths"
        )


def _occurrences(
    group: str,
    mem: Member,
    axes: Mapping[int, Member],
    pair: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    axes_b: Mapping[int, Member] | None = None,
    shape: Sequence[int] = (),
) -> list[_Occurrence]:
    """Unfoldings of A's and B's tensor (``pair()`` reads both; ``shape`` is A's) at each
    place ``group`` sits on ``mem``'s axis; B is read with its own layouts ``axes_b``
    (default A's)."""
    out = []
    ax = mem.axis
    axes_b = axes if axes_b is None else axes_b
    others = [axes_b[a] for a in sorted(axes_b) if a != ax]
    for seg, seg_b in zip(mem.segments, axes_b[ax].segments, strict=True):
        for k, f in enumerate(seg.factors):
            if f.group != group:
                continue
            sizes = [fac.size for fac in seg.factors]

            def view(w: torch.Tensor, seg: Any, k: int = k) -> torch.Tensor:
                piece = w.narrow(ax, seg.offset, seg.size)
                shape = list(piece.shape)
                piece = piece.reshape(shape[:ax] + [f.size for f in seg.factors] + shape[ax + 1 :])
                return torch.movedim(piece, ax + k, 0)

            def load(seg: Any = seg, seg_b: Any = seg_b, view: Any = view, n: int = f.size) -> Any:
                wa, wb = pair()
                return view(wa, seg).reshape(n, -1).contiguous(), view(wb, seg_b).contiguous()

            # where each permuted dimension of ``b`` sits after the reshape and the move
            perms: list[tuple[int, Callable[[Mapping[str, torch.Tensor]], Any]]] = []
            keys: list[str] = []
            for o in others:
                pos = o.axis + (len(sizes) - 1 if o.axis > ax else 0)
                pos = pos + 1 if pos < ax + k else pos
                perms.append((pos, lambda p, o=o: _axis_index(o, p)))
                keys += [fa.group for s in o.segments for fa in s.factors if fa.group]
            for j, fa in enumerate(seg.factors):
                if j == k or fa.group is None:
                    continue
                pos = ax + j + (1 if ax + j < ax + k else 0)
                perms.append((pos, lambda p, name=fa.group: p.get(name)))
                keys.append(fa.group)
            size = math.prod(shape) // max(1, shape[ax]) * seg.size if shape else 0
            out.append(_Occurrence(load, perms, tuple(sorted(set(keys))), size))
    return out


def _axis_index(mem: Member, perms: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """:meth:`SymmetrySpec.axis_index` that also takes index vectors with -1 (a unit of A
    that B lacks) and of A's length on B's layout: -1 wherever a factor's index is -1."""
    if not any(f.group in perms for s in mem.segments for f in s.factors):
        return None
    parts = []
    for seg in mem.segments:
        idx, ok = torch.zeros((), dtype=torch.long), torch.ones((), dtype=torch.bool)
        for f in seg.factors:
            p = perms.get(f.group) if f.group is not None else None
            p = torch.arange(f.size) if p is None else torch.as_tensor(p, dtype=torch.long)
            idx, ok = idx.unsqueeze(-1) * f.size + p, ok.unsqueeze(-1) & (p >= 0)
        parts.append(torch.where(ok, idx + seg.offset, -1).reshape(-1))
    return torch.cat(parts)


def _contribution(occ: _Occurrence, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``a @ P(b)^T`` for one occurrence."""
    a, b = occ.tensors()
    for dim, index_of in occ.perms:
        idx = index_of(perms)
        if idx is None:
            continue
        idx = torch.as_tensor(idx, dtype=torch.long)
        if bool((idx < 0).any()):  # A's units that B lacks: zeros
            b = b.index_select(dim, idx.clamp(min=0).to(b.device))
            shape = [1] * b.dim()
            shape[dim] = -1
            b = b * (idx >= 0).to(b.device, b.dtype).reshape(shape)
        elif not torch.equal(idx, torch.arange(idx.numel(), device=idx.device)):
            b = b.index_select(dim, idx.to(b.device))
    return a @ b.reshape(b.shape[0], -1).T


def _same(old: torch.Tensor | None, new: torch.Tensor | None) -> bool:
    if old is None or new is None:
        return old is None and new is None
    return old is new or torch.equal(old, torch.as_tensor(new).to(old.device))


def _unit_norms(occs: Sequence[_Occurrence], kind: str) -> tuple[torch.Tensor, ...]:
    """Per-unit sums and norms of the concatenated unit vectors (permutations of the other
    axes reorder entries within a unit vector, so these never change)."""
    sa = sb = qa = qb = 0
    length = 0.0
    for o in occs:
        a, b = o.tensors()
        b = b.reshape(b.shape[0], -1)
        sa, sb = sa + a.sum(1), sb + b.sum(1)
        qa, qb = qa + (a**2).sum(1), qb + (b**2).sum(1)
        length += a.shape[1]
    if kind == "corr":
        qa, qb = qa - sa**2 / length, qb - sb**2 / length
    na, nb = qa.clamp(min=0).sqrt().clamp(min=_EPS), qb.clamp(min=0).sqrt().clamp(min=_EPS)
    return sa, sb, na, nb, length  # type: ignore[return-value]


def weight_similarity(
    spec: SymmetrySpec,
    group: str,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    perms: Mapping[str, torch.Tensor] | None = None,
    *,
    kind: str = "inner",
    ignore: Sequence[str] = DEFAULT_IGNORE,
) -> torch.Tensor:
    """One-shot :class:`WeightSimilarity` for one group: ``(n, n)``, float32."""
    return WeightSimilarity(spec, state_a, state_b, groups=[group], kind=kind, ignore=ignore)(
        group, perms
    )


# ---------------------------------------------------------------------------------------
# activation similarity
# ---------------------------------------------------------------------------------------


def activation_similarity_from_moments(
    mean: torch.Tensor,
    second_moment: torch.Tensor,
    num_models: int,
    a: int = 0,
    b: int = 1,
    *,
    kind: str = "corr",
    count: int | None = None,
    sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Similarity of model a's and model b's units from stacked moments.

    Args:
        mean: ``(N n,)`` E[z], the units of the N models concatenated model-major (``(sum
            n_m,)`` with ``sizes``).
        second_moment: ``(N n, N n)`` E[z z^T] over samples (positions count as samples).
        num_models: N.
        a, b: the two models compared (rows: a, columns: b).
        kind: ``"inner"`` E[z_a z_b] (proportional to Z_A Z_B^T), ``"cov"``, ``"corr"`` (Pearson;
            a constant unit correlates 0 with everything), ``"neg_sqdist"`` -E[(z_a - z_b)^2],
            ``"neg_dist"`` -||Z_A[i] - Z_B[j]|| over the samples (needs ``count``; equals
            ``-torch.cdist(Z_A, Z_B)``). ``"neg_batch_dist"`` cannot come from moments (see
            :func:`activation_similarity`).
        count: number of samples behind the moments.
        sizes: units of each model when the models differ in width (default: N equal parts).

    Returns:
        ``(n_a, n_b)`` float64 matrix; larger means more similar.
    """
    _check_kind(kind)
    if kind in BATCH_KINDS:
        raise ValueError(
            f"kind={kind!r} sums per-batch distances, which moments cannot give; call "
            "activation_similarity on statistics from collect_statistics(..., "
            "batch_distances=True)"
        )
    mean = torch.as_tensor(mean).to(torch.float64).cpu()
    second = torch.as_tensor(second_moment).to(torch.float64).cpu()
    ra, rb = _blocks(second, num_models, a, b, sizes, "moments")
    if mean.shape != second.shape[:1]:
        raise ValueError(f"mean {tuple(mean.shape)} does not fit {tuple(second.shape)}")
    cross = second[ra, rb]
    if kind == "inner":
        return cross
    diag = torch.diagonal(second)
    if kind in ("neg_sqdist", "neg_dist"):
        sq = (diag[ra][:, None] + diag[rb][None, :] - 2 * cross).clamp(min=0)
        if kind == "neg_sqdist":
            return -sq
        if count is None:
            raise ValueError("kind='neg_dist' needs the sample count")
        return -(sq * count).sqrt()
    cov = cross - torch.outer(mean[ra], mean[rb])
    if kind == "cov":
        return cov
    var = (diag - mean**2).clamp(min=0)
    std_a, std_b = var[ra].sqrt(), var[rb].sqrt()
    denom = torch.outer(std_a, std_b)
    return torch.where(denom > _EPS, cov / denom.clamp(min=_EPS), torch.zeros_like(cov))


def activation_similarity(
    stats: Any,
    group: str,
    a: int = 0,
    b: int = 1,
    *,
    kind: str = "corr",
    num_models: int | None = None,
    sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """:func:`activation_similarity_from_moments` on a statistics object.

    ``stats`` needs ``mean(group)``, ``second_moment(group)`` and ``count(group)`` as produced
    by :func:`symmerge.stats.collect_statistics`. ``num_models`` defaults to
    ``stats.num_models``; ``sizes`` gives each model's units when widths differ.

    ``kind="neg_batch_dist"`` is PLeaS's matching cost, ``-Σ_batches ‖Z_A[i] − Z_B[j]‖₂`` with
    ``Z[i]`` unit i's activations in one batch (not squared, not averaged); it reads
    ``stats.batch_distance(group)``, so collect with ``batch_distances=True``.
    """
    num = num_models if num_models is not None else getattr(stats, "num_models", None)
    if num is None:
        raise ValueError("pass num_models= (the statistics object does not say how many)")
    _check_kind(kind)
    if kind in BATCH_KINDS:
        if not hasattr(stats, "batch_distance"):
            raise ValueError(
                f"kind={kind!r} needs per-batch distances, which {type(stats).__name__} does "
                "not keep; use symmerge.stats.collect_statistics(..., batch_distances=True)"
            )
        dist = torch.as_tensor(stats.batch_distance(group)).to(torch.float64).cpu()
        ra, rb = _blocks(dist, int(num), a, b, sizes, "per-batch distances")
        return -dist[ra, rb]
    count = stats.count(group) if hasattr(stats, "count") else None
    return activation_similarity_from_moments(
        stats.mean(group), stats.second_moment(group), int(num), a, b, kind=kind, count=count,
        sizes=sizes,
    )  # fmt: skip


def _check_kind(kind: str) -> None:
    if kind not in ACTIVATION_KINDS:
        raise ValueError(
            f"The 'kind' parameter of activation_similarity must be one of {ACTIVATION_KINDS}. "
            f"Got {kind!r} instead."
        )


def _blocks(
    matrix: torch.Tensor, num_models: int, a: int, b: int, sizes: Sequence[int] | None, what: str
) -> tuple[slice, slice]:
    """Rows of model a and columns of model b in a stacked ``(Σ n_m, Σ n_m)`` matrix."""
    total = matrix.shape[0]
    sizes = [total // num_models] * num_models if sizes is None else [int(n) for n in sizes]
    if len(sizes) != num_models or sum(sizes) != total or matrix.shape != (total, total):
        raise ValueError(
            f"{what} {tuple(matrix.shape)} do not fit {num_models} models of sizes {sizes}"
        )
    start = [sum(sizes[:m]) for m in range(num_models)]
    return slice(start[a], start[a] + sizes[a]), slice(start[b], start[b] + sizes[b])


def mix(alpha: float, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``alpha * A + (1 - alpha) * B`` (MuDSC: alpha weights the weight-space similarity).

    Both matrices should be on one scale (e.g. two Pearson correlations) for alpha to mean
    anything; normalise them first otherwise.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"The 'alpha' parameter of mix must be a float in [0, 1]. Got {alpha!r} instead."
        )
    if A.shape != B.shape:
        raise ValueError(
            f"mix needs matrices of one shape, got {tuple(A.shape)} and {tuple(B.shape)}"
        )
    B = B.to(A.dtype)
    return alpha * A + (1.0 - alpha) * B
