"""Streaming activation statistics of N models at once, observed through forward hooks.

Activation matching, ZipIt!, MuDSC and REPAIR all need, per permutation group, the first and
second moments of the group's units, and the matching methods need the *cross* moments between
models. :func:`collect_statistics` runs N models of one architecture on the same batches and
keeps, per group, running sums over the concatenation of all N models' units (``N*n`` columns,
model-major: model ``m`` owns columns ``m*n:(m+1)*n``). One pass over the data therefore gives
every model-to-model correlation, in memory that does not grow with the number of samples.

Flattening convention (algorithms.md §0.1, §6.4 item 10): the unit axis ``dim`` of an
activation becomes the columns and every other axis (batch, spatial positions, tokens) becomes
samples (rows), see :func:`flatten_units` / :func:`unflatten_units`.

Which sites are observed (:func:`default_sites`): a group may be visible at several graph
values (conv output, norm output, ReLU output, residual adds...). By default the statistics
use every *module output* site of the group whose op is a nonlinearity (post-activation
features, as Git Re-Basin, ZipIt! and MuDSC use), or, for a group with no such site (e.g. a
transformer residual stream), its last module output site. A residual stream has one
post-activation site per block; their samples are concatenated (rows from all sites go into
the same sums), so the stream's statistics describe it at every depth. Pass ``sites="all"``,
``sites="last"``, a mapping or a callable to choose differently (pre-activations, one site...).

Cost and accuracy: per batch, each site costs one copy of every model's output into a shared
buffer, one product ``Zᵀ Z`` (a matmul on ``(samples, N*n)`` rows, or, for conv maps with many
positions, a batched matmul on the NCHW layout, which avoids a transposing copy) and one column
sum, all in the activations' precision (at least float32, TF32 off), added to float64
accumulators; no Python loop over units. The activations are first shifted by a per-group
reference (the first batch's mean), which removes the cancellation of ``E[zzᵀ] − μμᵀ`` when
means are large next to standard deviations; the shift is undone exactly when moments are read
out. Float64 models give float64-exact results. The buffers hold one batch of every site of
every model at once (N times the observed activations), so memory is set by the batch size.

Data parallelism: every accumulator is a sum, so :meth:`ActivationStats.all_reduce` gives each
process the statistics of the union of all processes' data (exact up to float64 round-off).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from symmerge.spec import ActivationSite, Group, SymmetrySpec

__all__ = [
    "ACTIVATION_OPS",
    "ActivationStats",
    "collect_statistics",
    "default_sites",
    "flatten_units",
    "model_inputs",
    "unflatten_units",
]

#: Op names (as :class:`~symmerge.spec.ActivationSite` ``op``) that count as nonlinearities.
ACTIVATION_OPS: frozenset[str] = frozenset(
    {
        "relu", "relu_", "relu6", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_",
        "tanh", "tanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "mish",
        "softplus", "hardswish", "hardswish_", "hardsigmoid", "hardtanh", "hardtanh_", "prelu",
        "_prelu_kernel", "rrelu", "threshold", "log_sigmoid", "log_sigmoid_forward",
    }
)  # fmt: skip

SiteChoice = (
    str | Mapping[str, Sequence[ActivationSite]] | Callable[[Group], Sequence[ActivationSite]]
)


# ---------------------------------------------------------------------------------------
# flattening convention
# ---------------------------------------------------------------------------------------


def flatten_units(x: Tensor, dim: int) -> Tensor:
    """``(samples, n)`` view/copy of ``x`` whose columns are the units on axis ``dim``.

    Conv activations (B, C, H, W) with ``dim=1`` give B*H*W rows; token activations (B, T, D)
    with ``dim=2`` give B*T rows. Rows are ordered like ``x.movedim(dim, -1)``.
    """
    return x.movedim(dim, -1).reshape(-1, x.shape[dim])


def unflatten_units(z: Tensor, shape: Sequence[int], dim: int) -> Tensor:
    """Inverse of :func:`flatten_units`: put ``(samples, n)`` back into ``shape``."""
    shape = list(shape)
    moved = shape[:dim] + shape[dim + 1 :] + [shape[dim]]
    return z.reshape(moved).movedim(-1, dim)


# ---------------------------------------------------------------------------------------
# site selection and input handling
# ---------------------------------------------------------------------------------------


def default_sites(group: Group) -> list[ActivationSite]:
    """Post-activation module outputs of ``group``, else its last module output (or none).

    Only module outputs can be hooked in the eager model. Nonlinearity outputs are the features
    the matching literature compares; groups without one (residual streams of pre-norm
    transformers, linear networks) fall back to the last module output that carries them.
    """
    outs = [s for s in group.sites if s.module_output]
    acts = [s for s in outs if s.op in ACTIVATION_OPS]
    return acts or outs[-1:]


def _resolve_sites(group: Group, choice: SiteChoice) -> list[ActivationSite]:
    if isinstance(choice, str):
        if choice == "activation":
            sites = default_sites(group)
        elif choice == "all":
            sites = [s for s in group.sites if s.module_output]
        elif choice == "last":
            sites = [s for s in group.sites if s.module_output][-1:]
        else:
            raise ValueError(
                "The 'sites' parameter of collect_statistics must be 'activation', 'all', "
                f"'last', a mapping or a callable. Got {choice!r} instead."
            )
    elif isinstance(choice, Mapping):
        sites = list(choice.get(group.name, default_sites(group)))
    else:
        sites = list(choice(group))
    bad = [s.node for s in sites if not s.module_output]
    if bad:
        raise ValueError(
            f"sites {bad} of group '{group.name}' are not module outputs, so no forward hook "
            "can observe them in the eager model; pick sites with module_output=True"
        )
    return sites


def model_inputs(batch: Any, device: torch.device | None = None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` to call a model on ``batch``, moved to ``device``.

    A tensor is the input; a tuple or list is ``(inputs, labels, ...)`` and only its first
    element is passed (labels are ignored); a mapping is passed as keyword arguments.
    """

    def move(x: Any) -> Any:
        return x.to(device, non_blocking=True) if torch.is_tensor(x) and device else x

    if torch.is_tensor(batch):
        return (move(batch),), {}
    if isinstance(batch, Mapping):
        return (), {k: move(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)) and batch:
        return (move(batch[0]),), {}
    raise TypeError(
        f"a batch must be a tensor, a non-empty (inputs, labels) tuple or a mapping of model "
        f"keyword inputs; got {type(batch).__name__}"
    )


