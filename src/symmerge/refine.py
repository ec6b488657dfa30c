"""Refiners: steps that improve an alignment (or merged weights) after the solver.

:func:`ste_refine` is the straight-through estimator (STE) of Git Re-Basin (Ainsworth et al.,
algorithm "STE matching"), as Yamada et al. use it to merge models trained on different
datasets with a little data. A free proxy ``theta~`` (initialised to theta_A) is trained so
that the permutation weight matching picks for it gives a good midpoint model::

    for each batch (x, y):
        pi        <- WM(theta~, theta_B), warm-started from the previous pi
        theta_ste  = pi(theta_B) + (theta~ - stopgrad(theta~))   (value pi(theta_B))
        theta_mid  = (1 - lam) theta_A + lam theta_ste
        loss      <- CE(f(x; theta_mid), y);  theta~ <- optimizer step on d loss / d theta~

The midpoint forward uses :func:`torch.func.functional_call` on model A, so no module is
copied per step. BatchNorm models get their midpoint statistics recomputed inside the loop
(Yamada et al., ``repair: True``), or use batch statistics (``bn="batch"``).

Why it is fast. The authors redo a full weight matching every step: every sweep recomputes
every similarity and solves every assignment, and that was 82-94% of their step time. Here the
similarity of each group is computed once per step (:class:`WeightSimilarity`, whose cache also
serves later sweeps of the step), and the assignment of a group is warm-started from the last
step instead of solved: column prices from the previous step, corrected by a few Bellman-Ford
passes, *certify* that the permutation is still optimal (LP duality), and when it is not, the
improving cycles those passes reveal are canceled until it is (:class:`_WarmAssignment`). A
LAP is solved only when that does not finish within a budget. The result is the same as
solving every time (up to exact ties); ``matcher="full"`` runs the unmodified weight matching
each step, for comparison.

Reference: Ainsworth, Hayase, Srinivasa, "Git Re-Basin", ICLR 2023, arXiv:2209.04836;
Yamada et al., "Revisiting Permutation Symmetry for Merging Models between Different
Datasets", arXiv:2306.05641.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from symmerge.similarity import DEFAULT_IGNORE, WeightSimilarity
from symmerge.solvers.coordinate import coordinates, solve_coordinate, weight_matching
from symmerge.solvers.lap import solve_lap
from symmerge.spec import SymmetrySpec

__all__ = ["MATCHERS", "OPTIMIZERS", "STEResult", "ste_refine"]

#: ``"fast"``: similarities once per step, certified warm assignments, capped sweeps.
#: ``"full"``: a complete weight matching every step (what the authors' code does).
MATCHERS = ("fast", "full")
OPTIMIZERS = ("sgd", "adam")
_KEEP = ("best", "last")
_PROXY = ("a", "matched")
_BN_MODES = ("reset", "batch")

Batches = Iterable[Any] | Callable[[], Iterable[Any]] | TensorDataset
Perms = dict[str, Tensor]


@dataclass
class STEResult:
    """What :func:`ste_refine` found, with a per-step record.

    Attributes:
        perms: permutations of model B to use (``keep="best"``: those of the step with the
            lowest minibatch midpoint loss, as the authors keep; ``"last"``: the last step's).
        last_perms: the permutations of the last step.
        best_step: index of the step whose permutations are ``perms``.
        losses: midpoint loss of every step, measured with that step's permutations before
            its optimizer update.
        match_seconds: time per step spent matching (similarities, certificates, LAPs).
        train_seconds: time per step spent on the rest: building the midpoint, BN reset,
            forward, backward and optimizer step.
        sweeps: coordinate-descent sweeps per step.
        solves: LAPs solved from scratch per step (``-1``: not counted, ``matcher="full"``).
        certified: assignments proven still optimal (no solve), per step.
        repaired: assignments made optimal again by canceling improving cycles, per step.
        changed: units whose permutation changed during the step.
        init_seconds: time of the initial weight matching (0 when ``init`` was given).
        log: human-readable progress lines.
    """

    perms: Perms
    last_perms: Perms
    best_step: int
    losses: list[float] = field(default_factory=list)
    match_seconds: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    sweeps: list[int] = field(default_factory=list)
    solves: list[int] = field(default_factory=list)
    certified: list[int] = field(default_factory=list)
    repaired: list[int] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)
    init_seconds: float = 0.0
    log: list[str] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def best_loss(self) -> float:
        return self.losses[self.best_step] if self.losses else math.nan

    def summary(self) -> dict[str, float]:
        """Mean seconds per step (matching, the rest) and the matching share of a step."""
        n = max(1, self.steps)
        match, train = sum(self.match_seconds) / n, sum(self.train_seconds) / n
        return {
            "steps": float(self.steps),
            "match_per_step": match,
            "train_per_step": train,
            "step": match + train,
            "match_fraction": match / (match + train) if match + train > 0 else math.nan,
            "first_loss": self.losses[0] if self.losses else math.nan,
            "best_loss": self.best_loss,
            "last_loss": self.losses[-1] if self.losses else math.nan,
        }


def ste_refine(
    spec: SymmetrySpec,
    model: nn.Module,
    state_b: Mapping[str, Tensor],
    data: Batches,
    *,
    init: Mapping[str, Tensor] | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    lr: float = 0.05,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    lam: float = 0.5,
    keep: str = "best",
    proxy: str = "a",
    matcher: str = "fast",
    max_sweeps: int = 3,
    kind: str = "inner",
    bn: str = "reset",
    batch_size: int = 500,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    seed: int = 0,
    backend: str = "scipy",
    log_every: int = 50,
) -> STEResult:
    """Straight-through estimator matching of model B to model A (``model``) on data.

    Args:
        spec: symmetry of the architecture.
        model: model A: its weights are theta_A and it runs the midpoint (not modified).
        state_b: weights of model B (same architecture).
        data: ``(inputs, labels)`` batches: a re-iterable (list, DataLoader), a zero-argument
            factory returning the batches of one epoch, or a ``TensorDataset`` (shuffled
            into ``batch_size`` batches, seeded per epoch). A one-shot iterator is read once
            and reused every epoch.
        init: starting permutations of B (default: weight matching of B to A, 100 sweeps).
        epochs: passes over ``data`` (default 1 when ``steps`` is not given).
        steps: number of optimizer steps (cycles through ``data``); overrides ``epochs``.
        lr, optimizer, momentum, weight_decay: the proxy's optimizer, ``"sgd"`` (with
            momentum, as the authors) or ``"adam"``.
        lam: interpolation weight of B in the midpoint (Yamada et al.: 0.5).
        keep: ``"best"`` (lowest minibatch loss, the authors' choice; noisy for small
            batches) or ``"last"``.
        proxy: initial proxy, ``"a"`` (theta_A: Git Re-Basin and the authors' code) or
            ``"matched"`` (``init`` applied to theta_B; then matching starts with a large
            margin around ``init`` and needs bigger steps to move).
        matcher: ``"fast"`` or ``"full"`` (see :data:`MATCHERS`).
        max_sweeps: sweeps per step of the fast matcher (the full one uses 100); the next
            step continues from where a capped step stopped.
        kind: weight similarity, ``"inner"`` (Git Re-Basin), ``"corr"`` or ``"cos"``.
        bn: BatchNorm models only: ``"reset"`` recomputes the midpoint's running statistics
            on all of ``data`` every step, then runs the batch in eval mode (Yamada et al.);
            ``"batch"`` runs the batch with batch statistics (one pass, much cheaper).
        batch_size: batch size when ``data`` is a ``TensorDataset``.
        loss_fn: ``loss_fn(outputs, labels)``; default cross-entropy on logits (the authors'
            NLL on log-softmax outputs is the same loss).
        seed: seeds the visiting order of the matching and the shuffling of a dataset.
        backend: LAP backend (see :func:`symmerge.solvers.solve_lap`).
        log_every: a log line every this many steps.

    Returns:
        An :class:`STEResult`; ``spec.permute_state_dict(state_b, result.perms)`` is B aligned.
    """
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_choice("keep", keep, _KEEP)
    _check_choice("proxy", proxy, _PROXY)
    _check_choice("matcher", matcher, MATCHERS)
    _check_choice("bn", bn, _BN_MODES)
    if not (isinstance(lam, (int, float)) and 0.0 <= lam <= 1.0):
        raise ValueError(f"The 'lam' parameter of ste must be a float in [0, 1]. Got {lam!r}.")
    if not lr > 0:
        raise ValueError(f"The 'lr' parameter of ste must be a float > 0. Got {lr!r} instead.")
    if steps is not None and steps < 1:
        raise ValueError(f"The 'steps' parameter of ste must be an int >= 1. Got {steps!r}.")
    if epochs is not None and epochs < 1:
        raise ValueError(f"The 'epochs' parameter of ste must be an int >= 1. Got {epochs!r}.")
    if max_sweeps < 1:
        raise ValueError(f"The 'max_sweeps' parameter of ste must be >= 1. Got {max_sweeps!r}.")
    device = _model_device(model)
    state_a = {k: v.detach() for k, v in model.state_dict().items()}
    state_b = {k: torch.as_tensor(v).detach().to(device) for k, v in state_b.items()}
    if set(state_b) != set(state_a):
        diff = sorted(set(state_a) ^ set(state_b))[:5]
        raise ValueError(f"state_b does not fit the model: keys differ ({diff})")
    feed = _Feed(data, batch_size, seed)
    epochs = 1 if epochs is None else epochs

    out = STEResult({}, {}, 0)
    if init is None:
        t0 = time.perf_counter()
        wm = weight_matching(
            spec, state_a, state_b, kind=kind, max_sweeps=100, seed=seed, backend=backend
        )
        perms = wm.perms
        out.init_seconds = time.perf_counter() - t0
        out.log.append(f"init: weight matching, {wm.iterations} sweeps, {out.init_seconds:.3f} s")
    else:
        perms = spec.identity_permutations()
        perms.update({g: torch.as_tensor(p, dtype=torch.long) for g, p in init.items()})
    perms = {g: p.cpu() for g, p in perms.items()}

    keys = _proxy_keys(spec, state_a)
    start = spec.permute_state_dict(state_b, perms) if proxy == "matched" else state_a
    theta = {k: _trainable(start[k]) for k in keys}
    opt: torch.optim.Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD(
            list(theta.values()), lr=lr, momentum=momentum, weight_decay=weight_decay
        )
    else:
        opt = torch.optim.Adam(list(theta.values()), lr=lr, weight_decay=weight_decay)
    match: _Matcher = (
        _FastMatcher(spec, state_b, kind, backend, max_sweeps)
        if matcher == "fast"
        else _FullMatcher(spec, state_b, kind, backend)
    )
    mid = _Midpoint(spec, model, state_a, state_b, float(lam), bn, feed)
    loss_fn = loss_fn or F.cross_entropy

    best = math.inf
    with _forward_mode(model, bn):
        for step, batch in enumerate(feed.batches(epochs, steps)):
            x, y = _split(batch, device)
            t0 = _now(device)
            start_perms = perms
            detached = {k: v.detach() for k, v in theta.items()}
            perms, stats = match(detached, perms, seed * 1_000_003 + step + 1)
            t1 = _now(device)
            params = mid.params(theta, perms)
            loss = loss_fn(functional_call(model, params, (x,)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            t2 = _now(device)
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"STE midpoint loss is {value} at step {step}; lower lr (now {lr})"
                )
            changed = sum(int((perms[g] != start_perms[g]).sum()) for g in perms)
            out.losses.append(value)
            out.match_seconds.append(t1 - t0)
            out.train_seconds.append(t2 - t1)
            out.sweeps.append(stats.sweeps)
            out.solves.append(stats.solves)
            out.certified.append(stats.certified)
            out.repaired.append(stats.repaired)
            out.changed.append(changed)
            if value < best:
                best, out.best_step, out.perms = value, step, perms
            if log_every and step % log_every == 0:
                out.log.append(
                    f"step {step}: loss {value:.4f}, match {t1 - t0:.4f} s "
                    f"({stats.sweeps} sweeps; {stats.certified} certified, {stats.repaired} "
                    f"repaired, {stats.solves} solved), rest {t2 - t1:.4f} s, {changed} units "
                    "moved"
                )
    if not out.losses:
        raise ValueError("the STE data gave no batches")
    out.last_perms = perms
    if keep == "last":
        out.perms, out.best_step = perms, len(out.losses) - 1
    s = out.summary()
    out.log.append(
        f"ste: {out.steps} steps, loss {s['first_loss']:.4f} -> {s['last_loss']:.4f} "
        f"(best {s['best_loss']:.4f} at step {out.best_step}); per step: match "
        f"{s['match_per_step']:.4f} s, rest {s['train_per_step']:.4f} s"
    )
    return out


# ---------------------------------------------------------------------------------------
# matching inside a step
# ---------------------------------------------------------------------------------------


@dataclass
class _StepStats:
    sweeps: int = 0
    solves: int = 0
    certified: int = 0
    repaired: int = 0


_Matcher = Callable[[Mapping[str, Tensor], Perms, int], tuple[Perms, _StepStats]]


class _FullMatcher:
    """The authors' step: a complete weight matching, warm-started."""

    def __init__(
        self, spec: SymmetrySpec, state_b: Mapping[str, Tensor], kind: str, backend: str
    ) -> None:
        self.spec, self.state_b, self.kind, self.backend = spec, state_b, kind, backend

    def __call__(
        self, theta: Mapping[str, Tensor], perms: Perms, seed: int
    ) -> tuple[Perms, _StepStats]:
        state_a = dict(self.state_b)
        state_a.update(theta)
        res = weight_matching(
            self.spec, state_a, self.state_b, init=perms, kind=self.kind, max_sweeps=100,
            seed=seed, backend=self.backend,
        )  # fmt: skip
        return {g: p.cpu() for g, p in res.perms.items()}, _StepStats(res.iterations, -1)


class _FastMatcher:
    """Warm weight matching of B to the proxy: one similarity per group and step, and
    assignments kept, certified or repaired by :class:`_WarmAssignment` instead of re-solved.

    Same visiting order and acceptance rule as :func:`coordinate_descent`, so without the
    sweep cap it returns what a full weight matching returns (up to exact ties).
    """

    _RTOL = 1e-10  # as coordinate_descent: only real improvements are taken

    def __init__(
        self,
        spec: SymmetrySpec,
        state_b: Mapping[str, Tensor],
        kind: str,
        backend: str,
        max_sweeps: int,
    ) -> None:
        self.spec, self.kind, self.backend, self.max_sweeps = spec, kind, backend, max_sweeps
        self.coords = coordinates(spec)
        self.names = [g for c in self.coords for g in c]
        self.state_b = dict(state_b)
        # plain groups (no blocks, no shared heads) keep a warm assignment between steps
        self.warm = {
            c[0]: _WarmAssignment(backend)
            for c in self.coords
            if len(c) == 1 and not spec.groups[c[0]].blocks
        }

    def __call__(
        self, theta: Mapping[str, Tensor], perms: Perms, seed: int
    ) -> tuple[Perms, _StepStats]:
        state_a = dict(self.state_b)
        state_a.update(theta)
        sim = WeightSimilarity(self.spec, state_a, self.state_b, groups=self.names, kind=self.kind)
        perms = dict(perms)
        stats = _StepStats()
        gen = torch.Generator().manual_seed(seed)
        seen: dict[int, dict[str, Tensor]] = {}  # coordinate -> matrices it was settled on
        for _ in range(self.max_sweeps):
            stats.sweeps += 1
            improved = 0
            for i in torch.randperm(len(self.coords), generator=gen).tolist():
                coord = self.coords[i]
                sims = {g: sim(g, perms).to(torch.float64) for g in coord}
                if i in seen and all(torch.equal(sims[g], seen[i][g]) for g in coord):
                    continue  # same matrices as when this coordinate was last settled
                seen[i] = sims
                if coord[0] in self.warm:
                    g = coord[0]
                    perm, how = self.warm[g](sims[g], perms[g])
                    setattr(stats, how, getattr(stats, how) + 1)
                    if how == "certified":
                        continue
                    new = {g: perm}
                else:
                    cpu = {g: c.cpu() for g, c in sims.items()}
                    new = solve_coordinate(self.spec, coord, cpu, backend=self.backend)
                    stats.solves += 1
                before = sum(_objective(sims[g], perms[g]) for g in coord)
                after = sum(_objective(sims[g], new[g]) for g in coord)
                if after > before + self._RTOL * max(1.0, abs(before)):
                    perms.update({g: p.cpu() for g, p in new.items()})
                    improved += 1
            if not improved:
                break
        return perms, stats


class _WarmAssignment:
    """Exact LAP ``max sum_i C[i, p(i)]`` warm-started from the last permutation and prices.

    Column prices ``v`` with ``C[i, p(i)] - v[p(i)] >= C[i, j] - v[j]`` for all ``i, j`` prove
    ``p`` optimal (they and ``u_i = max_j C[i, j] - v[j]`` are optimal LP duals). These are
    difference constraints ``v[j] >= v[k] + G[k, j]``, with ``G[k, j]`` the gain of moving the
    row on column ``k`` to column ``j``, so Bellman-Ford (longest paths) from the previous
    step's prices finds them in a few O(n^2) passes when ``p`` is still optimal. When it is
    not, an improving cycle exists and shows up as a cycle of the Bellman-Ford predecessors;
    moving the rows along it (cycle canceling) improves ``p``, and the passes go on. Within
    ``max_passes`` this ends with ``p`` optimal; otherwise the LAP is solved (scipy/lapx).

    Returns ``(p, how)``, ``how`` one of ``"certified"`` (``p`` unchanged, proven optimal),
    ``"repaired"`` (improved by cycle canceling, optimal) or ``"solves"`` (solved).
    """

    def __init__(self, backend: str, max_passes: int = 128) -> None:
        self.backend, self.max_passes = backend, max_passes
        self.prices: Tensor | None = None

    def __call__(self, C: Tensor, perm: Tensor) -> tuple[Tensor, str]:
        """``C``: float64 on any device; ``perm``: int64 CPU. Returns a CPU permutation."""
        tol = 1e-12 * max(1.0, float(C.abs().max()))
        p, prices, cancels = _bellman_ford(C, perm.to(C.device), self.prices, self.max_passes, tol)
        if prices is not None:
            self.prices = prices
            return p.cpu(), "repaired" if cancels else "certified"
        p = solve_lap(C, backend=self.backend)
        # None when it does not converge (ties, round-off): the next call starts cold
        _, self.prices, _ = _bellman_ford(C, p.to(C.device), None, 4 * len(p), tol)
        return p, "solves"


def _bellman_ford(
    C: Tensor, perm: Tensor, prices: Tensor | None, max_passes: int, tol: float
) -> tuple[Tensor, Tensor | None, int]:
    """Longest-path prices for ``perm``, canceling improving cycles on the way.

    A pass sets ``v[j] = max(v[j], max_i C[i, j] + v[p(i)] - C[i, p(i)])`` (row ``i`` leaving
    its column for ``j``) and remembers the maximizing column as ``j``'s predecessor.
    Returns ``(perm, prices or None if not converged, number of cancel rounds)``.
    """
    n, dev = len(perm), C.device
    ar = torch.arange(n, device=dev)
    x = perm.clone()
    rows = torch.empty_like(x)
    rows[x] = ar  # rows[k]: the row on column k
    ct = C.T.contiguous()  # ct[j, i] = C[i, j]: reduce along rows
    own = C[ar, x]  # C[i, p(i)]
    v = torch.zeros(n, dtype=C.dtype, device=dev) if prices is None else prices.clone()
    pred = ar.clone()
    buf = torch.empty_like(ct)
    cancels = 0
    for _ in range(max_passes):
        best = torch.add(ct, (v[x] - own)[None, :], out=buf).amax(1)
        raised = best > v + tol
        up = torch.nonzero(raised).flatten()
        if up.numel() == 0:
            return x, v - v.mean(), cancels
        pred[up] = x[buf[up].argmax(1)]
        v = torch.where(raised, best, v)
        # with strict updates, a cycle of predecessors is an improving cycle: cancel it
        heads = _cycle_nodes(pred)
        if not heads:
            continue
        p_, r_ = pred.tolist(), rows.tolist()
        done: set[int] = set()
        for c in heads:
            if c in done:
                continue
            cycle = [c]
            while (j := p_[cycle[-1]]) != c:
                cycle.append(j)
            done.update(cycle)
            for r, j in [(r_[p_[j]], j) for j in cycle]:  # row r moves onto column j
                r_[j] = r
        rows = torch.tensor(r_, device=dev)
        x[rows] = ar
        own = C[ar, x]
        pred = ar.clone()
        cancels += 1
    return x, None, cancels


def _cycle_nodes(pred: Tensor) -> list[int]:
    """One node of every non-trivial cycle of the functional graph ``j -> pred[j]``."""
    q = pred.numpy() if pred.device.type == "cpu" else pred  # numpy indexes ~10x faster
    p = q
    for _ in range(max(1, (len(p) - 1).bit_length())):  # 2^levels >= n steps: onto a cycle
        q = q[q]
    on = q[p[q] != q]
    if len(on) == 0:
        return []
    return sorted({int(c) for c in on.tolist()})


def _objective(C: Tensor, perm: Tensor) -> float:
    return float(C[torch.arange(C.shape[0], device=C.device), perm.to(C.device)].sum())


# ---------------------------------------------------------------------------------------
# the midpoint model
# ---------------------------------------------------------------------------------------


class _StraightThrough(torch.autograd.Function):
    """Value ``value`` (no copy), gradient ``scale * grad`` to ``proxy``."""

    @staticmethod
    def forward(ctx: Any, proxy: Tensor, value: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return grad * ctx.scale, None, None


class _Midpoint:
    """The parameters of ``(1 - lam) theta_A + lam theta_ste`` for ``functional_call``.

    The constant part ``(1 - lam) theta_A + lam pi(theta_B)`` is rebuilt only when the
    permutations change; BatchNorm statistics are recomputed per step (``bn="reset"``).
    """

    def __init__(
        self,
        spec: SymmetrySpec,
        model: nn.Module,
        state_a: Mapping[str, Tensor],
        state_b: Mapping[str, Tensor],
        lam: float,
        bn: str,
        feed: _Feed,
    ) -> None:
        self.spec, self.model, self.lam, self.bn, self.feed = spec, model, lam, bn, feed
        self.state_a, self.state_b = state_a, state_b
        self.const: dict[str, Tensor] = {}
        self.perms: Perms | None = None
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.stats_keys = {
            k for k in state_a if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
        }
        self.scratch: nn.Module | None = None
        if self.bns and bn == "reset":
            try:
                from symmerge.renorm import reset_bn
            except ImportError as e:
                raise ImportError(
                    "bn='reset' needs symmerge.renorm.reset_bn; pass bn='batch' to use batch "
                    "statistics instead"
                ) from e
            self.reset_bn = reset_bn
            self.scratch = copy.deepcopy(model)

    def params(self, theta: Mapping[str, Tensor], perms: Perms) -> dict[str, Tensor]:
        if self.perms is None or any(not torch.equal(perms[g], self.perms[g]) for g in perms):
            aligned = self.spec.permute_state_dict(self.state_b, perms)
            lam = self.lam
            self.const = {
                k: ((1 - lam) * a + lam * aligned[k]) if a.is_floating_point() else a
                for k, a in self.state_a.items()
            }
            self.perms = perms
        out = dict(self.const)
        for k, t in theta.items():
            out[k] = _StraightThrough.apply(t, self.const[k], self.lam)
        if self.bns:
            if self.scratch is not None:
                self.scratch.load_state_dict(self.const)
                self.reset_bn(self.scratch, self.feed.epoch(0))
                buffers = dict(self.scratch.named_buffers())
                out.update({k: buffers[k] for k in self.stats_keys if k in buffers})
            else:  # batch statistics: BN layers update their buffers, so give them copies
                out.update({k: self.const[k].clone() for k in self.stats_keys})
        return out


@contextmanager
def _forward_mode(model: nn.Module, bn: str) -> Iterator[None]:
    """Eval mode for the STE forward (no dropout); BatchNorm in train mode for bn="batch".
    Every module's mode is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    if bn == "batch":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


# ---------------------------------------------------------------------------------------
# data and helpers
# ---------------------------------------------------------------------------------------


class _Feed:
    """The batches of each epoch, from a re-iterable, a factory or a TensorDataset."""

    def __init__(self, data: Batches, batch_size: int, seed: int) -> None:
        if data is None:
            raise ValueError(
                "STE needs data: (inputs, labels) batches, a factory returning them, or a "
                "TensorDataset"
            )
        self.data, self.batch_size, self.seed = data, batch_size, seed
        if isinstance(data, TensorDataset) or callable(data):
            return
        if not isinstance(data, Iterable):
            raise TypeError(
                f"STE data must be batches, a factory or a TensorDataset, got {type(data).__name__}"
            )
        if iter(data) is data:  # a one-shot iterator: keep its batches for every epoch
            self.data = list(data)

    def batches(self, epochs: int, steps: int | None) -> Iterator[Any]:
        """``epochs`` passes, or exactly ``steps`` batches (cycling) when given."""
        count = epoch = 0
        while (count < steps) if steps is not None else (epoch < epochs):
            empty = True
            for batch in self.epoch(epoch):
                if steps is not None and count >= steps:
                    return
                empty = False
                count += 1
                yield batch
            if empty:
                raise ValueError("the STE data gave no batches")
            epoch += 1

    def epoch(self, k: int) -> Iterator[Any]:
        data = self.data
        if isinstance(data, TensorDataset):
            from symmerge.data import iterate_batches

            return iter(iterate_batches(data, self.batch_size, shuffle=True, seed=self.seed + k))
        if callable(data):
            return iter(data())
        return iter(data)  # type: ignore[arg-type]


def _split(batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
        raise TypeError(
            f"STE needs labelled (inputs, labels) batches, got {type(batch).__name__}; wrap "
            "whole tensors as TensorDataset(x, y)"
        )
    return batch[0].to(device), batch[1].to(device)


def _proxy_keys(spec: SymmetrySpec, state: Mapping[str, Tensor]) -> list[str]:
    """The tensors weight matching reads: the proxy trains only these."""
    names = {
        m.tensor
        for m in spec.members()
        if not m.tensor.endswith(DEFAULT_IGNORE) and m.tensor in state
    }
    return sorted(k for k in names if state[k].is_floating_point())


def _trainable(t: Tensor) -> Tensor:
    """A proxy leaf: a copy, in float32 when the weights are in a half type."""
    t = t.detach().clone()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.requires_grad_(True)


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _check_choice(name: str, value: Any, options: Sequence[str]) -> None:
    if value not in options:
        raise ValueError(
            f"The '{name}' parameter of ste must be one of {tuple(options)}. Got {value!r} instead."
        )
