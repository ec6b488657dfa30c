"""STE refinement: a weight-matching permutation improved on a little data.

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
every similarity and solves every assignment (82-94% of their step time, more as the
permutations start to move). The matchers live in :mod:`symmerge.solvers.warm`.
``matcher="warm"`` computes each group's similarity at most once per step
(:class:`~symmerge.similarity.WeightSimilarity`, whose cache also serves later sweeps) and
warm-starts each assignment from the last step instead of solving it: column prices from
the previous step *certify* that the permutation is still optimal (LP duality), and only
the rows they do not certify are re-assigned (Jonker-Volgenant row reduction, then shortest
augmenting paths, compiled: :class:`~symmerge.solvers.warm.WarmAssignment`,
:func:`~symmerge.solvers.lap.warm_lap`). The default ``matcher="fast"`` also keeps each plain
group's similarity across steps (:class:`~symmerge.solvers.warm.PlainGroup`): after a proxy
step it first tries to prove the assignment still optimal from a bound on how far the
similarity can have moved (Cauchy-Schwarz: each unit's movement times the norm of B's
units), with exact similarity rows only where the bound is loose, and computes the
similarity only when that fails; when a neighbouring permutation moves, the kept similarity
gets a low-rank update instead of a new product. A step whose
batch and permutations are those of the step before (condensed or coreset data in one
batch) reuses that step's loss and gradient instead of a forward/backward pass.

Results. ``"fast"`` and ``"warm"`` take the permutations a full weight matching takes from
the same start, visiting order and acceptance rule (``matcher="full"``, the unmodified
weight matching each step) as long as ``max_sweeps`` does not cut a step short: exactly for
certified and bound-proven assignments (the proofs keep a margin above float32 round-off),
and up to round-off ties after low-rank updates (float64 updates of a float32 product,
where a fresh product has float32 round-off). With the default ``max_sweeps=3`` a step may
stop before the weight matching converges; the next step continues from there.

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

from symmerge.io import load_state
from symmerge.similarity import DEFAULT_IGNORE
from symmerge.solvers.coordinate import weight_matching
from symmerge.solvers.warm import FullMatcher, Matcher, WarmMatcher
from symmerge.spec import SymmetrySpec

__all__ = ["MATCHERS", "OPTIMIZERS", "STEResult", "ste_refine"]

#: ``"fast"``: ``"warm"``, plus similarities kept across steps: bound proofs instead of new
#: products after a proxy step, low-rank updates after a neighbour's permutation moved.
#: ``"warm"``: similarities at most once per step, certified warm assignments, capped sweeps.
#: ``"full"``: a complete weight matching every step (what the authors' code does).
MATCHERS = ("fast", "warm", "full")
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
        repaired: assignments re-solved from their warm start (some rows re-assigned), per step.
        bounded: assignments proven still optimal without computing their similarity
            (``matcher="fast"``), per step.
        reused: whether the step skipped its forward and backward pass: the batch and the
            permutations were those of the step before, so the midpoint, its loss and the
            proxy's gradient were too (condensed or coreset data in one batch).
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
    bounded: list[int] = field(default_factory=list)
    reused: list[bool] = field(default_factory=list)
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
        matcher: ``"fast"``, ``"warm"`` or ``"full"`` (see :data:`MATCHERS` and "Results"
            above); all three give the same permutations when ``max_sweeps`` does not cut
            a step short (up to round-off ties).
        max_sweeps: sweeps per step of the fast and warm matchers (the full one uses 100);
            the next step continues from where a capped step stopped. Fewer sweeps are
            faster and about as accurate on the MNIST/Fashion-MNIST pair (1: ~10% faster
            steps on full data; 3: +0.5 points on a coreset; benchmarks/results/
            ste_speed_summary.md).
        kind: weight similarity, ``"inner"`` (Git Re-Basin), ``"corr"`` or ``"cos"``.
        bn: BatchNorm models only: ``"reset"`` recomputes the midpoint's running statistics
            on all of ``data`` at every step whose permutations moved, then runs the batch in
            eval mode (Yamada et al.);
            ``"batch"`` runs the batch with batch statistics (one pass, much cheaper).
        batch_size: batch size when ``data`` is a ``TensorDataset``.
        loss_fn: ``loss_fn(outputs, labels)``; default cross-entropy on logits (the authors'
            NLL on log-softmax outputs is the same loss). It must be a function of its
            arguments: a step with the previous step's batch (the same or equal tensors)
            and permutations reuses that step's loss and gradient (``result.reused``).
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
    upcast = any(p.dtype in _HALF for p in model.parameters())
    if upcast:  # the proxy's gradient steps are float32: so are the midpoint and its inputs
        model = copy.deepcopy(model).float()
    state_a = {k: v.detach() for k, v in model.state_dict().items()}
    cast = _float32 if upcast else (lambda t: t)
    state_b = {k: cast(torch.as_tensor(v).detach().to(device)) for k, v in state_b.items()}
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
    match: Matcher = (
        FullMatcher(spec, state_b, kind, backend)
        if matcher == "full"
        else WarmMatcher(spec, state_b, kind, backend, max_sweeps, plain=matcher == "fast")
    )
    mid = _Midpoint(spec, model, state_a, state_b, float(lam), bn, feed)
    loss_fn = loss_fn or F.cross_entropy

    best = math.inf
    last: _LastPass | None = None
    with _forward_mode(model, bn):
        for step, batch in enumerate(feed.batches(epochs, steps)):
            x, y = _split(batch, device)
            x = cast(x)
            t0 = _now(device)
            start_perms = perms
            detached = {k: v.detach() for k, v in theta.items()}
            perms, stats = match(detached, perms, seed * 1_000_003 + step + 1)
            t1 = _now(device)
            opt.zero_grad(set_to_none=True)
            same = last is not None and last.fits(x, y, perms)
            if same:  # the midpoint and the batch did not change: neither did loss and gradient
                assert last is not None
                value = last.value
                for k, g in last.grads.items():
                    theta[k].grad = g.clone()
            else:
                params = mid.params(theta, perms)
                loss = loss_fn(functional_call(model, params, (x,)), y)
                loss.backward()
                value = float(loss.detach())
                # no copy: the optimizers only read .grad, and zero_grad(set_to_none) lets the
                # next backward write new tensors
                grads = {k: v.grad for k, v in theta.items() if v.grad is not None}
                last = _LastPass(x, y, perms, grads, value)
            opt.step()
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
            out.bounded.append(stats.bounded)
            out.reused.append(same)
            out.changed.append(changed)
            if value < best:
                best, out.best_step, out.perms = value, step, perms
            if log_every and step % log_every == 0:
                out.log.append(
                    f"step {step}: loss {value:.4f}, match {t1 - t0:.4f} s "
                    f"({stats.sweeps} sweeps; {stats.bounded} bounded, {stats.certified} "
                    f"certified, {stats.repaired} repaired, {stats.solves} solved), "
                    f"rest {t2 - t1:.4f} s, {changed} units moved"
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


@dataclass
class _LastPass:
    """The last forward/backward pass: its batch, permutations, gradient and loss."""

    x: Tensor
    y: Tensor
    perms: Perms
    grads: dict[str, Tensor]
    value: float

    def fits(self, x: Tensor, y: Tensor, perms: Perms) -> bool:
        """Same batch (the same tensors, or equal ones) and the same permutations."""
        return (
            all(
                new is old or (new.shape == old.shape and torch.equal(new, old))
                for new, old in ((x, self.x), (y, self.y))
            )
            and perms.keys() == self.perms.keys()
            and all(p is self.perms[g] or torch.equal(p, self.perms[g]) for g, p in perms.items())
        )


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
    permutations change, and so are the BatchNorm statistics (``bn="reset"``): the forward
    pass sees the constant part's values (the proxy only receives the gradient), so the
    statistics of a step whose permutations did not move are the last step's.
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
        self.bn_stats: dict[str, Tensor] | None = None
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
            self.bn_stats = None
        out = dict(self.const)
        for k, t in theta.items():
            out[k] = _StraightThrough.apply(t, self.const[k], self.lam)
        if self.bns:
            if self.scratch is not None:
                if self.bn_stats is None:  # the midpoint's values changed with the perms
                    load_state(self.scratch, self.const)
                    self.reset_bn(self.scratch, self.feed.epoch(0))
                    buffers = dict(self.scratch.named_buffers())
                    self.bn_stats = {k: buffers[k] for k in self.stats_keys if k in buffers}
                out.update(self.bn_stats)  # eval mode: the forward pass leaves them alone
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


_HALF = (torch.float16, torch.bfloat16)


def _float32(t: Tensor) -> Tensor:
    """``t`` in float32 when it is in a half type (other tensors as they are)."""
    return t.float() if t.dtype in _HALF else t


def _trainable(t: Tensor) -> Tensor:
    """A proxy leaf: a copy, in float32 when the weights are in a half type."""
    return _float32(t.detach().clone()).requires_grad_(True)


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
