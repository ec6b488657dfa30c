"""GroupMap: the one representation of an alignment result, and the one weight builder.

For every group and every model ``m`` a :class:`GroupMap` holds a merge matrix ``M_m``
(``n_out x n_m``: merged unit = sum of model units) and an unmerge matrix ``U_m``
(``n_m x n_out``: model unit ~ merged units). A permutation to a reference, a C2M3 universe map,
a ZipIt! zip, a PLeaS partial merge and a clustering are all GroupMaps; permutations are stored as
index vectors plus weights, anything else as dense matrices.

:func:`build_state_dict` is the only place merged weights are made. For a layer
``y_m = W_m z_m + b_m`` the merged layer should produce ``sum_m M_m y_m`` from merged inputs
``z*`` with ``z_m ~ U_m z*``, so

    W* = sum_m  M_m[out] . W_m . U_m[in]        b* = sum_m M_m b_m

generalised to every axis of every tensor: each axis a matmul or convolution contracts
(``Member.role == "in"``) gets ``U_m`` (the axis is multiplied by ``U_m^T``, n_m -> n_out),
every other axis of a group gets ``M_m``. ``M`` carries the model weights (the rows of
``sum_m M_m`` sum to one when merging averages), ``U`` does not; axes outside any group carry the
model weight ``w_m`` instead. Each entry of a term must carry its model weight exactly once, so
produced ("out") group factors apply the row-normalised ``M_m`` and every entry is then scaled by
the mass (row sum of ``M_m``) of the first produced group factor holding it, or by ``w_m`` when
none does (a classifier head, whose output axis is frozen). Entries in different segments of an
axis (q, k and v of a fused projection) get their own mass.

With permutations this is ``sum_m w_m * permute(W_m, perm_m)``: merging a model with an aligned
permuted copy of itself gives the model back for any interpolation weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from symmerge.spec import Member, SymmetrySpec

__all__ = [
    "GroupMap",
    "align_state_dict",
    "build_state_dict",
    "iter_merged_tensors",
    "merge_values",
    "merged_support",
]


# ---------------------------------------------------------------------------------------
# linear maps along one tensor dimension
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Select:
    """A (rows x cols) matrix with at most one nonzero per row: ``A[i, index[i]] = value[i]``.

    ``index[i] == -1`` marks an all-zero row. Permutation maps are of this kind (so are universe
    and partial-merge maps); applying one is an ``index_select``, not a matmul.
    """

    index: torch.Tensor  # (rows,) int64
    value: torch.Tensor  # (rows,) float64
    cols: int

    @property
    def rows(self) -> int:
        return int(self.index.numel())

    def dense(self) -> torch.Tensor:
        out = torch.zeros(self.rows, self.cols, dtype=torch.float64)
        ok = self.index >= 0
        out[torch.nonzero(ok).squeeze(1), self.index[ok]] = self.value[ok]
        return out

    def mass(self) -> torch.Tensor:
        """Row sums."""
        return torch.where(self.index >= 0, self.value, torch.zeros_like(self.value))

    def structure(self) -> _Select:
        """The matrix with every nonzero set to 1 (the row-normalised map)."""
        return _Select(self.index, (self.index >= 0).to(torch.float64), self.cols)

    def apply(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``A @ x`` along ``dim`` (size cols -> rows)."""
        idx = self.index.to(x.device)
        out = x.index_select(dim, idx.clamp(min=0))
        val = self.mass()  # rows with index -1 are zero whatever their stored value
        if bool((val == 1).all()):
            return out
        return out * _along(val.to(x.device, x.dtype), dim, x.dim())


