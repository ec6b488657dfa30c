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
A group with no whole-axis module output (the q/k and v/o head dims of a fused qkv projection)
is observed where its weights put it (:func:`member_sites`): on slices of a Linear/Conv output,
or at a module's input through a forward pre-hook. :class:`HookSite` names such sites by hand.

Parents of different widths: ``specs=`` gives one spec per model (same group names, each
traced from its own model); a group's concatenated columns are then blocks of each model's own
size (:meth:`ActivationStats.units`).

Cost and accuracy: per batch, each site costs one copy of every model's output into a shared
buffer, one product ``Zᵀ Z`` (a matmul on ``(samples, N*n)`` rows, or, for conv maps with many
positions, a batched matmul on the NCHW layout, which avoids a transposing copy) and one column
sum, all in the activations' precision (at least float32, TF32 off), added to float64
accumulators; no Python loop over units. The activations are first shifted by a per-group
reference (the first batch's mean), which removes the cancellation of ``E[zzᵀ] − μμᵀ`` when
means are large next to standard deviations; the shift is undone exactly when moments are read
out. Float64 models give float64-exact results. The buffers hold one batch of every site of
every model at once (N times the observed activations), so memory is set by the batch size.

Per-batch distances (``collect_statistics(..., batch_distances=True)``): PLeaS scores unit
pairs by the *non-squared* distance between their activation vectors within each batch, summed
over batches, ``Σ_batches ‖Z[u] − Z[v]‖₂``, which no moment gives (the square root does not
commute with the sum). Opt-in, this adds per group a float64 ``(N*n, N*n)`` sum (the size of the
second moment), filled from each batch's own Gram matrix, ``‖a‖² + ‖b‖² − 2 a·b`` clamped at 0,
then a square root: one elementwise pass over an ``(N*n, N*n)`` matrix (a cdist) per batch per
group, no extra pass over the data and no loop over samples. Like ``torch.cdist``'s matmul path,
the distance between nearly equal units carries an absolute error of about ``sqrt(eps)·‖z‖`` in
the activations' precision; float64 models give float64-exact sums. Off, nothing changes.

Least squares (:func:`collect_layer_products`): per Linear/Conv2d layer, ``XᵀX`` and ``XᵀY`` of
the layer's inputs (im2col patches for convs, plus a ones column for the bias) and its outputs
or any per-layer target, the sums PLeaS and neuron-interpolation fusion refit layers with.

Data parallelism: every accumulator is a sum, so :meth:`ActivationStats.all_reduce` (and
:meth:`LayerProducts.all_reduce`) gives each process the statistics of the union of all
processes' data (exact up to float64 round-off).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symmerge.flops import is_transposed_linear
from symmerge.progress import progress_bar
from symmerge.spec import ActivationSite, Factor, Group, SymmetrySpec

__all__ = [
    "ACTIVATION_OPS",
    "ActivationStats",
    "HookSite",
    "LayerProducts",
    "collect_layer_products",
    "layer_io",
    "collect_statistics",
    "default_sites",
    "flatten_units",
    "hook_site",
    "member_sites",
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


@dataclass(frozen=True)
class HookSite(ActivationSite):
    """A site that a hook observes at a module's input, or on part of an axis.

    ``at_input``: the module's first positional input (a forward pre-hook), e.g. what a
    Linear or Conv reads, which is what a least-squares refit regresses on. ``size`` (with
    ``offset``): only units ``offset:offset + size`` of axis ``dim`` are the group's, as the q,
    k and v parts of a fused qkv projection; ``None`` is the whole axis. ``dim`` may be negative
    (a Linear's units are its last axis, whatever the number of leading axes).
    """

    at_input: bool = False
    offset: int = 0
    size: int | None = None


def hook_site(
    module: str,
    dim: int,
    *,
    at_input: bool = False,
    offset: int = 0,
    size: int | None = None,
    op: str = "",
) -> HookSite:
    """A :class:`HookSite` on ``module``'s output (or input), optionally a slice of ``dim``."""
    span = "" if size is None else f"[{offset}:{offset + size}]"
    node = f"{module}:{'input' if at_input else 'output'}{span}"
    return HookSite(node, module, dim, op, not at_input, at_input, offset, size)


def _observable(site: ActivationSite) -> bool:
    return site.module_output or getattr(site, "at_input", False)


def _weight_layout(module: nn.Module | None) -> tuple[int, int] | None:
    """``(units axis of the output, output axis of the weight)`` of a Linear, a conv or a
    Hugging Face ``Conv1D`` (weight stored ``(in, out)``); ``None`` for other modules."""
    if isinstance(module, nn.Linear):
        return -1, 0
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return 1, 0
    if is_transposed_linear(module):
        return -1, 1
    return None


def member_sites(group: Group, model: nn.Module) -> list[HookSite]:
    """Sites of ``group`` read off its Linear/Conv weight members (also Hugging Face's
    ``Conv1D``), for groups that no module returns whole (the q/k and v/o head dims of a
    fused qkv projection).

    A weight's output axis (axis 0; 1 for ``Conv1D``) gives its module's output, its
    contracted input axis (``groups=1`` convs) its module's input; one site per segment of the
    axis that holds exactly this group's units (``Member.segments``: a qkv output axis has one
    per q, k, v). Output sites come first; input sites are used only for a group without any.
    """
    outs: list[HookSite] = []
    ins: list[HookSite] = []
    whole = (Factor(group.name, group.size),)
    modules = dict(model.named_modules())
    for member in group.members:
        name, _, leaf = member.tensor.rpartition(".")
        module = modules.get(name) if leaf == "weight" else None
        layout = _weight_layout(module)
        if layout is None:
            continue
        assert module is not None
        dim, out_axis = layout
        at_input = member.axis == 1 - out_axis and member.role == "in"
        if not (member.axis == out_axis or (at_input and getattr(module, "groups", 1) == 1)):
            continue
        full = module.weight.shape[member.axis]
        for seg in member.segments:
            if seg.factors == whole:
                size = None if seg.size == full else seg.size
                op = "input" if at_input else type(module).__name__.lower()
                site = hook_site(name, dim, at_input=at_input, offset=seg.offset, size=size, op=op)
                (ins if at_input else outs).append(site)
    return list(dict.fromkeys(outs or ins))


def product_sites(spec: SymmetrySpec, model: nn.Module) -> dict[tuple[str, str], HookSite]:
    """Hook sites for pairs of groups that no site observes alone but whose product does: the
    output axis of a Linear / Conv laid out as ``(first, second)`` factors, row major (a
    grouped convolution's channels: groups x channels per group). Matching them takes the
    similarity of the product (:func:`symmerge.solvers.lap.solve_kronecker`)."""
    modules = dict(model.named_modules())
    out: dict[tuple[str, str], HookSite] = {}
    for group in spec.groups.values():
        if group.sites:
            continue
        for member in group.members:
            name, _, leaf = member.tensor.rpartition(".")
            module = modules.get(name) if leaf == "weight" else None
            layout = _weight_layout(module)
            if layout is None:
                continue
            dim, out_axis = layout
            factors = member.segments[0].factors if len(member.segments) == 1 else ()
            names = tuple(f.group for f in factors)
            if member.axis != out_axis or len(names) != 2 or None in names:
                continue
            pair = (str(names[0]), str(names[1]))
            if all(not spec.groups[g].sites for g in pair) and pair not in out:
                out[pair] = hook_site(name, dim, op=type(module).__name__.lower())
    return out


def unobservable(groups: Sequence[Group]) -> str:
    """Why hooks cannot observe ``groups`` (none has a site): names (the first four) and the
    reason, for error messages."""
    names = [g.name for g in groups]
    shown = f"{names[:4]}{' ...' if len(names) > 4 else ''}"
    factored = any(
        len(seg.factors) > 1 for g in groups for mem in g.members for seg in mem.segments
    )
    why = (
        "each is one factor of an axis that is a product of groups (such as a grouped "
        "convolution's channels, groups x channels per group), and no module outputs a factor "
        "alone"
        if factored
        else "no module outputs their units"
    )
    return (
        f"groups {shown} have no site a forward hook can observe: {why}. Merge them with a "
        "data-free method (weight, mergemany, c2m3)"
    )


def default_sites(group: Group) -> list[ActivationSite]:
    """Post-activation module outputs of ``group``, else its last module output (or none).

    Only module outputs can be hooked in the eager model. Nonlinearity outputs are the features
    the matching literature compares; groups without one (residual streams of pre-norm
    transformers, linear networks) fall back to the last module output that carries them.
    """
    outs = [s for s in group.sites if s.module_output]
    acts = [s for s in outs if s.op in ACTIVATION_OPS]
    return acts or outs[-1:]


def _resolve_sites(group: Group, choice: SiteChoice, model: nn.Module) -> list[ActivationSite]:
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
        sites = sites or member_sites(group, model)
    elif isinstance(choice, Mapping):
        default = default_sites(group) or member_sites(group, model)
        sites = list(choice.get(group.name, default))
    else:
        sites = list(choice(group))
    bad = [s.node for s in sites if not _observable(s)]
    if bad:
        raise ValueError(
            f"sites {bad} of group '{group.name}' are not module outputs, so no forward hook "
            "can observe them in the eager model; pick sites with module_output=True or "
            "HookSites (symmerge.stats.hook_site)"
        )
    return sites


def model_inputs(
    batch: Any, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[tuple, dict]:
    """``(args, kwargs)`` to call a model on ``batch``, moved to ``device``, floating-point
    tensors cast to ``dtype`` (the model's: float32 images feed a bfloat16 model; token ids
    stay integers).

    A tensor is the input; a tuple or list is ``(inputs, labels, ...)`` and only its first
    element is passed (labels are ignored); a mapping is passed as keyword arguments.
    """

    def move(x: Any) -> Any:
        if not torch.is_tensor(x):
            return x
        if dtype is not None and x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)
        return x.to(device, non_blocking=True) if device else x

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


def float_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (or buffer): what its inputs
    are cast to; ``None`` when it has none."""
    tensors = itertools.chain(model.parameters(), model.buffers())  # stops at the first
    return next((t.dtype for t in tensors if t.is_floating_point()), None)


def shape_inputs(model: nn.Module, n: int = 2, seed: int = 0) -> tuple[torch.Tensor] | None:
    """``n`` standard-normal inputs of ``model.input_shape`` (seeded), in the model's float dtype
    and on its device: the example a model with a declared input shape is traced or run on
    when none is given. ``None`` when the model declares no ``input_shape``."""
    shape = getattr(model, "input_shape", None)
    if shape is None:
        return None
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen, dtype=float_dtype(model) or torch.float32)
    return (x.to(_first_device(model)),)


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
    index ``units(group, m).start + i`` (``m * size(group) + i`` when every model has the
    group's size; ``model_sizes`` holds each model's size, ``sizes`` model 0's). The raw
    accumulators are ``count`` (samples), ``shift`` (a fixed reference point ``c``), ``sums`` =
    Σ(z − c) and ``outer`` = Σ(z − c)(z − c)ᵀ. ``unobserved`` lists the requested groups that no
    hook can see (no module output and no Linear/Conv weight holds them, e.g. the attention
    heads group, visible only inside the attention module). With ``batch_distances``,
    ``batch_dist`` = Σ_batches of the pairwise unit distances within the batch and ``batches``
    the number of batches (:meth:`batch_distance`).
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
    model_sizes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    batch_distances: bool = False
    batch_dist: dict[str, Tensor] = field(default_factory=dict)
    batches: dict[str, int] = field(default_factory=dict)

    # ---- bookkeeping --------------------------------------------------------------------
    @property
    def groups(self) -> list[str]:
        return list(self.sizes)

    def _widths(self, group: str) -> tuple[int, ...]:
        return self.model_sizes.get(group) or (self.sizes[group],) * self.num_models

    def _check(self, group: str) -> None:
        if group not in self.sizes:
            raise KeyError(f"no statistics for group {group!r}; collected groups: {self.groups}")
        if self.counts.get(group, 0) == 0:
            raise ValueError(f"group {group!r} has seen no samples")

    def size(self, group: str, model: int | None = None) -> int:
        """Units of ``model`` (``n``); without a model, every model's (an error if they differ).

        Matrices are ``total_size(group)`` square (``num_models * n`` for equal widths).
        """
        widths = self._widths(group)
        if model is not None:
            return widths[model]
        if len(set(widths)) > 1:
            raise ValueError(
                f"group {group!r} has a different size in every model {list(widths)}; pass "
                "model= or use units()/total_size()"
            )
        return widths[0]

    def total_size(self, group: str) -> int:
        """Columns of the concatenation: the sum of every model's size."""
        return sum(self._widths(group))

    def units(self, group: str, model: int) -> slice:
        """The index range of ``model``'s units, e.g. ``corr[s.units(g, 0), s.units(g, 1)]``."""
        widths = self._widths(group)
        start = sum(widths[:model])
        return slice(start, start + widths[model])

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

    def batch_distance(self, group: str) -> Tensor:
        """``D[u, v] = Σ_batches ‖Z[u] − Z[v]‖₂``, shape ``(N*n, N*n)``: PLeaS's unit distance.

        ``Z[u]`` is unit ``u``'s activations in one batch (its samples × positions, rows from
        every site of the group). Not a mean: it grows with the number of batches
        (``batches[group]``), as in the paper's code. Needs ``batch_distances=True`` at
        collection, since moments cannot give it.
        """
        if not self.batch_distances:
            raise ValueError(
                "these statistics were collected without per-batch distances; collect them "
                "with collect_statistics(..., batch_distances=True)"
            )
        self._check(group)
        return self.batch_dist[group]

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
        so they stay a uniform sample of the union. Per-batch distances (every process must
        have collected them, or none) and batch counts are summed. Returns ``self``.
        """
        _distributed()
        names = sorted(self.sizes)
        if not names:
            return self
        dev = self.sums[names[0]].device
        local = [torch.tensor([float(self.counts.get(g, 0))], dtype=torch.float64) for g in names]
        # 1) one common reference point: the count-weighted mean of the local shifts
        first = _sum_over_processes(
            [t for g, n in zip(names, local, strict=True) for t in (n, self.shift[g] * n.item())],
            process_group,
            dev,
        )
        for g, total, weighted in zip(names, first[0::2], first[1::2], strict=True):
            self._rebase(g, weighted / total if total > 0 else torch.zeros_like(weighted))
            self.counts[g] = int(round(total.item()))  # after the re-basing with the local count
        # 2) sum the re-based moments
        second = _sum_over_processes(
            [t for g in names for t in (self.sums[g], self.outer[g])], process_group, dev
        )
        for g, sums, outer in zip(names, second[0::2], second[1::2], strict=True):
            self.sums[g], self.outer[g] = sums, outer
        if self.batch_distances:  # absolute distances: a plain sum, no re-basing
            nb = [torch.tensor([float(self.batches.get(g, 0))], dtype=torch.float64) for g in names]
            third = _sum_over_processes(
                [t for g, b in zip(names, nb, strict=True) for t in (self.batch_dist[g], b)],
                process_group,
                dev,
            )
            for g, dist_, b in zip(names, third[0::2], third[1::2], strict=True):
                self.batch_dist[g], self.batches[g] = dist_, int(round(b.item()))
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


def _distributed() -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("all_reduce needs an initialized torch.distributed process group")
    return dist


def _sum_over_processes(
    parts: list[Tensor], process_group: Any, device: torch.device
) -> list[Tensor]:
    """``parts`` summed over all processes in one float64 collective, returned on ``device``
    with their shapes (NCCL communicates on ``device``, other backends on the CPU)."""
    dist = _distributed()
    comm = device if dist.get_backend(process_group) == "nccl" else torch.device("cpu")
    flat = torch.cat([p.reshape(-1).to(comm, torch.float64) for p in parts])
    dist.all_reduce(flat, group=process_group)
    out = flat.to(device).split([p.numel() for p in parts])
    return [o.view(p.shape) for o, p in zip(out, parts, strict=True)]


# ---------------------------------------------------------------------------------------
# collection
# ---------------------------------------------------------------------------------------


@dataclass
class _Site:
    """One observed site: the buffer its hooks write, for which group; ``per_model`` holds
    each model's version of ``site`` (slices differ when the models' widths do).

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
    per_model: list[ActivationSite] = field(default_factory=list)

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
                site = entry.per_model[m] if entry.per_model else entry.site
                try:
                    module = model.get_submodule(site.module)
                except AttributeError as e:
                    raise ValueError(
                        f"model {m} has no submodule '{site.module}' (site "
                        f"'{site.node}' of group '{entry.group}'); all models must share "
                        "the architecture the spec was traced from"
                    ) from e
                observe = self._hook(m, entry, site)
                if getattr(site, "at_input", False):
                    hook = module.register_forward_pre_hook(
                        lambda _, args, f=observe: f(args[0] if args else None)
                    )
                else:
                    hook = module.register_forward_hook(lambda _, args, out, f=observe: f(out))
                self.handles.append(hook)

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, m: int, entry: _Site, site: ActivationSite) -> Callable[[Any], None]:
        """``hook(value)`` copies model ``m``'s view of the site (a module's output or input)
        into the buffer."""
        units = self.stats.units(entry.group, m)
        n, k = units.stop - units.start, self.stats.total_size(entry.group)
        offset, part = getattr(site, "offset", 0), getattr(site, "size", None)
        where = "input" if getattr(site, "at_input", False) else "output"

        def hook(output: Any) -> None:
            if self.current != m:  # a module object shared by several models
                return
            if not torch.is_tensor(output):
                raise TypeError(
                    f"site '{site.node}' of group '{entry.group}': the {where} of module "
                    f"'{site.module}' is {type(output).__name__}, not a tensor"
                )
            dim = site.dim + output.ndim if site.dim < 0 else site.dim
            width = output.shape[dim] if 0 <= dim < output.ndim else -1
            fits = (width == n) if part is None else (width >= offset + n)
            if not fits:
                return  # another call of a module used several times; the site is its last
            y = output.detach() if part is None else output.detach().narrow(dim, offset, n)
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
        args, kwargs = model_inputs(batch, self.device, float_dtype(self.models[0]))
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
            if not entry.written:
                raise RuntimeError(
                    f"site '{entry.site.node}' of group '{entry.group}' was never observed: "
                    f"module '{entry.site.module}' was not called with this group's width "
                    "during the forward pass (nn.MultiheadAttention, for one, reads its "
                    "out_proj's weight without calling it). Merge this model data-free "
                    "(weight matching), or collect statistics at other sites"
                )
            if entry.written != full or entry.buffer is None:
                raise RuntimeError(
                    f"site '{entry.site.node}' (module '{entry.site.module}') of group "
                    f"'{entry.group}' was not observed in every model during this batch"
                )
            by_group.setdefault(entry.group, []).append(entry)
        s = self.stats
        with _no_tf32(self.device):
            for g, entries in by_group.items():
                k = s.total_size(g)
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
                batch: tuple[Any, Any, int] = (0, 0, 0)  # this batch's Σ y yᵀ, Σ y, rows
                for e in entries:
                    p, total, rows = e.moments()
                    s.outer[g] += p
                    s.sums[g] += total
                    s.counts[g] = s.counts.get(g, 0) + rows
                    if s.raw_samples:
                        self._reservoir(g, e.rows())
                    if s.batch_distances:  # one batch = the rows of all the group's sites
                        batch = (batch[0] + p, batch[1] + total, batch[2] + rows)
                if s.batch_distances:
                    dist = _distances(*batch, s.shift[g])
                    if g in s.batch_dist:
                        s.batch_dist[g] += dist
                    else:
                        s.batch_dist[g] = dist
                    s.batches[g] = s.batches.get(g, 0) + 1

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