def _first_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_on(models: Sequence[nn.Module], device: torch.device | None) -> Iterator[torch.device]:
    """Models in eval mode (and on ``device``) inside the block; modes/devices restored after."""
    modes = [[(m, m.training) for m in model.modules()] for model in models]
    homes = [_first_device(model) for model in models]
    dev = device if device is not None else homes[0]
    if device is None and any(h != dev for h in homes):
        raise ValueError(
            f"the models live on different devices {sorted({str(h) for h in homes})}; pass "
            "device=... to move them for the collection"
        )
    try:
        for model in models:
            model.eval()
            if device is not None:
                model.to(device)
        yield dev
    finally:
        for model, home, flags in zip(models, homes, modes, strict=True):
            if device is not None and home != device:
                model.to(home)
            for m, flag in flags:
                m.training = flag


@contextlib.contextmanager
def _no_tf32(device: torch.device) -> Iterator[None]:
    """Full float32 matmuls: TF32 would round the moment products to 10 mantissa bits."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    attr, value = (
        ("fp32_precision", "ieee") if hasattr(matmul, "fp32_precision") else ("allow_tf32", False)
    )
    prev = getattr(matmul, attr)
    setattr(matmul, attr, value)
    try:
        yield
    finally:
        setattr(matmul, attr, prev)


# ---------------------------------------------------------------------------------------
# the statistics object
# ---------------------------------------------------------------------------------------


@dataclass
class ActivationStats:
    """Running moments per group over the concatenated units of ``num_models`` models.

    Every accessor returns float64 tensors indexed model-major: unit ``i`` of model ``m`` is
    index ``m * size(group) + i``. The raw accumulators are ``count`` (samples), ``shift``
    (a fixed reference point ``c``), ``sums`` = Σ(z − c) and ``outer`` = Σ(z − c)(z − c)ᵀ.
    ``unobserved`` lists the requested groups that have no module-output site, so no hook can
    see them (e.g. attention q/k/v head groups, visible only inside the attention module).
    """

    num_models: int
    sizes: dict[str, int]
    sites: dict[str, list[ActivationSite]]
    counts: dict[str, int] = field(default_factory=dict)
    shift: dict[str, Tensor] = field(default_factory=dict)
    sums: dict[str, Tensor] = field(default_factory=dict)
    outer: dict[str, Tensor] = field(default_factory=dict)
    raw_samples: int = 0
    unobserved: list[str] = field(default_factory=list)
    raw_rows: dict[str, Tensor] = field(default_factory=dict)
    raw_keys: dict[str, Tensor] = field(default_factory=dict)

    # ---- bookkeeping --------------------------------------------------------------------
    @property
    def groups(self) -> list[str]:
        return list(self.sizes)

    def _check(self, group: str) -> None:
        if group not in self.sizes:
            raise KeyError(f"no statistics for group {group!r}; collected groups: {self.groups}")
        if self.counts.get(group, 0) == 0:
            raise ValueError(f"group {group!r} has seen no samples")

    def size(self, group: str) -> int:
        """Units per model (``n``); matrices are ``(num_models * n)`` square."""
        return self.sizes[group]

    def units(self, group: str, model: int) -> slice:
        """The index range of ``model``'s units, e.g. ``corr[s.units(g, 0), s.units(g, 1)]``."""
        n = self.sizes[group]
        return slice(model * n, (model + 1) * n)

    def count(self, group: str) -> int:
        """Samples seen: batch elements times positions, summed over the group's sites."""
        if group not in self.sizes:
            raise KeyError(f"no statistics for group {group!r}; collected groups: {self.groups}")
        return self.counts.get(group, 0)

    # ---- moments ------------------------------------------------------------------------
    def _centered(self, group: str) -> tuple[Tensor, Tensor, Tensor]:
        self._check(group)
        n = self.counts[group]
        mu_y = self.sums[group] / n
        s2 = self.outer[group] / n
        return 0.5 * (s2 + s2.T), mu_y, self.shift[group]

    def mean(self, group: str) -> Tensor:
        """E[z], shape ``(N*n,)``."""
        _, mu_y, c = self._centered(group)
        return c + mu_y

    def second_moment(self, group: str) -> Tensor:
        """E[z zᵀ], shape ``(N*n, N*n)`` (the inner-product similarity of activations)."""
        s2, mu_y, c = self._centered(group)
        return s2 + torch.outer(mu_y, c) + torch.outer(c, mu_y) + torch.outer(c, c)

    def covariance(self, group: str) -> Tensor:
        """E[(z − μ)(z − μ)ᵀ] (population covariance, divides by the count)."""
        s2, mu_y, _ = self._centered(group)
        return s2 - torch.outer(mu_y, mu_y)

    def variance(self, group: str) -> Tensor:
        """Per-unit population variance, clamped at 0, shape ``(N*n,)``."""
        return self.covariance(group).diagonal().clamp_min(0)

    def correlation(self, group: str, eps: float = 1e-12) -> Tensor:
        """Pearson correlation, shape ``(N*n, N*n)``; NaN-free for dead units.

        A unit whose standard deviation is (near) zero gets correlation 0 with every unit,
        itself included: ``cov_ij / max(std_i std_j, eps)``, clipped to [-1, 1].
        """
        cov = self.covariance(group)
        std = cov.diagonal().clamp_min(0).sqrt()
        return (cov / torch.outer(std, std).clamp_min(eps)).clamp_(-1.0, 1.0)

    def raw(self, group: str) -> Tensor | None:
        """Up to ``raw_samples`` rows ``(k, N*n)`` drawn uniformly from every sample seen."""
        return self.raw_rows.get(group)

    # ---- combining ----------------------------------------------------------------------
    def _rebase(self, group: str, new_shift: Tensor) -> None:
        """Re-express the sums about ``new_shift`` (exact algebra: y' = y + (c − c'))."""
        d = self.shift[group] - new_shift
        n, s1 = self.counts.get(group, 0), self.sums[group]
        self.outer[group] += torch.outer(s1, d) + torch.outer(d, s1) + n * torch.outer(d, d)
        self.sums[group] = s1 + n * d
        self.shift[group] = new_shift.clone()

    def all_reduce(self, process_group: Any = None) -> ActivationStats:
        """Sum the accumulators over all processes of ``torch.distributed`` (in place).

        Every process must have collected the same groups (same spec, models, ``groups``). The
        result equals one process that saw all processes' data, up to float64 round-off;
        raw buffers are merged by keeping the ``raw_samples`` smallest random keys overall,
        so they stay a uniform sample of the union. Returns ``self``.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("all_reduce needs an initialized torch.distributed process group")
        names = sorted(self.sizes)
        if not names:
            return self
        on_nccl = dist.get_backend(process_group) == "nccl"
        ref = self.sums[names[0]]
        comm = ref.device if on_nccl else torch.device("cpu")

        def pack(parts: list[Tensor]) -> Tensor:
            return torch.cat([p.reshape(-1).to(comm, torch.float64) for p in parts])

        # 1) one common reference point: the count-weighted mean of the local shifts
        first = pack(
            [
                t
                for g in names
                for t in (
                    torch.tensor([self.counts.get(g, 0)], dtype=torch.float64),
                    self.shift[g] * self.counts.get(g, 0),
                )
            ]
        )
        dist.all_reduce(first, group=process_group)
        offset, totals = 0, {}
        for g in names:
            k = self.num_models * self.sizes[g]
            total = first[offset].item()
            totals[g] = int(round(total))
            weighted = first[offset + 1 : offset + 1 + k].to(ref.device)
            offset += 1 + k
            self._rebase(g, weighted / total if total > 0 else torch.zeros_like(weighted))
        # 2) sum the re-based moments
        second = pack([t for g in names for t in (self.sums[g], self.outer[g])])
        dist.all_reduce(second, group=process_group)
        offset = 0
        for g in names:
            k = self.num_models * self.sizes[g]
            self.sums[g] = second[offset : offset + k].to(ref.device)
            self.outer[g] = second[offset + k : offset + k + k * k].view(k, k).to(ref.device)
            offset += k + k * k
            self.counts[g] = totals[g]
        if self.raw_samples:
            self._all_reduce_raw(names, process_group)
        return self

    def _all_reduce_raw(self, names: list[str], process_group: Any) -> None:
        import torch.distributed as dist

        local = {
            g: (self.raw_keys[g].cpu(), self.raw_rows[g].cpu()) for g in names if g in self.raw_keys
        }
        gathered: list[Any] = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(gathered, local, group=process_group)
        for g in names:
            parts = [p[g] for p in gathered if g in p]
            if not parts:
                continue
            keys = torch.cat([k for k, _ in parts])
            rows = torch.cat([r for _, r in parts])
            keep = keys.argsort()[: self.raw_samples]
            dev = self.sums[g].device
            self.raw_keys[g], self.raw_rows[g] = keys[keep].to(dev), rows[keep].to(dev)


# ---------------------------------------------------------------------------------------
# collection
# ---------------------------------------------------------------------------------------


@dataclass
class _Site:
    """One observed site: the buffer its hooks write, for which group.

    The buffer is ``(P, N*n, Q)`` for an activation of shape ``(*p, n, *q)`` (units on axis
    ``dim``), with P = prod(p) and Q = prod(q). Two layouts:

    * rows (Q = 1 in the buffer; linear and token outputs, small feature maps): samples are
      rows, and the product is one ``Zᵀ Z`` matmul;
    * native (Q = positions; conv feature maps with at least as many positions as buffer
      columns): each model's output is copied in its own NCHW order (no transposing copy),
      and the product is a batched ``X_b X_bᵀ`` summed over the batch.
    """

    group: str
    site: ActivationSite
    written: int = 0  # bit m set once model m wrote this batch
    buffer: Tensor | None = None
    native: bool = False

    def rows(self) -> Tensor:
        """The buffer as ``(samples, N*n)`` (a copy in the native layout)."""
        assert self.buffer is not None
        b = self.buffer
        return b[:, :, 0] if not self.native else b.transpose(1, 2).reshape(-1, b.shape[1])

    def moments(self) -> tuple[Tensor, Tensor, int]:
        """(Σ z zᵀ, Σ z, samples) of the buffer, in its dtype."""
        assert self.buffer is not None
        b = self.buffer
        if not self.native:
            z = b[:, :, 0]
            return z.T @ z, z.sum(0), z.shape[0]
        k = b.shape[1]
        step = max(1, _BMM_ELEMENTS // (k * k))  # bounds the (step, k, k) temporary
        p = sum(torch.bmm(c, c.transpose(1, 2)).sum(0) for c in b.split(step))
        return p, b.sum((0, 2)), b.shape[0] * b.shape[2]  # type: ignore[return-value]


_BMM_ELEMENTS = 1 << 24


class _Collector:
    """Hooks that copy site outputs into per-site buffers (see :class:`_Site`)."""

    def __init__(
        self,
        stats: ActivationStats,
        plan: list[_Site],
        models: Sequence[nn.Module],
        device: torch.device,
        dtype: torch.dtype | None,
        seed: int,
    ) -> None:
        self.stats, self.plan, self.models = stats, plan, models
        self.device, self.dtype = device, dtype
        self.current = -1
        self.shift: dict[str, Tensor] = {}  # stats.shift in the buffers' dtype
        self.handles: list[Any] = []
        self.gen: torch.Generator | None = None
        if stats.raw_samples:
            self.gen = torch.Generator(device=device).manual_seed(seed)
        for m, model in enumerate(models):
            for entry in plan:
                try:
                    module = model.get_submodule(entry.site.module)
                except AttributeError as e:
                    raise ValueError(
                        f"model {m} has no submodule '{entry.site.module}' (site "
                        f"'{entry.site.node}' of group '{entry.group}'); all models must share "
                        "the architecture the spec was traced from"
                    ) from e
                self.handles.append(module.register_forward_hook(self._hook(m, entry)))

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, m: int, entry: _Site) -> Callable[..., None]:
        n = self.stats.sizes[entry.group]
        dim = entry.site.dim
        k = self.stats.num_models * n
        units = slice(m * n, (m + 1) * n)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.current != m:  # a module object shared by several models
                return
            if not torch.is_tensor(output):
                raise TypeError(
                    f"site '{entry.site.node}' of group '{entry.group}': module "
                    f"'{entry.site.module}' returned {type(output).__name__}, not a tensor"
                )
            if output.ndim <= dim or output.shape[dim] != n:
                return  # another call of a module used several times; the site is its last
            y = output.detach()
            p, q = math.prod(y.shape[:dim]), math.prod(y.shape[dim + 1 :])
            buf = entry.buffer
            if m == 0 or buf is None:
                dtype = self.dtype or torch.promote_types(y.dtype, torch.float32)
                native = 1 < q and k <= q
                shape = (p, k, q) if native else (p * q, k, 1)
                if buf is None or buf.shape != shape or buf.dtype != dtype:
                    if m != 0 and entry.written:
                        raise ValueError(self._shape_error(entry))
                    buf = torch.empty(shape, dtype=dtype, device=self.device)
                    entry.buffer, entry.native = buf, native
            elif buf.shape[0] * buf.shape[2] != p * q:
                raise ValueError(self._shape_error(entry))
            shift = self.shift.get(entry.group)
            if entry.native:
                dst = buf[:, units].view(y.shape)
                c = None if shift is None else shift[units].view(n, *([1] * (y.ndim - dim - 1)))
            else:
                y = y.movedim(dim, -1)
                dst = buf[:, units, 0].view(y.shape)
                c = None if shift is None else shift[units]
            if c is None:
                dst.copy_(y)
            else:
                torch.sub(y, c, out=dst)
            entry.written |= 1 << m

        return hook

    def _shape_error(self, entry: _Site) -> str:
        return (
            f"site '{entry.site.node}' (module '{entry.site.module}') has a different number "
            "of samples in different models; all models must see the same inputs"
        )

    def run(self, batch: Any) -> None:
        args, kwargs = model_inputs(batch, self.device)
        for entry in self.plan:
            entry.written = 0
        for m, model in enumerate(self.models):
            self.current = m
            model(*args, **kwargs)
        self.current = -1
        self._accumulate()

    def _accumulate(self) -> None:
        full = (1 << self.stats.num_models) - 1
        by_group: dict[str, list[_Site]] = {}
        for entry in self.plan:
            if entry.written != full or entry.buffer is None:
                raise RuntimeError(
                    f"site '{entry.site.node}' (module '{entry.site.module}') of group "
                    f"'{entry.group}' was not observed in every model during this batch"
                )
            by_group.setdefault(entry.group, []).append(entry)
        s = self.stats
        with _no_tf32(self.device):
            for g, entries in by_group.items():
                k = s.num_models * s.sizes[g]
                if g not in s.shift:  # first batch: reference point = its mean
                    bufs = [e.buffer for e in entries if e.buffer is not None]
                    total = sum(b.numel() // k for b in bufs)
                    c = torch.stack([b.sum((0, 2), dtype=torch.float64) for b in bufs]).sum(0)
                    c = (c / total).to(bufs[0].dtype)
                    for b in bufs:
                        b -= c.view(1, k, 1)
                    self.shift[g] = c
                    s.shift[g] = c.double()
                    s.sums[g] = torch.zeros(k, dtype=torch.float64, device=self.device)
                    s.outer[g] = torch.zeros(k, k, dtype=torch.float64, device=self.device)
                for e in entries:
                    p, total, rows = e.moments()
                    s.outer[g] += p
                    s.sums[g] += total
                    s.counts[g] = s.counts.get(g, 0) + rows
                    if s.raw_samples:
                        self._reservoir(g, e.rows())

    def _reservoir(self, g: str, y: Tensor) -> None:
        """Keep the rows with the ``raw_samples`` smallest uniform keys seen so far."""
        s = self.stats
        keys = torch.rand(y.shape[0], generator=self.gen, device=self.device, dtype=torch.float64)
        old_k, old_r = s.raw_keys.get(g), s.raw_rows.get(g)
        if old_k is not None and old_k.numel() >= s.raw_samples:
            take = keys < old_k.max()
            keys, y = keys[take], y[take]
        rows = (y.double() + s.shift[g]).to(y.dtype)
        if old_k is not None:
            keys, rows = torch.cat([old_k, keys]), torch.cat([old_r, rows])
        if keys.numel() > s.raw_samples:
            keep = keys.topk(s.raw_samples, largest=False).indices
            keys, rows = keys[keep], rows[keep]
        s.raw_keys[g], s.raw_rows[g] = keys, rows


def collect_statistics(
    spec: SymmetrySpec,
    models: Sequence[nn.Module],
    batches: Iterable[Tensor | tuple | Mapping[str, Any]],
    groups: Iterable[str] | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    raw_samples: int = 0,
    *,
    sites: SiteChoice = "activation",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> ActivationStats:
    """Moments of every group's units over ``batches``, for all ``models`` in one pass.

    Args:
        spec: the symmetry spec, traced from any one of the models (module names are shared).
        models: N models of the same architecture; each batch is run through all of them.
        batches: tensors, ``(inputs, labels)`` tuples (labels ignored) or keyword mappings.
        groups: names of the groups to observe (default: every group; those without a
            module-output site are listed in ``stats.unobserved``, naming one is an error).
        device: where to run and accumulate; default the models' device (they are moved
            there for the call and back afterwards when given).
        progress: show a progress bar.
        raw_samples: also keep up to this many raw rows per group (a uniform sample), e.g.
            for K-means.
        sites: ``"activation"`` (default, :func:`default_sites`), ``"all"`` module outputs,
            ``"last"`` module output, a mapping group -> sites, or a callable group -> sites.
        dtype: precision of the per-batch products (default: the activations' dtype, at
            least float32). Accumulation is always float64.
        seed: seed of the raw-buffer sampling (plus the process rank under
            ``torch.distributed``, so processes draw independent samples).

    Returns:
        :class:`ActivationStats`. Models are run in eval mode under ``torch.no_grad`` and get
        their modes back afterwards.

    Example:
        >>> stats = collect_statistics(spec, [model_a, model_b], loader)  # doctest: +SKIP
        >>> corr = stats.correlation("layers.1.out")  # (2n, 2n); off-diagonal blocks: A vs B
    """
    models = list(models)
    if not models:
        raise ValueError("collect_statistics needs at least one model")
    if raw_samples < 0:
        raise ValueError(
            f"The 'raw_samples' parameter of collect_statistics must be >= 0. Got {raw_samples}."
        )
    names = list(spec.groups) if groups is None else list(groups)
    unknown = [g for g in names if g not in spec.groups]
    if unknown:
        raise KeyError(f"unknown groups {unknown}; the spec has {list(spec.groups)}")
    chosen = {g: _resolve_sites(spec.groups[g], sites) for g in names}
    if groups is not None:
        empty = [g for g, s in chosen.items() if not s]
        if empty:
            raise ValueError(f"groups {empty} have no module-output site a hook could observe")
    if raw_samples and torch.distributed.is_available() and torch.distributed.is_initialized():
        seed += torch.distributed.get_rank()
    stats = ActivationStats(
        num_models=len(models),
        sizes={g: spec.groups[g].size for g, s in chosen.items() if s},
        sites={g: s for g, s in chosen.items() if s},
        raw_samples=int(raw_samples),
        unobserved=[g for g, s in chosen.items() if not s],
    )
    chosen = stats.sites
    plan = [_Site(g, s) for g, ss in chosen.items() for s in ss]
    dev = torch.device(device) if device is not None else None
    with _eval_on(models, dev) as dev, torch.no_grad():
        collector = _Collector(stats, plan, models, dev, dtype, seed)
        try:
            it: Iterable[Any] = batches
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(batches, desc="statistics", unit="batch")
            for batch in it:
                collector.run(batch)
        finally:
            collector.close()
    for g in stats.sizes:  # groups that saw no data still all-reduce consistently
        k = stats.num_models * stats.sizes[g]
        stats.shift.setdefault(g, torch.zeros(k, dtype=torch.float64, device=dev))
        stats.sums.setdefault(g, torch.zeros(k, dtype=torch.float64, device=dev))
        stats.outer.setdefault(g, torch.zeros(k, k, dtype=torch.float64, device=dev))
        stats.counts.setdefault(g, 0)
    return stats
