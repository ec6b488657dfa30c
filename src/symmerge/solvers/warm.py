"""Warm-started weight matching: the same matching solved again as one model drifts a little.

:func:`~symmerge.solvers.coordinate.weight_matching` solves every assignment from scratch. A
caller that re-matches after each small change of one model (STE refinement,
:func:`symmerge.refine.ste_refine`, does so every optimizer step) would spend most of its time
recomputing similarities and assignments that barely changed. The solvers here keep state
between calls instead:

- :class:`WarmAssignment`: one exact LAP, warm-started from the last permutation and column
  prices. Prices that still satisfy LP duality certify the permutation without a solve; only
  the rows they do not certify are re-assigned (:func:`~symmerge.solvers.lap.warm_lap`).
- :class:`PlainGroup`: one plain group's weight similarity, kept across calls: a bound
  certificate after the model moved, a low-rank update after a neighbouring permutation moved.
- :class:`WarmMatcher`: coordinate descent with the visiting order and acceptance rule of
  :func:`~symmerge.solvers.coordinate.coordinate_descent`, built on the two above, with a
  sweep cap; without the cap it returns what a full weight matching returns.
- :class:`FullMatcher`: the reference, a complete weight matching per call, warm-started only
  from the last permutations.

A matcher is called as ``matcher(theta, perms, seed) -> (perms, stats)``: ``theta`` the moving
model's tensors that weight matching reads (the fixed model B fills in the rest), ``perms`` B's
permutations from the last call, ``stats`` a :class:`StepStats`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from symmerge.similarity import DEFAULT_IGNORE, WeightSimilarity
from symmerge.solvers.coordinate import coordinates, solve_coordinate, weight_matching
from symmerge.solvers.lap import centre_prices, warm_lap
from symmerge.spec import SymmetrySpec

__all__ = [
    "FullMatcher",
    "Matcher",
    "PlainGroup",
    "StepStats",
    "WarmAssignment",
    "WarmMatcher",
]

Perms = dict[str, Tensor]


@dataclass
class StepStats:
    """What one matcher call did, for the caller's per-call record (``STEResult`` keeps one
    per step).

    Attributes:
        sweeps: coordinate-descent sweeps.
        solves: assignments solved from scratch (``-1``: not counted, :class:`FullMatcher`).
        certified: warm assignments whose last prices proved the permutation still optimal.
        repaired: warm assignments re-solved from their warm start (some rows re-assigned).
        bounded: assignments proven still optimal without computing their similarity
            (:class:`PlainGroup`'s bound certificate).
    """

    sweeps: int = 0
    solves: int = 0
    certified: int = 0
    repaired: int = 0
    bounded: int = 0


#: ``matcher(theta, perms, seed) -> (perms, stats)``: see the module docstring.
Matcher = Callable[[Mapping[str, Tensor], Perms, int], tuple[Perms, StepStats]]


class FullMatcher:
    """A complete weight matching of B to ``theta`` per call (up to 100 sweeps), started
    from the last permutations.

    What the authors of STE matching do every step; it exists as the reference the warm
    matchers must agree with (STE's ``matcher="full"``) and as their baseline in timings.
    Its :class:`StepStats` count sweeps only (``solves`` is ``-1``).
    """

    def __init__(
        self, spec: SymmetrySpec, state_b: Mapping[str, Tensor], kind: str, backend: str
    ) -> None:
        self.spec, self.state_b, self.kind, self.backend = spec, state_b, kind, backend

    def __call__(
        self, theta: Mapping[str, Tensor], perms: Perms, seed: int
    ) -> tuple[Perms, StepStats]:
        state_a = dict(self.state_b)
        state_a.update(theta)
        res = weight_matching(
            self.spec, state_a, self.state_b, init=perms, kind=self.kind, max_sweeps=100,
            seed=seed, backend=self.backend,
        )  # fmt: skip
        return {g: p.cpu() for g, p in res.perms.items()}, StepStats(res.iterations, -1)


class WarmMatcher:
    """Warm weight matching of B to a drifting model ``theta``: assignments kept between
    calls, certified or repaired by :class:`WarmAssignment` instead of re-solved.

    It exists because re-matching after every small move of ``theta`` (STE's optimizer
    steps) mostly re-derives what the last call found. Same visiting order and acceptance
    rule as :func:`~symmerge.solvers.coordinate.coordinate_descent`, so without the sweep
    cap (``max_sweeps``) it returns what a full weight matching returns (up to exact ties);
    a capped call stops early and the next call continues from there. Plain groups (no
    blocks, no shared heads) get a :class:`WarmAssignment`; the others are solved by
    :func:`~symmerge.solvers.coordinate.solve_coordinate`.

    Without ``plain`` (STE's ``matcher="warm"``) every coordinate's similarity comes from
    :class:`~symmerge.similarity.WeightSimilarity`, computed once per call and again for the
    members whose neighbouring permutation changed. With ``plain`` (STE's
    ``matcher="fast"``, kind ``"inner"`` only), groups that :class:`PlainGroup` can serve
    keep their similarity across calls: a move of ``theta`` is first met by a bound
    certificate (no similarity at all), and a neighbour's permutation change by a low-rank
    update of the kept similarity.
    """

    _RTOL = 1e-10  # as coordinate_descent: only real improvements are taken

    def __init__(
        self,
        spec: SymmetrySpec,
        state_b: Mapping[str, Tensor],
        kind: str,
        backend: str,
        max_sweeps: int,
        plain: bool,
    ) -> None:
        self.spec, self.kind, self.backend, self.max_sweeps = spec, kind, backend, max_sweeps
        self.coords = coordinates(spec)
        self.state_b = dict(state_b)
        # plain groups (no blocks, no shared heads) keep a warm assignment between steps
        self.warm = {
            c[0]: WarmAssignment()
            for c in self.coords
            if len(c) == 1 and not spec.groups[c[0]].blocks
        }
        self.plain: dict[str, PlainGroup] = {}
        if plain and kind == "inner":
            for g in self.warm:
                group = PlainGroup.create(spec, g, self.state_b)
                if group is not None:
                    self.plain[g] = group
        self.calls = 0

    def __call__(
        self, theta: Mapping[str, Tensor], perms: Perms, seed: int
    ) -> tuple[Perms, StepStats]:
        self.calls += 1
        state_a = dict(self.state_b)
        state_a.update(theta)
        sims_of: dict[int, WeightSimilarity] = {}  # built on first need, per coordinate
        perms = dict(perms)
        stats = StepStats()
        gen = torch.Generator().manual_seed(seed)
        seen: dict[int, dict[str, Tensor]] = {}  # coordinate -> what it was settled on
        for _ in range(self.max_sweeps):
            stats.sweeps += 1
            improved = 0
            for i in torch.randperm(len(self.coords), generator=gen).tolist():
                coord = self.coords[i]
                plain, warm = self.plain.get(coord[0]), self.warm.get(coord[0])
                if plain is not None and warm is not None:
                    g = coord[0]
                    around = {h: perms[h] for h in plain.neighbours}
                    if i in seen and all(seen[i][h] is p for h, p in around.items()):
                        continue  # settled this step, and no neighbour moved since
                    seen[i] = around
                    if plain.worth_proving(self.calls) and warm.prices is not None:
                        prices = plain.prove(theta, perms, warm.prices, self.calls)
                        if prices is not None:
                            warm.prices = prices
                            stats.bounded += 1
                            continue
                    sims = {g: plain.similarity(theta, perms, self.calls)}
                else:
                    if i not in sims_of:
                        sims_of[i] = WeightSimilarity(
                            self.spec, state_a, self.state_b, groups=list(coord), kind=self.kind
                        )
                    sims = {g: sims_of[i](g, perms).to(torch.float64) for g in coord}
                    if i in seen and all(torch.equal(sims[g], seen[i][g]) for g in coord):
                        continue  # same matrices as when this coordinate was last settled
                    seen[i] = sims
                if warm is not None:
                    g = coord[0]
                    perm, how = warm(sims[g], perms[g])
                    setattr(stats, how, getattr(stats, how) + 1)
                    new = {g: perm}
                else:
                    cpu = {g: c.cpu() for g, c in sims.items()}
                    new = solve_coordinate(self.spec, coord, cpu, backend=self.backend)
                    stats.solves += 1
                if not all(torch.equal(new[g], perms[g]) for g in coord):
                    before = sum(_objective(sims[g], perms[g]) for g in coord)
                    after = sum(_objective(sims[g], new[g]) for g in coord)
                    if after > before + self._RTOL * max(1.0, abs(before)):
                        perms.update({g: p.cpu() for g, p in new.items()})
                        improved += 1
                if plain is not None and warm is not None:
                    g = coord[0]
                    seen[i] = {h: perms[h] for h in plain.neighbours}
                    if warm.prices is not None and not torch.equal(new[g], perms[g]):
                        warm.prices = None  # they certify the permutation not taken
            if not improved:
                break
        return perms, stats


class PlainGroup:
    """The weight similarity of one plain group, kept across calls (``WarmMatcher(plain=True)``,
    STE's ``matcher="fast"``).

    It exists because a drifting model changes the similarity only a little per call: a
    bound often proves the assignment still optimal without computing the similarity at
    all, and a neighbour's permutation move needs only a low-rank update of the kept one.

    A plain group has one group per coordinate, no blocks, and members that each span a
    whole tensor axis, with kind ``"inner"``: ``C = sum_m unfold(theta_m) unfold(P(B_m))^T``
    (rows: the proxy's units, columns: B's units; ``P`` permutes every other axis).

    *Neighbour moves.* When the permutation of another axis of a member changes at the
    positions ``S``, only those slices of ``P(B_m)`` change, and ``C`` is updated by the
    product of the proxy's and the difference's slices (``n x n x |S|`` instead of
    ``n x n x size``), in float64.

    *Proxy steps: a bound certificate.* Let ``theta_ref`` be the proxy ``C`` was computed
    for. Unit ``i`` of the proxy has moved by ``r_i = ||theta_i - theta_ref_i||`` since, so
    by Cauchy-Schwarz ``C_now[i, j] <= C[i, j] + r_i ||B_j||`` (a unit's norm does not
    depend on the permutations of the other axes). In B's aligned order (``C_a[i, k] =
    C[i, p(k)]``, the assignment on the diagonal), the diagonal is computed exactly (one
    elementwise product of the proxy with aligned B), and prices ``w`` prove ``p`` optimal
    with a margin when ``C_a[i, i] - tol_i - w[i] >= U[i, k] - w[k]`` for all ``k != i``,
    ``U`` the bound. Rows the last prices cannot prove get their exact similarity row (a
    ``rows x n`` product) and a warm assignment moves the prices; an improving cycle through
    bounded rows makes those rows exact too. :meth:`prove` gives up (and the caller
    computes ``C``) when a cycle runs through exact rows only, or when more than a quarter
    of the rows would be exact. ``tol_i = 2e-5 ||theta_i|| max_j ||B_j||`` exceeds float32
    round-off, so a proven assignment is also what a full weight matching keeps: every
    other assignment is worse by more than the round-off of its objective.

    The first proof after ``C`` was computed centres the prices
    (:func:`~symmerge.solvers.lap.centre_prices`). While the permutations keep moving, proofs
    keep failing; after a failure the next try waits 1, 2, 4, ... up to ``MAX_WAIT`` steps, and
    a success halves the wait (resetting it to 1 let the occasional success of a moving phase
    restart a run of failing proofs).
    """

    TOL = 2e-5
    MAX_ROWS = 0.25  # exact rows beyond this fraction: computing the similarity is cheaper
    ROUNDS = 4  # rounds of exact rows + warm assignment before giving up
    MAX_WAIT = 64  # after failed proofs, wait up to this many steps before the next try

    def __init__(
        self,
        spec: SymmetrySpec,
        group: str,
        state_b: Mapping[str, Tensor],
        members: list[tuple[str, int]],
        others: list[dict[int, Any]],
    ) -> None:
        self.spec, self.group, self.state_b = spec, group, state_b
        self.members, self.others = members, others
        self.neighbours = tuple(
            sorted(
                {group}
                | {
                    f.group
                    for o in others
                    for mem in o.values()
                    for s in mem.segments
                    for f in s.factors
                    if f.group
                }
            )
        )
        sq = sum(_unit_sums(state_b[k].double() ** 2, ax) for k, ax in members)
        self.b_norm: Tensor = sq.sqrt()  # type: ignore[union-attr]
        self.index: list[dict[int, Tensor]] = [{} for _ in members]  # what pb is permuted by
        self.pb = [state_b[k] for k, _ in members]  # B's members, other axes permuted
        self.theta: list[Tensor] = []  # the proxy C was computed for
        self.a_norm: Tensor | None = None
        self.C: Tensor | None = None  # (n, n) float64, columns in B's unit order
        self.step = -1  # the matcher call that computed C
        self.wait, self.next_try = 1, 0  # back-off of proofs that keep failing
        self.centred = -1  # the matcher call C's prices were last centred for

    @classmethod
    def create(cls, spec: SymmetrySpec, g: str, state_b: Mapping[str, Tensor]) -> PlainGroup | None:
        """The plain group ``g``, or None when a member is not a plain whole axis."""
        by_tensor: dict[str, dict[int, Any]] = {}
        for mem in spec.members():
            by_tensor.setdefault(mem.tensor, {})[mem.axis] = mem
        members, others = [], []
        for mem in spec.groups[g].members:
            w = state_b.get(mem.tensor)
            if mem.tensor.endswith(DEFAULT_IGNORE) or w is None or not w.is_floating_point():
                continue  # what WeightSimilarity leaves out
            seg = mem.segments[0]
            if not (mem.is_plain and seg.offset == 0 and seg.size == w.shape[mem.axis]):
                return None
            members.append((mem.tensor, mem.axis))
            others.append({a: m for a, m in by_tensor[mem.tensor].items() if a != mem.axis})
        return cls(spec, g, state_b, members, others) if members else None

    # -- the similarity --------------------------------------------------------------

    def similarity(self, theta: Mapping[str, Tensor], perms: Perms, step: int) -> Tensor:
        """``C`` for the proxy ``theta`` of matcher call ``step`` (float64, n x n)."""
        if self.step == step and self.C is not None:
            self._sync(perms, update=True)  # same proxy: follow the neighbours' moves
            return self.C
        self._sync(perms, update=False)
        total = None
        for (key, ax), pb in zip(self.members, self.pb, strict=True):
            # the products WeightSimilarity computes, so both give the same numbers
            n = pb.shape[ax]
            a = torch.movedim(theta[key], ax, 0).reshape(n, -1)
            c = a @ torch.movedim(pb, ax, 0).reshape(n, -1).T
            total = c.clone() if total is None else total + c
        assert total is not None
        self.C = total.to(torch.float64)
        self.theta = [theta[k].detach().clone() for k, _ in self.members]
        self.a_norm = None  # the proxy's unit norms, computed when a proof needs them
        self.step = step
        return self.C

    def _sync(self, perms: Perms, update: bool) -> None:
        """Permute ``pb`` to ``perms`` where it differs; with ``update``, update ``C`` too."""
        for m, ((key, ax), others) in enumerate(zip(self.members, self.others, strict=True)):
            for ax2, mem in others.items():
                idx = self.spec.axis_index(mem, perms)
                old = self.index[m].get(ax2)
                if old is None:
                    old = torch.arange(len(idx))
                if torch.equal(idx, old):
                    continue
                where = torch.nonzero(idx != old).flatten()
                base = self.state_b[key]  # B with the other axes' current permutations
                for ax3 in others:
                    if ax3 != ax2 and ax3 in self.index[m]:
                        base = base.index_select(ax3, self.index[m][ax3].to(base.device))
                new_slab = base.index_select(ax2, idx[where].to(base.device))
                if update and self.C is not None:
                    old_slab = self.pb[m].index_select(ax2, where.to(base.device))
                    a = self.theta[m].index_select(ax2, where.to(base.device))
                    n = a.shape[ax]
                    a = torch.movedim(a, ax, 0).reshape(n, -1).double()
                    diff = torch.movedim(new_slab - old_slab, ax, 0).reshape(n, -1).double()
                    self.C += a @ diff.T
                pb = self.pb[m].clone() if self.pb[m] is self.state_b[key] else self.pb[m]
                pb.index_copy_(ax2, where.to(pb.device), new_slab)
                self.pb[m] = pb
                self.index[m][ax2] = idx

    # -- the certificate -------------------------------------------------------------

    def worth_proving(self, step: int) -> bool:
        """Whether to try :meth:`prove` at matcher call ``step``: not when ``C`` is from this
        call already, and after failures only every 2, 4, ... ``MAX_WAIT`` calls (while the
        permutations keep moving, proofs keep failing and cost time)."""
        return self.C is not None and self.step != step and step >= self.next_try

    def prove(
        self, theta: Mapping[str, Tensor], perms: Perms, prices: Tensor, step: int
    ) -> Tensor | None:
        """Prices (B's order) proving ``perms[group]`` optimal for ``theta``, or None."""
        out = self._prove(theta, perms, prices)
        if out is None:
            self.next_try = step + self.wait
            self.wait = min(2 * self.wait, self.MAX_WAIT)
        else:
            self.wait = max(1, self.wait // 2)
        return out

    def _prove(self, theta: Mapping[str, Tensor], perms: Perms, prices: Tensor) -> Tensor | None:
        if self.C is None:
            return None
        if self.a_norm is None:
            sq = sum(
                _unit_sums(t.double() ** 2, ax)
                for t, (_, ax) in zip(self.theta, self.members, strict=True)
            )
            self.a_norm = sq.sqrt()  # type: ignore[union-attr]
        self._sync(perms, update=True)  # C for the old proxy and the current neighbours
        p = perms[self.group].to(self.C.device)
        sq = diag = None
        aligned = []
        for (key, ax), t0, pb in zip(self.members, self.theta, self.pb, strict=True):
            t = theta[key]
            d = t - t0
            sq = _acc(sq, _unit_sums(d * d, ax))
            al = pb.index_select(ax, p)
            aligned.append(al)
            diag = _acc(diag, _unit_sums(t * al, ax))
        assert sq is not None and diag is not None
        n = len(p)
        r = sq.double().sqrt() * (1 + 1e-6)
        b = self.b_norm.to(self.C.device)[p]
        own = diag.double() - self.TOL * (self.a_norm + r) * b.max()  # C_a[i, i] - tol_i
        w = prices.to(self.C.device)[p]
        ca = self.C[:, p]
        if self.centred != self.step:  # first proof since C was computed: centre the prices
            w = torch.from_numpy(centre_prices(ca.cpu().numpy(), np.arange(n), w.cpu().numpy(), 12))
            w = w.to(self.C.device, self.C.dtype)
            self.centred = self.step
        bound = torch.addr(ca, r, b)  # >= C_a[i, k] for k != i
        ar = torch.arange(n, device=self.C.device)
        bound[ar, ar] = own
        rows = torch.nonzero((bound - w[None, :]).amax(1) > own - w).flatten()
        if rows.numel() == 0:
            out = torch.empty_like(w)
            out[p] = w
            return out  # the last prices still prove it
        exact = torch.zeros(n, dtype=torch.bool, device=self.C.device)
        for _ in range(self.ROUNDS):
            if int(exact.sum()) + rows.numel() > self.MAX_ROWS * n:
                return None
            bound[rows] = self._exact_rows(theta, rows, aligned).double()
            bound[rows, rows] = own[rows]
            exact[rows] = True
            xs, vs, _ = warm_lap(bound.cpu().numpy(), np.arange(n), w.cpu().numpy(), rtol=1e-12)
            x = torch.from_numpy(xs).to(self.C.device)
            if torch.equal(x, ar):
                v = torch.from_numpy(vs).to(self.C.device, self.C.dtype)
                out = torch.empty_like(v)
                out[p] = v
                return out
            rows = torch.nonzero((x != ar) & ~exact).flatten()
            if rows.numel() == 0:  # a cycle through exact rows: p may really improve
                return None
        return None

    def _exact_rows(
        self, theta: Mapping[str, Tensor], rows: Tensor, aligned: list[Tensor]
    ) -> Tensor:
        """``C_a[rows, :]`` for the proxy ``theta`` (float32)."""
        out = None
        for (key, ax), al in zip(self.members, aligned, strict=True):
            n = al.shape[ax]
            a = torch.movedim(theta[key].index_select(ax, rows.to(al.device)), ax, 0)
            out = _acc(out, a.reshape(len(rows), -1) @ torch.movedim(al, ax, 0).reshape(n, -1).T)
        assert out is not None
        return out


def _unit_sums(t: Tensor, axis: int) -> Tensor:
    """Sum over every axis but ``axis``: one value per unit."""
    return t.sum(dim=[d for d in range(t.dim()) if d != axis]) if t.dim() > 1 else t


def _acc(total: Tensor | None, x: Tensor) -> Tensor:
    return x if total is None else total + x


class WarmAssignment:
    """Exact LAP ``max sum_i C[i, p(i)]`` warm-started from the last permutation and prices.

    It exists for sequences of slowly changing ``C`` (one group along a drifting model),
    where solving each from scratch repeats work: most calls only need a certificate.
    Column prices ``v`` with ``C[i, p(i)] - v[p(i)] >= C[i, j] - v[j]`` for all ``i, j`` prove
    ``p`` optimal. After a small change of ``C`` most rows still satisfy this with the last
    step's prices; :func:`~symmerge.solvers.lap.warm_lap` re-assigns only the others, by
    shortest augmenting paths (the first call starts from zero prices). Returns ``(p, how)``,
    ``how`` ``"certified"`` (``p`` unchanged, proven optimal) or ``"repaired"`` (improved).
    """

    def __init__(self) -> None:
        self.prices: Tensor | None = None

    def __call__(self, C: Tensor, perm: Tensor) -> tuple[Tensor, str]:
        """``C``: float64 on any device; ``perm``: int64 CPU. Returns a CPU permutation."""
        last = None if self.prices is None else self.prices.cpu().numpy()
        x, v, _ = warm_lap(C.detach().cpu().numpy(), perm.numpy(), last, rtol=1e-12)
        self.prices = torch.from_numpy(v - v.mean()).to(C.device, C.dtype)
        out = torch.from_numpy(x)
        return out, "certified" if torch.equal(out, perm) else "repaired"


def _objective(C: Tensor, perm: Tensor) -> float:
    return float(C[torch.arange(C.shape[0], device=C.device), perm.to(C.device)].sum())