def _distances(gram: Tensor, sums: Tensor, rows: int, shift: Tensor) -> Tensor:
    """``‖z_u − z_v‖₂`` for all unit pairs of one batch, float64, from the Gram matrix
    ``Σ y yᵀ``, column sums ``Σ y`` and row count of the shifted rows ``y = z − shift``.

    With ``d = c_u − c_v``: ``‖z_u − z_v‖² = ‖y_u − y_v‖² + 2 d Σ(y_u − y_v) + rows d²``, which
    keeps the shift's cancellation benefit (small ``y``) instead of rebuilding ``Σ z zᵀ``.
    """
    p = gram.double()
    t = sums.double()
    d = shift[:, None] - shift[None, :]
    sq = (t[:, None] - t[None, :]).mul_(d).mul_(2.0).addcmul_(d, d, value=float(rows))
    diag = p.diagonal()
    sq.add_(diag[:, None]).add_(diag[None, :]).sub_(p, alpha=2.0)
    return sq.clamp_min_(0.0).sqrt_()


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
    specs: Sequence[SymmetrySpec] | None = None,
    batch_distances: bool = False,
) -> ActivationStats:
    """Moments of every group's units over ``batches``, for all ``models`` in one pass.

    Args:
        spec: the symmetry spec, traced from any one of the models (module names are shared).
            It names the groups; with ``specs`` the sizes and sites come from those.
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
            A group without module-output sites falls back to :func:`member_sites` (slices of
            Linear/Conv outputs, or their inputs); :class:`HookSite` entries may be given too.
        dtype: precision of the per-batch products (default: the activations' dtype, at
            least float32). Accumulation is always float64.
        seed: seed of the raw-buffer sampling (plus the process rank under
            ``torch.distributed``, so processes draw independent samples).
        specs: one spec per model, each traced from its own model, for parents of different
            widths (same group names, possibly different sizes). Every model's sites are
            chosen from its own spec, in the same way; a group's columns are then blocks of
            each model's own size (:meth:`ActivationStats.units`).
        batch_distances: also sum, per group, the pairwise distances between all units within
            each batch (:meth:`ActivationStats.batch_distance`, PLeaS's matching cost, read by
            ``activation_similarity(..., kind="neg_batch_dist")``). Costs one more float64
            ``(N*n, N*n)`` accumulator and one cdist-like pass over it per batch per group.
            The sum depends on how the data is cut into batches.

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
    specs = [spec] * len(models) if specs is None else list(specs)
    if len(specs) != len(models):
        raise ValueError(f"got {len(specs)} specs for {len(models)} models; pass one per model")
    for m, other in enumerate(specs):
        mine, ref = set(other.groups), set(spec.groups)
        if mine != ref:
            raise ValueError(
                f"the spec of model {m} does not have the groups of the reference spec (missing "
                f"{sorted(ref - mine)}, extra {sorted(mine - ref)}); specs are matched by group "
                "name, so trace every model of one architecture (widths may differ)"
            )
    names = list(spec.groups) if groups is None else list(groups)
    unknown = [g for g in names if g not in spec.groups]
    if unknown:
        raise KeyError(f"unknown groups {unknown}; the spec has {list(spec.groups)}")
    chosen = [  # per model: group -> sites
        {g: _resolve_sites(sp.groups[g], sites, model) for g in names}
        for sp, model in zip(specs, models, strict=True)
    ]
    for g in names:
        counts = [len(c[g]) for c in chosen]
        if len(set(counts)) > 1:
            raise ValueError(
                f"group '{g}' is observed at {counts} sites in the models; their specs must "
                "give corresponding sites"
            )
        for m, sp in enumerate(specs):
            parts = {getattr(x, "size", None) for x in chosen[m][g]} - {None, sp.groups[g].size}
            if parts:
                raise ValueError(
                    f"sites of group '{g}' in model {m} slice {sorted(parts)} units, but the "
                    f"group has {sp.groups[g].size}"
                )
    if groups is not None:
        empty = [g for g in names if not chosen[0][g]]
        if empty:
            raise ValueError(unobservable([specs[0].groups[g] for g in empty]))
    if raw_samples and torch.distributed.is_available() and torch.distributed.is_initialized():
        seed += torch.distributed.get_rank()
    observed = [g for g in names if chosen[0][g]]
    stats = ActivationStats(
        num_models=len(models),
        sizes={g: specs[0].groups[g].size for g in observed},
        sites={g: chosen[0][g] for g in observed},
        raw_samples=int(raw_samples),
        unobserved=[g for g in names if not chosen[0][g]],
        model_sizes={g: tuple(sp.groups[g].size for sp in specs) for g in observed},
        batch_distances=bool(batch_distances),
    )
    plan = [
        _Site(g, site, per_model=[c[g][i] for c in chosen])
        for g in observed
        for i, site in enumerate(chosen[0][g])
    ]
    dev = torch.device(device) if device is not None else None
    with _eval_on(models, dev) as dev, torch.no_grad():
        collector = _Collector(stats, plan, models, dev, dtype, seed)
        try:
            it = progress_bar(batches, desc="statistics", unit="batch", enabled=progress)
            for batch in it:
                collector.run(batch)
        finally:
            collector.close()
    for g in stats.sizes:  # groups that saw no data still all-reduce consistently
        k = stats.total_size(g)
        stats.shift.setdefault(g, torch.zeros(k, dtype=torch.float64, device=dev))
        stats.sums.setdefault(g, torch.zeros(k, dtype=torch.float64, device=dev))
        stats.outer.setdefault(g, torch.zeros(k, k, dtype=torch.float64, device=dev))
        stats.counts.setdefault(g, 0)
        if batch_distances:
            stats.batch_dist.setdefault(g, torch.zeros(k, k, dtype=torch.float64, device=dev))
            stats.batches.setdefault(g, 0)
    return stats


# ---------------------------------------------------------------------------------------
# least-squares products
# ---------------------------------------------------------------------------------------

#: Builds a layer's regressors (targets) from the N models' inputs (outputs) of that layer.
LayerMap = Callable[[list[Tensor]], Tensor]


@dataclass
class LayerProducts:
    """Normal-equation sums of layer-wise least squares, per Linear / Conv2d layer.

    PLeaS (algorithms.md §2, step 3) and the linear variant of neuron-interpolation fusion
    (§5) refit layers in closed form, ``θ₀ + solve(XᵀX + ridge·I, Xᵀ(Y − Xθ₀))``. Rows of X are
    the layer's inputs (im2col patches for a conv, columns ordered (channel, kh, kw) like
    ``weight.flatten(1)``), followed by a ones column when the layer has a bias; rows of Y are
    its targets. ``xtx`` and ``xty`` are float64 sums whose size does not grow with the number
    of samples, ``counts`` the rows summed. ``start[layer]`` is θ₀ (``(columns, outputs)``; no
    entry: zero) and ``xty`` holds ``Xᵀ(Y − Xθ₀)``: summed from each batch's residual, it keeps
    its float32 accuracy when θ₀ already nearly fits.
    """

    layers: list[str]
    bias: dict[str, bool]
    kernels: dict[str, tuple[int, ...]]  # () for a Linear, (kh, kw) for a Conv2d
    xtx: dict[str, Tensor] = field(default_factory=dict)
    xty: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    start: dict[str, Tensor] = field(default_factory=dict)

    def solve(self, layer: str, ridge: float = 0.0) -> tuple[Tensor, Tensor | None]:
        """``(weight, bias)`` minimising ``‖X θ − Y‖² + ridge ‖θ − θ₀‖²`` (the bias included),
        shaped like the layer's parameters (``(out, in, kh, kw)`` for a conv)."""
        if layer not in self.xtx:
            raise KeyError(f"no products for layer {layer!r}; collected: {sorted(self.xtx)}")
        a, b = self.xtx[layer], self.xty[layer]
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        theta = torch.linalg.solve(a + ridge * eye, b)
        if layer in self.start:
            theta = theta + self.start[layer].to(theta)
        weight, bias = (theta[:-1], theta[-1]) if self.bias[layer] else (theta, None)
        return weight.T.reshape(b.shape[1], -1, *self.kernels[layer]), bias

    def all_reduce(self, process_group: Any = None) -> LayerProducts:
        """Sum the products and counts over all processes of ``torch.distributed`` (in place).

        Every process must have seen at least one batch (the column count of a layer is only
        known from data). Returns ``self``.
        """
        _distributed()
        missing = [g for g in self.layers if g not in self.xtx]
        if missing:
            raise ValueError(f"layers {missing} saw no data on this process; nothing to sum")
        if not self.layers:
            return self
        parts = [
            t
            for g in self.layers
            for t in (
                self.xtx[g],
                self.xty[g],
                torch.tensor([float(self.counts[g])], dtype=torch.float64),
            )
        ]
        out = _sum_over_processes(parts, process_group, self.xtx[self.layers[0]].device)
        for g, xtx, xty, n in zip(self.layers, out[0::3], out[1::3], out[2::3], strict=True):
            self.xtx[g], self.xty[g], self.counts[g] = xtx, xty, int(round(n.item()))
        return self