@dataclass(frozen=True)
class _Dense:
    """A general (rows x cols) matrix (zip and cluster maps)."""

    matrix: torch.Tensor  # float64

    @property
    def rows(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def cols(self) -> int:
        return int(self.matrix.shape[1])

    def dense(self) -> torch.Tensor:
        return self.matrix

    def mass(self) -> torch.Tensor:
        """Row sums."""
        return self.matrix.sum(1)

    def structure(self) -> _Dense:
        mass = self.matrix.sum(1, keepdim=True)
        safe = torch.where(mass == 0, torch.ones_like(mass), mass)
        return _Dense(torch.where(mass == 0, torch.zeros_like(self.matrix), self.matrix / safe))

    def apply(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        a = self.matrix.to(x.device, x.dtype)
        return torch.movedim(torch.movedim(x, dim, -1) @ a.T, -1, dim)


def _along(v: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return v.reshape(shape)


_Linear = _Select | _Dense


# ---------------------------------------------------------------------------------------
# GroupMap
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GroupMap:
    """Merge and unmerge maps of one group for N models.

    Build one with :meth:`permutations`, :meth:`partial_permutations`, :meth:`identity` or
    :meth:`from_matrices`; do not construct it field by field. ``weights[m]`` is model m's share
    in tensors that belong to no group; for permutation maps ``M_m = weights[m] * P_m`` and
    ``U_m = P_m^T``. ``perms`` is set for permutation maps only; ``indices`` (with -1 where a
    model has no unit) for partial permutations, such as the matching of a narrow model into a
    wide one.
    """

    merges: tuple[_Linear, ...]
    unmerges: tuple[_Linear, ...]  # stored as U_m^T (n_out x n_m): how an "in" axis is mapped
    weights: tuple[float, ...]
    perms: tuple[torch.Tensor, ...] | None = None
    indices: tuple[torch.Tensor, ...] | None = None
    #: block count of the merged units (GroupNorm groups) when it is not the models' own
    blocks: int | None = None

    # ---- constructors -----------------------------------------------------------------
    @classmethod
    def permutations(
        cls, perms: Sequence[torch.Tensor], weights: Sequence[float] | None = None
    ) -> GroupMap:
        """Unit ``perms[m][i]`` of model m becomes merged unit ``i``, with weight ``weights[m]``.

        The reference model gets ``torch.arange(n)``. ``weights`` default to uniform; for two
        models and interpolation weight lambda pass ``(1 - lam, lam)``.
        """
        perms = [torch.as_tensor(p, dtype=torch.long).cpu() for p in perms]
        if not perms:
            raise ValueError("GroupMap.permutations needs at least one permutation")
        n = int(perms[0].numel())
        for m, p in enumerate(perms):
            if p.shape != (n,) or not torch.equal(p.sort().values, torch.arange(n)):
                raise ValueError(
                    f"perms[{m}] is not a permutation of range({n}) (shape {tuple(p.shape)})"
                )
        w = _weights(weights, len(perms))
        merges = tuple(
            _Select(p, torch.full((n,), wm, dtype=torch.float64), n)
            for p, wm in zip(perms, w, strict=True)
        )
        unmerges = tuple(_Select(p, torch.ones(n, dtype=torch.float64), n) for p in perms)
        return cls(merges, unmerges, w, tuple(perms))

    @classmethod
    def partial_permutations(
        cls,
        indices: Sequence[torch.Tensor],
        sizes: Sequence[int],
        weights: Sequence[float] | None = None,
    ) -> GroupMap:
        """Merged unit ``i`` is unit ``indices[m][i]`` of every model m where that is not -1.

        For models of different widths: the wide model gets ``torch.arange(n)`` and a narrow one
        the wide unit each of its units matches (-1 for wide units left unmatched). A merged
        unit held by every model averages them with ``weights`` (as :meth:`permutations`); one
        held by a subset S gives S the whole mass, ``w_m * sum(w) / sum_S(w)`` (equal shares
        when ``sum_S(w) == 0``), so an unmatched unit is the wide model's unit unchanged. When
        no index is -1 and all sizes equal ``n_out`` this is :meth:`permutations`.
        """
        idx = [torch.as_tensor(p, dtype=torch.long).cpu() for p in indices]
        if not idx or len(sizes) != len(idx):
            raise ValueError(
                f"need one index vector and one size per model, got {len(idx)} and {len(sizes)}"
            )
        n = int(idx[0].numel())
        for m, (p, size) in enumerate(zip(idx, sizes, strict=True)):
            used = p[p >= 0]
            if p.shape != (n,) or bool((p < -1).any() | (p >= size).any()):
                raise ValueError(
                    f"indices[{m}] must have shape ({n},) with entries in [-1, {size}); got "
                    f"shape {tuple(p.shape)}, range [{int(p.min())}, {int(p.max())}]"
                )
            if used.unique().numel() != used.numel():
                raise ValueError(f"indices[{m}] uses a unit twice (not injective)")
        w = _weights(weights, len(idx))
        if all(bool((p >= 0).all()) and s == n for p, s in zip(idx, sizes, strict=True)):
            return cls.permutations(idx, w)
        present = torch.stack([p >= 0 for p in idx]).to(torch.float64)  # (models, n_out)
        if bool((present.sum(0) == 0).any()):
            raise ValueError("every merged unit needs a unit of at least one model")
        wt = torch.tensor(w, dtype=torch.float64)[:, None]
        held = (present * wt).sum(0)
        safe = torch.where(held == 0, torch.ones_like(held), held)
        share = torch.where(held == 0, present / present.sum(0), present * wt / safe)
        mass = share * wt.sum()
        pairs = list(zip(idx, sizes, strict=True))
        merges = tuple(_Select(p, mass[m], int(s)) for m, (p, s) in enumerate(pairs))
        unmerges = tuple(_Select(p, present[m], int(s)) for m, (p, s) in enumerate(pairs))
        return cls(merges, unmerges, w, None, tuple(idx))

    @classmethod
    def identity(
        cls, size: int, num_models: int = 2, weights: Sequence[float] | None = None
    ) -> GroupMap:
        """Every model's unit ``i`` is merged unit ``i`` (plain weighted averaging)."""
        return cls.permutations([torch.arange(size)] * num_models, weights)

    @classmethod
    def from_matrices(
        cls,
        merges: Sequence[torch.Tensor],
        unmerges: Sequence[torch.Tensor],
        weights: Sequence[float] | None = None,
    ) -> GroupMap:
        """A general map from dense ``M_m`` (n_out x n_m) and ``U_m`` (n_m x n_out).

        ``weights`` are the model shares for tensors outside any group; by default they are the
        share of ``M_m`` in the total mass, ``sum(M_m) / sum_k sum(M_k)``.
        """
        if len(merges) != len(unmerges) or not merges:
            raise ValueError(
                f"need one merge and one unmerge matrix per model, got {len(merges)} and "
                f"{len(unmerges)}"
            )
        ms = [torch.as_tensor(a, dtype=torch.float64).cpu() for a in merges]
        us = [torch.as_tensor(a, dtype=torch.float64).cpu() for a in unmerges]
        n_out = ms[0].shape[0] if ms[0].dim() == 2 else -1
        for m, (a, u) in enumerate(zip(ms, us, strict=True)):
            if a.dim() != 2 or u.dim() != 2 or a.shape[0] != n_out or u.shape != a.T.shape:
                raise ValueError(
                    f"model {m}: merge must be (n_out x n_m) and unmerge (n_m x n_out) with one "
                    f"n_out for all models; got {tuple(a.shape)} and {tuple(u.shape)}"
                    f" (n_out of model 0: {n_out})"
                )
        if weights is None:
            mass = torch.stack([a.sum() for a in ms])
            weights = (mass / mass.sum()).tolist() if float(mass.sum()) else None
        return cls(
            tuple(_Dense(a) for a in ms),
            tuple(_Dense(u.T.contiguous()) for u in us),
            _weights(weights, len(ms)),
        )

    @classmethod
    def from_indices(
        cls,
        indices: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        sizes: Sequence[int],
        weights: Sequence[float] | None = None,
        blocks: int | None = None,
    ) -> GroupMap:
        """A map where each merged unit takes at most one unit of each model (stored as
        indices, applied by ``index_select``): merged unit i is
        ``sum_m values[m][i] * unit indices[m][i]`` of model m, index -1 meaning none, and
        model m's unit ``indices[m][i]`` reads merged unit i back (U_m = the 0/1 pattern).
        Partial merges (matched pairs averaged, the rest kept apart) are of this kind.
        """
        if not (len(indices) == len(values) == len(sizes)) or not indices:
            raise ValueError("need one index vector, one value vector and one size per model")
        merges, unmerges = [], []
        n_out = int(torch.as_tensor(indices[0]).numel())
        for m, (idx, val, n) in enumerate(zip(indices, values, sizes, strict=True)):
            idx = torch.as_tensor(idx, dtype=torch.long).cpu()
            val = torch.as_tensor(val, dtype=torch.float64).cpu()
            if idx.shape != (n_out,) or val.shape != (n_out,) or int(idx.max()) >= n:
                raise ValueError(
                    f"model {m}: indices and values must have {n_out} entries in [-1, {n})"
                )
            merges.append(_Select(idx, val, int(n)))
            unmerges.append(_Select(idx, torch.ones(n_out, dtype=torch.float64), int(n)))
        return cls(tuple(merges), tuple(unmerges), _weights(weights, len(indices)), blocks=blocks)

    @classmethod
    def side_by_side(
        cls,
        sizes: Sequence[int],
        weights: Sequence[float] | None = None,
        blocks: Sequence[int] | None = None,
    ) -> GroupMap:
        """Every unit of every model kept, model after model (width ``sum(sizes)``).

        Merged unit ``offset_m + i`` is model m's unit ``i`` with its full value (mass 1), so
        every hidden layer computes each model's units exactly; tensors outside the group (a
        classifier head reading it) get the model weights, so the merged logits are the
        weighted average of the models' logits. ``blocks``: each model's block count
        (GroupNorm groups), so that no merged block spans two models.
        """
        sizes = [int(n) for n in sizes]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"side_by_side needs one positive size per model, got {sizes}")
        total, merges, unmerges, offset = sum(sizes), [], [], 0
        for n in sizes:
            index = torch.full((total,), -1, dtype=torch.long)
            index[offset : offset + n] = torch.arange(n)
            ones = torch.ones(total, dtype=torch.float64)
            merges.append(_Select(index, ones, n))
            unmerges.append(_Select(index, ones, n))
            offset += n
        return cls(
            tuple(merges), tuple(unmerges), _weights(weights, len(sizes)),
            blocks=None if blocks is None else sum(int(b) for b in blocks),
        )  # fmt: skip

    @classmethod
    def duplicate(cls, size: int, copies: int = 2, blocks: int | None = None) -> GroupMap:
        """One model's units each split into ``copies`` copies that share the outgoing weight
        (width ``copies x size``, copy c of unit i at ``c * size + i``): the same function."""
        index = torch.arange(size).repeat(copies)
        merge = _Select(index, torch.ones(copies * size, dtype=torch.float64), size)
        unmerge = _Select(
            index, torch.full((copies * size,), 1.0 / copies, dtype=torch.float64), size
        )
        return cls((merge,), (unmerge,), (1.0,), blocks=None if blocks is None else copies * blocks)

    def select(self, m: int) -> GroupMap:
        """Model m's maps alone, with weight 1 (its own term of the merged weights)."""
        perms = None if self.perms is None else (self.perms[m],)
        merge = self.merges[m]
        if self.perms is not None:  # a permutation's M_m carries w_m; alone it carries 1
            merge = _Select(merge.index, torch.ones_like(merge.value), merge.cols)
        return GroupMap((merge,), (self.unmerges[m],), (1.0,), perms, self.blocks)

    # ---- properties -------------------------------------------------------------------
    @property
    def num_models(self) -> int:
        return len(self.merges)

    @property
    def n_out(self) -> int:
        """Number of merged units."""
        return self.merges[0].rows

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of units of each model, ``n_m``."""
        return tuple(a.cols for a in self.merges)

    @property
    def is_permutation(self) -> bool:
        return self.perms is not None

    def merge_matrix(self, m: int) -> torch.Tensor:
        """Dense ``M_m`` (n_out x n_m), float64."""
        return self.merges[m].dense()

    def unmerge_matrix(self, m: int) -> torch.Tensor:
        """Dense ``U_m`` (n_m x n_out), float64."""
        return self.unmerges[m].dense().T

    def with_weights(self, weights: Sequence[float]) -> GroupMap:
        """The same (partial) permutations with other model weights (e.g. a new lambda)."""
        if self.indices is not None:
            found = GroupMap.partial_permutations(list(self.indices), self.sizes, weights)
            return dataclasses.replace(found, blocks=self.blocks)
        if self.perms is None:
            raise ValueError("with_weights is only defined for permutation maps (and partial ones)")
        return GroupMap.permutations(list(self.perms), weights)

    # ---- application along one tensor dimension --------------------------------------
    def merge(self, m: int, x: torch.Tensor, dim: int, normalized: bool = False) -> torch.Tensor:
        """``M_m`` applied along ``dim`` of ``x`` (size n_m -> n_out); ``normalized`` drops the
        model weight (rows of the map scaled to sum to one)."""
        a = self.merges[m].structure() if normalized else self.merges[m]
        return a.apply(x, dim)

    def mass(self, m: int) -> torch.Tensor:
        """Row sums of ``M_m`` (n_out,): model m's share in each merged unit."""
        return self.merges[m].mass()

    def unmerge(self, m: int, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``U_m^T`` applied along ``dim`` of ``x`` (size n_m -> n_out), for contracted axes."""
        return self.unmerges[m].apply(x, dim)

    # ---- storage ----------------------------------------------------------------------
    def to_state(self) -> dict[str, torch.Tensor]:
        """Tensors that :meth:`from_state` turns back into this map (indices for
        permutations, dense matrices otherwise)."""
        state = {"weights": torch.tensor(self.weights, dtype=torch.float64)}
        if self.blocks is not None:
            state["blocks"] = torch.tensor([self.blocks])
        if self.perms is not None:
            state["perms"] = torch.stack(list(self.perms))
            return state
        if self.indices is not None:
            state["indices"] = torch.stack(list(self.indices))
            state["sizes"] = torch.tensor(self.sizes, dtype=torch.long)
            return state
        for m in range(self.num_models):
            state[f"merge.{m}"] = self.merge_matrix(m)
            state[f"unmerge.{m}"] = self.unmerge_matrix(m)
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> GroupMap:
        weights = state["weights"].tolist()
        if "perms" in state:
            return cls.permutations(list(state["perms"]), weights)
        if "indices" in state:
            return cls.partial_permutations(
                list(state["indices"]), state["sizes"].tolist(), weights
            )
        n = len(weights)
        gm = cls.from_matrices(
            [state[f"merge.{m}"] for m in range(n)],
            [state[f"unmerge.{m}"] for m in range(n)],
            weights,
        )
        if "blocks" in state:
            gm = dataclasses.replace(gm, blocks=int(state["blocks"][0]))
        return gm

    def __repr__(self) -> str:
        kind = "permutation" if self.perms is not None else "dense"
        kind = "partial permutation" if self.indices is not None else kind
        return (
            f"GroupMap({kind}, models={self.num_models}, sizes={self.sizes}, "
            f"n_out={self.n_out}, weights={tuple(round(w, 6) for w in self.weights)})"
        )


def _weights(weights: Sequence[float] | None, n: int) -> tuple[float, ...]:
    if weights is None:
        return tuple([1.0 / n] * n)
    w = tuple(float(x) for x in weights)
    if len(w) != n:
        raise ValueError(f"need one weight per model ({n}), got {len(w)}: {w}")
    return w


# ---------------------------------------------------------------------------------------
# the weight builder
# ---------------------------------------------------------------------------------------


def iter_merged_tensors(
    spec: SymmetrySpec | Sequence[SymmetrySpec],
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    maps: Mapping[str, GroupMap],
    *,
    weights: Sequence[float] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Merged weights ``W* = sum_m M_m[out] . W_m . U_m[in]`` on every axis of every tensor.

    Args:
        spec: the symmetry of the models (all models share its architecture), or one spec per
            model (same group names) for models of different widths: model m's tensors are
            read with model m's layouts (e.g. a flatten of C x H x W with its own C).
        state_dicts: one state dict per model, same keys (and shapes, unless ``spec`` is a
            sequence); model m's tensors must have ``maps[g].sizes[m]`` units of group g.
        maps: GroupMap per group name; groups left out are merged unit by unit (identity,
            equal widths only). The merged width of each group is its map's ``n_out``.
        weights: model shares for entries that no produced group axis holds (tensors outside
            every group, classifier heads). Default: the ``weights`` of the maps (which must
            agree), or uniform when ``maps`` is empty.

    Yields:
        ``(key, merged tensor)`` in model 0's key order, each built when asked for, so state
        dicts read lazily from disk (:mod:`symmerge.lazy`) are merged tensor by tensor.
        Tensors of a group with ``n_out != n`` have the merged width; arithmetic is float32
        or wider and each result has model 0's dtype. Integer tensors
        (``num_batches_tracked``) are copied from model 0.
    """
    n_models = len(state_dicts)
    if n_models == 0:
        raise ValueError("build_state_dict needs at least one state dict")
    specs = [spec] * n_models if isinstance(spec, SymmetrySpec) else check_specs(spec, n_models)
    unknown = sorted(set(maps) - set(specs[0].groups))
    if unknown:
        raise KeyError(f"maps name groups the spec does not have: {unknown}")
    for name, gm in maps.items():
        sizes = tuple(sp.groups[name].size for sp in specs)
        if gm.num_models != n_models or gm.sizes != sizes:
            want = f"size {sizes[0]}" if len(set(sizes)) == 1 else f"sizes {sizes}"
            raise ValueError(
                f"map of group {name!r} is for {gm.num_models} models of sizes {gm.sizes}; "
                f"expected {n_models} models of {want}"
            )
    w = _model_weights(maps, weights, n_models)
    keys = list(state_dicts[0])
    for m, sd in enumerate(state_dicts[1:], 1):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))[:5]
            raise ValueError(f"state dict {m} has different keys than state dict 0: {diff}")
    found = {id(sp): _layouts(sp) for sp in {id(sp): sp for sp in specs}.values()}
    layouts = [found[id(sp)] for sp in specs]
    for key in keys:
        x0 = state_dicts[0][key]
        members = layouts[0].get(key, {})
        if not x0.is_floating_point():
            if members and any(_touches(mem, maps) for mem in members.values()):
                raise ValueError(
                    f"{key!r} is an integer tensor on a permuted axis; cannot merge it"
                )
            yield key, x0.clone()
            continue
        total = None
        for m, sd in enumerate(state_dicts):
            x = x0 if m == 0 else sd[key]
            x = x.float() if x.element_size() < 4 else x  # bf16/fp16 in: float32 arithmetic
            term = _transform(x, layouts[m].get(key, {}), maps, m, w[m])
            if total is not None and term.shape != total.shape:
                raise ValueError(
                    f"{key!r}: model {m} maps to shape {tuple(term.shape)}, model 0 to "
                    f"{tuple(total.shape)}; an axis outside every group differs in width, or "
                    "a group of different widths has no map"
                )
            total = term if total is None else total + term
        yield key, total.to(x0.dtype)


def build_state_dict(
    spec: SymmetrySpec | Sequence[SymmetrySpec],
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    maps: Mapping[str, GroupMap],
    *,
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """The merged state dict, all of :func:`iter_merged_tensors` at once."""
    return dict(iter_merged_tensors(spec, state_dicts, maps, weights=weights))


def merged_support(
    spec: SymmetrySpec | Sequence[SymmetrySpec],
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    maps: Mapping[str, GroupMap],
    keys: Iterable[str],
) -> dict[str, torch.Tensor]:
    """Where the merged tensors ``keys`` can be non-zero: the builder run on all-ones
    tensors (every term is then non-negative, so nothing cancels). A partial merge leaves the
    blocks between two models' private units empty; least squares and the block-sparse
    export keep them so."""
    ones = [
        {k: torch.ones_like(v) if v.is_floating_point() else v for k, v in sd.items()}
        for sd in state_dicts
    ]
    built = build_state_dict(spec, ones, maps)
    return {k: built[k] != 0 for k in keys}


def merge_values(
    values: Sequence[torch.Tensor],
    member: Member | None | Sequence[Member | None],
    maps: Mapping[str, GroupMap],
    dim: int,
    weights: Sequence[float],
) -> torch.Tensor:
    """``sum_m M_m x_m`` along ``dim`` of per-model values laid out like ``member``'s axis,
    mapped as a bias is: what the merged model's units should carry.

    For a layer's inputs pass the member of its weight's input axis, for its outputs that of
    the output axis (q, k, v segments and flatten factors included); for models of different
    widths, one member per model (each traced from its own model). ``member=None`` (an axis
    outside every group: image channels, logits) gives the weighted mean ``sum_m w_m x_m``.
    """
    members = list(member) if isinstance(member, Sequence) else [member] * len(values)
    total: torch.Tensor | None = None
    for m, x in enumerate(values):
        axis = dim % x.dim()
        mem = members[m]
        as_out = None if mem is None else dataclasses.replace(mem, axis=axis, role="out")
        layout = {} if as_out is None else {axis: as_out}
        term = _transform(x, layout, maps, m, float(weights[m]))
        total = term if total is None else total + term
    if total is None:
        raise ValueError("merge_values needs the values of at least one model")
    return total


def check_specs(specs: Sequence[SymmetrySpec], n: int) -> list[SymmetrySpec]:
    """One spec per model, all with the same group names (models of one family, any widths)."""
    specs = list(specs)
    if len(specs) != n:
        raise ValueError(f"need one spec per model ({n}), got {len(specs)}")
    for m, sp in enumerate(specs[1:], 1):
        if set(sp.groups) != set(specs[0].groups):
            diff = sorted(set(sp.groups) ^ set(specs[0].groups))[:5]
            raise ValueError(f"spec {m} has different groups than spec 0: {diff}")
    return specs


def align_state_dict(
    spec: SymmetrySpec,
    state_dict: Mapping[str, torch.Tensor],
    perms: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """``state_dict`` with every group permuted: ``new[i] = old[perms[g][i]]`` on each axis."""
    return spec.permute_state_dict(state_dict, perms)


def _model_weights(
    maps: Mapping[str, GroupMap], weights: Sequence[float] | None, n: int
) -> tuple[float, ...]:
    if weights is not None:
        return _weights(weights, n)
    found = {gm.weights for gm in maps.values()}
    if not found:
        return _weights(None, n)
    first = next(iter(found))
    for other in found:
        if any(abs(a - b) > 1e-12 for a, b in zip(first, other, strict=True)):
            raise ValueError(
                f"the maps disagree on the model weights ({first} vs {other}); pass weights= "
                "to say how tensors outside every group are averaged"
            )
    return first


def _layouts(spec: SymmetrySpec) -> dict[str, dict[int, Member]]:
    """tensor name (and every alias of it) -> axis -> Member."""
    out: dict[str, dict[int, Member]] = {}
    for mem in spec.members():
        for name in [mem.tensor, *spec.aliases.get(mem.tensor, [])]:
            out.setdefault(name, {})[mem.axis] = mem
    return out


def _touches(mem: Member, maps: Mapping[str, GroupMap]) -> bool:
    return any(f.group in maps for s in mem.segments for f in s.factors)


def _transform(
    x: torch.Tensor,
    members: Mapping[int, Member],
    maps: Mapping[str, GroupMap],
    m: int,
    weight: float,
) -> torch.Tensor:
    """Model m's term of the merged tensor: every group factor mapped, model weight once.

    Produced axes get the row-normalised ``M_m`` and contracted axes ``U_m^T``; then every
    entry is scaled by the mass (row sum of ``M_m``) of the first produced group factor that
    holds it, or by ``weight`` when no produced group factor does. Entries of different
    segments of an axis (q, k, v of a fused projection) are thereby weighted independently.
    """
    masses: list[tuple[int, torch.Tensor]] = []
    for axis in sorted(members):
        mem = members[axis]
        covered = sum(s.size for s in mem.segments)
        if covered != x.shape[axis]:
            raise ValueError(
                f"layout of {mem.tensor}[axis {axis}] covers {covered} of {x.shape[axis]} entries"
            )
        parts, mass_parts, has_mass = [], [], False
        for seg in mem.segments:
            piece = x.narrow(axis, seg.offset, seg.size)
            shape = list(piece.shape)
            nf = len(seg.factors)
            piece = piece.reshape(shape[:axis] + [f.size for f in seg.factors] + shape[axis + 1 :])
            first: tuple[int, torch.Tensor] | None = None
            for k, f in enumerate(seg.factors):
                gm = maps.get(f.group) if f.group is not None else None
                if gm is None:
                    continue
                if mem.role == "in":
                    piece = gm.unmerge(m, piece, axis + k)
                else:
                    piece = gm.merge(m, piece, axis + k, normalized=True)
                    if first is None:
                        first = (k, gm.mass(m))
            sizes = list(piece.shape[axis : axis + nf])
            parts.append(piece.reshape(shape[:axis] + [-1] + shape[axis + 1 :]))
            total = parts[-1].shape[axis]
            if first is None:
                mass_parts.append(torch.full((total,), float("nan"), dtype=torch.float64))
            else:
                k, mass = first
                view = [1] * nf
                view[k] = -1
                mass_parts.append(mass.reshape(view).expand(sizes).reshape(-1))
                has_mass = True
        x = parts[0] if len(parts) == 1 else torch.cat(parts, axis)
        if has_mass:
            masses.append((axis, torch.cat(mass_parts)))
    found = [v[~torch.isnan(v)] for _, v in masses]
    if all(bool((v == weight).all()) for v in found):
        return x * weight  # the common case: every entry carries the model weight
    scale = torch.tensor(weight, dtype=torch.float64)
    for axis, v in reversed(masses):  # the first produced axis wins
        v = _along(v, axis, x.dim())
        scale = torch.where(torch.isnan(v), scale, v)
    return x * scale.to(x.device, x.dtype)