def _unfold_args(layer: nn.Module, name: str) -> dict[str, Any] | None:
    """``None`` for a Linear (or Conv1D), ``F.unfold``'s arguments for a Conv2d, an error
    otherwise."""
    if isinstance(layer, nn.Linear) or is_transposed_linear(layer):
        return None
    if not isinstance(layer, nn.Conv2d):
        raise ValueError(
            f"layer '{name}' is a {type(layer).__name__}; least-squares products support "
            "nn.Linear and nn.Conv2d"
        )
    if layer.groups != 1:
        raise ValueError(
            f"layer '{name}' is a grouped conv (groups={layer.groups}): its least squares is one "
            "problem per group, which collect_layer_products does not split; leave it out"
        )
    if layer.padding_mode != "zeros":
        raise ValueError(
            f"layer '{name}' pads with {layer.padding_mode!r}; im2col (F.unfold) pads with zeros"
        )
    padding: Any = layer.padding
    if isinstance(padding, str):  # "valid", or "same" (stride 1), symmetric when even
        total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size, strict=True)]
        if padding == "same" and any(t % 2 for t in total):
            raise ValueError(f"layer '{name}': padding='same' is asymmetric here; unsupported")
        padding = (0, 0) if padding == "valid" else tuple(t // 2 for t in total)
    return {
        "kernel_size": layer.kernel_size,
        "dilation": layer.dilation,
        "padding": padding,
        "stride": layer.stride,
    }


def _add_products(
    out: LayerProducts,
    name: str,
    x: Tensor,
    y: Tensor,
    unfold: dict[str, Any] | None,
    dtype: torch.dtype,
) -> None:
    """Add one batch's ``XᵀX``, ``XᵀY`` of a layer, in chunks of about ``_BMM_ELEMENTS``."""
    if unfold is None:  # Linear: (..., in) rows
        xs, ys = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        step = max(1, _BMM_ELEMENTS // xs.shape[1])
    else:  # Conv2d: unfold step images at a time
        if x.ndim != 4 or y.ndim != 4:
            raise ValueError(
                f"layer '{name}': a conv's inputs and targets must be (B, C, H, W), got "
                f"{tuple(x.shape)} and {tuple(y.shape)}"
            )
        kh, kw = unfold["kernel_size"]
        step = max(1, _BMM_ELEMENTS // (x.shape[1] * kh * kw * y.shape[2] * y.shape[3]))
        xs, ys = x, y
    if xs.shape[0] != ys.shape[0]:
        raise ValueError(
            f"layer '{name}': inputs {tuple(x.shape)} and targets {tuple(y.shape)} do not "
            "have the same samples"
        )
    for xc, yc in zip(xs.split(step), ys.split(step), strict=True):
        xc, yc = xc.to(dtype), yc.to(dtype)
        if unfold is not None:
            xc = F.unfold(xc, **unfold).transpose(1, 2).reshape(-1, xc.shape[1] * kh * kw)
            yc = flatten_units(yc, 1)
            if xc.shape[0] != yc.shape[0]:
                raise ValueError(
                    f"layer '{name}': the targets {tuple(y.shape)} do not have one row per "
                    "output position of the conv"
                )
        if out.bias[name]:
            xc = F.pad(xc, (0, 1), value=1.0)
        if name in out.start:
            yc = yc - xc @ out.start[name].to(xc)
        if name not in out.xtx:
            out.xtx[name] = xc.new_zeros(xc.shape[1], xc.shape[1], dtype=torch.float64)
            out.xty[name] = xc.new_zeros(xc.shape[1], yc.shape[1], dtype=torch.float64)
            out.counts[name] = 0
        out.xtx[name] += (xc.T @ xc).to(torch.float64)
        out.xty[name] += (xc.T @ yc).to(torch.float64)
        out.counts[name] += xc.shape[0]


def layer_io(
    models: Sequence[nn.Module],
    batches: Iterable[Tensor | tuple | Mapping[str, Any]],
    layers: Sequence[str],
    *,
    inputs: Mapping[str, LayerMap] | None = None,
    targets: Mapping[str, LayerMap] | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Iterator[tuple[str, Tensor, Tensor]]:
    """``(layer, X, Y)`` for every layer of every batch: the inputs and targets a layer-wise
    refit sees (see :func:`collect_layer_products` for ``inputs`` / ``targets``; by default
    the N models' inputs / outputs concatenated on the channel axis).

    Each batch runs through every model under ``torch.no_grad`` in eval mode (modes and
    devices are restored when the generator finishes or is closed).
    """
    models, layers = list(models), list(dict.fromkeys(layers))
    inputs, targets = dict(inputs or {}), dict(targets or {})
    mods = [[model.get_submodule(name) for name in layers] for model in models]
    axis = {
        n: -1 if isinstance(m, nn.Linear) or is_transposed_linear(m) else 1
        for n, m in zip(layers, mods[0], strict=True)
    }
    seen: dict[str, list[tuple[Tensor, Tensor, int, int] | None]] = {}
    current = -1
    copying = [False] * len(models)  # models whose forward changes a kept tensor in place

    def keep(m: int, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if current == m:
                x, y = args[0].detach(), output.detach()  # share the version counters
                if copying[m]:
                    x, y = x.clone(), y.clone()
                seen[name][m] = (x, y, x._version, y._version)

        return hook

    def changed(m: int) -> bool:
        """Whether an in-place op after the hook (``out += identity``, an inplace activation
        on a Linear's output) changed one of model ``m``'s kept tensors."""
        kept = [seen[name][m] for name in layers]
        return any(p is not None and (p[0]._version, p[1]._version) != p[2:] for p in kept)

    dev = torch.device(device) if device is not None else None
    with _eval_on(models, dev) as dev, torch.no_grad(), _no_tf32(dev):
        handles = [
            mod.register_forward_hook(keep(m, name))
            for m, row in enumerate(mods)
            for name, mod in zip(layers, row, strict=True)
        ]
        try:
            it = progress_bar(batches, desc="layer inputs", unit="batch", enabled=progress)
            for batch in it:
                args, kwargs = model_inputs(batch, dev, float_dtype(models[0]))
                seen.update({name: [None] * len(models) for name in layers})
                for m, model in enumerate(models):
                    current = m
                    model(*args, **kwargs)
                    if not copying[m] and changed(m):
                        copying[m] = True  # from now on the hooks copy: run this batch again
                        model(*args, **kwargs)
                current = -1
                for name in layers:
                    pairs = seen[name]
                    if any(p is None for p in pairs):
                        raise RuntimeError(f"layer '{name}' was not called in every model")
                    xs = [p[0] for p in pairs if p is not None]
                    ys = [p[1] for p in pairs if p is not None]
                    x = inputs[name](xs) if name in inputs else torch.cat(xs, axis[name])
                    y = targets[name](ys) if name in targets else torch.cat(ys, axis[name])
                    yield name, x, y
        finally:
            for h in handles:
                h.remove()


def collect_layer_products(
    models: Sequence[nn.Module],
    batches: Iterable[Tensor | tuple | Mapping[str, Any]],
    layers: Sequence[str],
    *,
    inputs: Mapping[str, LayerMap] | None = None,
    targets: Mapping[str, LayerMap] | None = None,
    start: Mapping[str, tuple[Tensor, Tensor | None]] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
) -> LayerProducts:
    """``XᵀX`` and ``XᵀY`` of Linear / Conv2d ``layers`` (module names) over ``batches``.

    The sums behind the least-squares refits of PLeaS and neuron-interpolation fusion (see
    :class:`LayerProducts`). Each batch runs through every model; a hook keeps each model's
    input and output of each layer (a layer called several times per forward: its last call).
    By default X concatenates the N models' inputs on the channel axis (model-major, like
    :class:`ActivationStats`: a merged model's inputs are a linear map of it, so its products
    follow from these) and Y their outputs (the pre-activations). ``inputs[layer]`` /
    ``targets[layer]`` replace that: called with the list of the N models' inputs / outputs of
    the layer, they return X in the layer's input layout (e.g. the fused model's own input) /
    Y in its output layout (e.g. centroids of the parents' outputs).

    Convs are unfolded (im2col) with their kernel size, stride, padding and dilation, a few
    images at a time, so memory is set by the batch size, not the number of samples; grouped
    convs are refused. ``dtype`` is the precision of each chunk's products (float64 by default,
    since normal equations square the condition number; float32 halves the time); the sums
    are always float64. ``start[layer]`` is a ``(weight, bias)`` in the layer's own layout
    (``(out, in, kh, kw)`` for a conv; ``bias`` None: zero) that a refit stays near:
    ``xty`` then holds ``Xᵀ(Y − Xθ₀)`` and :meth:`LayerProducts.solve` returns
    ``θ₀ + (XᵀX + ridge·I)⁻¹ Xᵀ(Y − Xθ₀)``. Models run in eval mode under
    ``torch.no_grad`` (modes and devices restored); sums add up across processes with
    :meth:`LayerProducts.all_reduce`.

    Example:
        >>> p = collect_layer_products([model], loader, ["fc1"])  # doctest: +SKIP
        >>> weight, bias = p.solve("fc1", ridge=1e-6)  # fc1's own weights, up to the ridge
    """
    models, layers = list(models), list(dict.fromkeys(layers))
    if not models:
        raise ValueError("collect_layer_products needs at least one model")
    inputs, targets = dict(inputs or {}), dict(targets or {})
    stray = sorted((set(inputs) | set(targets)) - set(layers))
    if stray:
        raise ValueError(f"inputs/targets name layers {stray} that are not in layers={layers}")
    mods = [[model.get_submodule(name) for name in layers] for model in models]
    unfold = {name: _unfold_args(mod, name) for name, mod in zip(layers, mods[0], strict=True)}
    out = LayerProducts(
        layers,
        bias={name: mod.bias is not None for name, mod in zip(layers, mods[0], strict=True)},
        kernels={name: tuple(u["kernel_size"]) if u else () for name, u in unfold.items()},
    )
    for name, (weight, bias) in (start or {}).items():
        if name not in out.bias:
            raise ValueError(f"start names layer {name!r}, which is not in layers={layers}")
        theta = weight.detach().reshape(weight.shape[0], -1).T
        if out.bias[name]:
            b = torch.zeros(theta.shape[1]) if bias is None else bias.detach()
            theta = torch.cat([theta, b.to(theta)[None]])
        out.start[name] = theta.to(torch.float64)
    for name, x, y in layer_io(models, batches, layers, inputs=inputs, targets=targets,
                               device=device, progress=progress):  # fmt: skip
        _add_products(out, name, x, y, unfold[name], dtype)
    return out
