"""Renormalizers: BatchNorm statistics reset and REPAIR (algorithms.md §0.5, §6.2).

Averaging aligned networks shrinks the variance of hidden units ("variance collapse"); the
running statistics of any BatchNorm are also stale after weights change. Both are repaired
from data, without gradients:

* :func:`reset_bn` recomputes every BatchNorm's running mean/variance as a cumulative average
  over the given batches (``momentum=None``), in train mode.
* :func:`repair` (Jordan et al., REPAIR, arXiv 2211.08403) rescales every hidden conv/linear
  output channel of a merged model so that its mean and standard deviation on the data equal
  goal statistics computed from the endpoint models. The correction is folded back into the
  weights: the returned model has the original architecture and no hooks.

Both modify the model in place (like an optimizer step) and return it for chaining.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from symmerge.groupmap import GroupMap, _model_weights
from symmerge.progress import progress_bar
from symmerge.stats import _eval_on, _first_device, float_dtype, model_inputs

__all__ = ["repair", "reset_bn"]

_BN = nn.modules.batchnorm._BatchNorm
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (_BN, nn.GroupNorm, nn.LayerNorm)


def _progress(batches: Iterable[Any], progress: bool, desc: str) -> Iterable[Any]:
    return progress_bar(batches, desc=desc, unit="batch", enabled=progress)


def _reiterable(batches: Iterable[Any]) -> Iterable[Any]:
    """Several passes need the data several times; a one-shot iterator is materialized."""
    return list(batches) if iter(batches) is batches else batches


# ---------------------------------------------------------------------------------------
# BatchNorm reset
# ---------------------------------------------------------------------------------------


def reset_bn(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> nn.Module:
    """Recompute every BatchNorm's running statistics on ``batches`` (in place).

    Each BatchNorm is reset, switched to train mode with ``momentum=None`` (a cumulative
    average: running mean = mean of the batch means, running var = mean of the unbiased batch
    variances, every batch weighted equally) and the batches are run once without gradients.
    Only BatchNorm layers are in train mode during the pass, so dropout and friends do not
    perturb the statistics. Every module's mode and momentum are restored afterwards.

    Args:
        model: any model; BatchNorms without running statistics are left alone.
        batches: tensors, ``(inputs, labels)`` tuples or keyword mappings (see
            :func:`symmerge.stats.model_inputs`); use equal batch sizes for an exact average.
        device: where to run (default: the model's device).
        progress: show a progress bar.

    Returns:
        ``model``.
    """
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return model
    dev = torch.device(device) if device is not None else _first_device(model)
    saved = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in bns]
    with _eval_on([model], dev):
        momenta = [bn.momentum for bn in bns]
        try:
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None
                bn.train()
            seen = 0
            with torch.no_grad():
                for batch in _progress(batches, progress, "reset BN"):
                    args, kwargs = model_inputs(batch, dev, float_dtype(model))
                    model(*args, **kwargs)
                    seen += 1
        finally:
            for bn, mom in zip(bns, momenta, strict=True):
                bn.momentum = mom
    if not seen:
        for bn, state in zip(bns, saved, strict=True):
            bn.load_state_dict(state)
        raise ValueError("reset_bn got no batches; the model is unchanged")
    return model


# ---------------------------------------------------------------------------------------
# REPAIR
# ---------------------------------------------------------------------------------------


@dataclass
class _Point:
    """One repaired channel set: ``layer``'s output, observed and corrected at ``module``.

    ``module`` is the per-channel affine norm that directly consumes the layer's output when
    there is one (the correction then folds into its weight/bias, and a correction before the
    norm would be normalized away), else the layer itself. ``group`` names the channels' group
    (whose GroupMap gives their goals); ``size`` is their number in the model observed.
    """

    layer: str
    module: str
    dim: int
    size: int
    group: str = ""


class _Moments:
    """Per-channel mean and variance, merged batch by batch (Chan et al.), in float64."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Add the batch ``y`` (units on ``self.dim``); returns its own (mean, population var)."""
        other = [d for d in range(y.ndim) if d != self.dim]
        var_b, mean_b = torch.var_mean(y.detach(), dim=other, correction=0)
        var_b, mean_b = var_b.double(), mean_b.double()
        nb = y.numel() // y.shape[self.dim]
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = nb, mean_b, var_b * nb
            return mean_b, var_b
        n = self.n + nb
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + var_b * nb + delta.square() * (self.n * nb / n)
        self.n = n
        return mean_b, var_b

    @property
    def std(self) -> Tensor:
        assert self.m2 is not None
        return (self.m2 / self.n).clamp_min(0).sqrt()


class _Stop(Exception):
    """Raised by a hook to end a forward pass early: later layers are not needed."""


def _channel_shape(ndim: int, dim: int, size: int) -> list[int]:
    shape = [1] * ndim
    shape[dim] = size
    return shape


def _find_points(model: nn.Module, batch: Any, device: torch.device, spec: Any) -> list[_Point]:
    """Hidden conv/linear outputs (a group's module-output sites) in execution order, and where
    to correct them. ``spec`` gives the modules, unit dims and groups (the spec of a model of
    other widths does: sizes are read from the forward pass)."""
    if spec is None:
        from symmerge.spec import trace

        args, kwargs = model_inputs(batch, device, float_dtype(model))
        spec = trace(model, args, example_kwargs=kwargs or None)
    dims: dict[str, tuple[int, str]] = {}  # module -> (unit dim, group)
    layers: list[str] = []
    for gname, g in spec.groups.items():
        for s in g.sites:
            if not s.module_output:
                continue
            dims.setdefault(s.module, (s.dim, gname))
            if isinstance(model.get_submodule(s.module), _LAYERS) and s.module not in layers:
                layers.append(s.module)
    # One eager forward with hooks: execution order, and which norm consumes each output.
    produced: dict[int, tuple[str, Tensor]] = {}  # tensors kept alive so ids stay unique
    consumer: dict[str, str] = {}
    order: list[str] = []
    sizes: dict[str, int] = {}
    handles = []
    for name in layers:

        def rec(mod: nn.Module, a: Any, out: Any, name: str = name) -> None:
            produced[id(out)] = (name, out)
            if name not in order:
                order.append(name)
                sizes[name] = out.shape[dims[name][0]]

        handles.append(model.get_submodule(name).register_forward_hook(rec))
    for name, mod in model.named_modules():
        if isinstance(mod, _NORMS):

            def pre(m: nn.Module, a: Any, name: str = name) -> None:
                src = produced.get(id(a[0])) if a else None
                if src is not None and src[1] is a[0]:
                    consumer.setdefault(src[0], name)

            handles.append(mod.register_forward_pre_hook(pre))
    try:
        with _eval_on([model], device), torch.no_grad():
            args, kwargs = model_inputs(batch, device, float_dtype(model))
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    points = []
    for name in order:
        (dim, group), size = dims[name], sizes[name]
        norm = consumer.get(name)
        if norm is None:
            points.append(_Point(name, name, dim, size, group))
            continue
        mod = model.get_submodule(norm)
        affine = getattr(mod, "weight", None) is not None and getattr(mod, "bias", None) is not None
        if not affine or tuple(mod.weight.shape) != (size,) or norm not in dims:
            warnings.warn(
                f"REPAIR skips '{name}': its output feeds '{norm}' ({type(mod).__name__}), "
                "which has no per-channel affine parameters to carry the correction",
                stacklevel=3,
            )
            continue
        points.append(_Point(name, norm, dims[norm][0], size, group))
    return points


def _run(
    model: nn.Module,
    batches: Iterable[Any],
    device: torch.device,
    hooks: dict[str, Callable[..., Any]],
    progress: bool = False,
    desc: str = "",
) -> None:
    """One pass of ``model`` over ``batches`` with temporary forward hooks (ended by _Stop)."""
    handles = [model.get_submodule(k).register_forward_hook(h) for k, h in hooks.items()]
    try:
        with torch.no_grad():
            for batch in _progress(batches, progress, desc):
                args, kwargs = model_inputs(batch, device, float_dtype(model))
                try:
                    model(*args, **kwargs)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()


def _measure_hook(moments: _Moments, stop: bool = False) -> Callable[..., None]:
    def hook(mod: nn.Module, a: Any, out: Tensor) -> None:
        moments.update(out)
        if stop:
            raise _Stop

    return hook


def _batch_norm_hook(moments: _Moments, mean: Tensor, std: Tensor, eps: float) -> Callable:
    """REPAIR's train-mode pass: normalize with the batch's own stats, then map to the goal."""

    def hook(mod: nn.Module, a: Any, out: Tensor) -> Tensor:
        mu_b, var_b = moments.update(out)
        sd_b = var_b.sqrt().clamp_min(eps)
        shape = _channel_shape(out.ndim, moments.dim, out.shape[moments.dim])
        scale = (std / sd_b).to(out.dtype).view(shape)
        shift = (mean - mu_b * std / sd_b).to(out.dtype).view(shape)
        return out * scale + shift

    return hook


def _affine_hook(p: _Point, a: Tensor, b: Tensor) -> Callable[..., Tensor]:
    """The correction ``y -> a y + b`` as a hook (what :func:`_fold` bakes into weights)."""

    def hook(mod: nn.Module, args: Any, out: Tensor) -> Tensor:
        shape = _channel_shape(out.ndim, p.dim, p.size)
        return out * a.to(out.dtype).view(shape) + b.to(out.dtype).view(shape)

    return hook


def _correction(
    moments: _Moments, goal_mean: Tensor, goal_std: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Per-channel (a, b) with a·y + b having the goal mean/std; constant channels shift only."""
    assert moments.mean is not None
    std = moments.std
    a = torch.where(std > eps, goal_std / std.clamp_min(eps), torch.ones_like(std))
    return a, goal_mean - a * moments.mean


def _fold(model: nn.Module, p: _Point, a: Tensor, b: Tensor) -> None:
    """Bake ``y -> a y + b`` into the observed module: rows of W and the bias (or γ, β)."""
    mod = model.get_submodule(p.module)
    w = mod.weight
    with torch.no_grad():
        a_w = a.to(w.device, w.dtype)
        b_w = b.to(w.device, w.dtype)
        w.mul_(a_w.view(-1, *([1] * (w.ndim - 1))))
        if mod.bias is None:  # a bias-free conv/linear gains a bias to carry the shift
            mod.bias = nn.Parameter(b_w.clone(), requires_grad=w.requires_grad)
        else:
            mod.bias.mul_(a_w).add_(b_w)


def _goal_statistics(
    endpoints: Sequence[nn.Module],
    points: Sequence[_Point],
    batches: Iterable[Any],
    device: torch.device,
    map_of: Callable[[_Point], GroupMap],
    goal_std: str,
    progress: bool,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Every point's goal (mean, std): endpoint statistics through the merge matrices,
    ``Σ_m M_m stat_m`` (see :func:`repair`); ``map_of(point)`` is the point's GroupMap."""
    ends = [{p.module: _Moments(p.dim) for p in points} for _ in endpoints]
    with _eval_on(endpoints, device):
        handles = [
            e.get_submodule(p.module).register_forward_hook(_measure_hook(ends[m][p.module]))
            for m, e in enumerate(endpoints)
            for p in points
        ]
        try:
            with torch.no_grad():
                for batch in _progress(batches, progress, "REPAIR endpoints"):
                    args, kwargs = model_inputs(batch, device, float_dtype(endpoints[0]))
                    for e in endpoints:
                        e(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
    goals = {}
    for p in points:
        gm = map_of(p)
        sizes = tuple(e[p.module].std.numel() for e in ends)
        if (gm.sizes, gm.n_out) != (sizes, p.size):
            raise ValueError(
                f"the map of group {p.group!r} merges {gm.sizes} units into {gm.n_out}, but the "
                f"REPAIR point '{p.module}' has {sizes} units in the endpoints and {p.size} in "
                "the merged model"
            )

        def through(stats: list[Tensor], gm: GroupMap = gm) -> Tensor:  # Σ_m M_m stat_m
            return torch.stack([gm.merge(m, x, 0) for m, x in enumerate(stats)]).sum(0)

        mu = through([e[p.module].mean for e in ends])  # type: ignore[misc]
        if goal_std == "mean_of_stds":
            sd = through([e[p.module].std for e in ends])
        else:
            sd = through([e[p.module].std.square() for e in ends]).sqrt()
        goals[p.module] = (mu, sd)
    return goals


def repair(
    merged: nn.Module,
    endpoints: Sequence[nn.Module],
    batches: Iterable[Any],
    *,
    maps: Mapping[str, GroupMap] | None = None,
    weights: Sequence[float] | None = None,
    goal_std: str = "mean_of_stds",
    exact: bool = True,
    spec: Any = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    eps: float = 1e-8,
) -> nn.Module:
    """REPAIR ``merged`` so every hidden channel has its goal mean and std (in place).

    The points are the outputs of every conv/linear layer whose channels form a permutation
    group (hidden units, so not the logits). When such an output feeds a BatchNorm, GroupNorm or
    LayerNorm with per-channel affine parameters, the point is that norm's output (a correction
    before a norm would be normalized away) and the correction is folded into its weight and
    bias; otherwise it is folded into the layer's weight rows and bias (a bias-free layer
    gains a bias).

    Goal statistics of merged unit i of a group, from the merge matrices ``M_m`` of its
    :class:`~symmerge.groupmap.GroupMap` (n_out x n_m, model weights included: the merged bias
    is ``Σ_m M_m b_m``, and the rows of ``Σ_m M_m`` sum to Σ_m w_m, one for every map symmerge
    builds) and endpoint m's per-unit statistics μ_m, σ_m (vectors of length n_m):

        μ*_i = Σ_m (M_m μ_m)_i
        σ*_i = Σ_m (M_m σ_m)_i               (goal_std="mean_of_stds", REPAIR's rule)
        σ*_i = sqrt(Σ_m (M_m σ²_m)_i)        (goal_std="mean_of_vars", C2M3's N-model code)

    For a permutation ``M_m = w_m P_m`` this is REPAIR's μ*_i = Σ_m w_m μ_{m, perm_m[i]}; a zip
    averages the statistics of the units it merges; a unit kept from one model (side by side,
    unmatched units of a wider model) has mass 1 there, so its goal is that unit's own
    statistics. Without ``maps`` the endpoints are aligned to ``merged`` and every group has the
    identity map with weights ``w_m``: μ*_c = Σ_m w_m μ_{m,c}.

    Passes over ``batches``: one for the endpoints (eval mode); then REPAIR's own pass, with
    every BatchNorm of ``merged`` reset in train mode (cumulative average) and every point
    normalized by its *batch* statistics and mapped to the goal; the pooled statistics of that
    pass give the correction, folded into the weights. In eval mode this is only approximately
    right (about 1e-2 relative in deep ResNets: eval-mode inputs differ from the batch-normalized
    ones). With ``exact=True`` (default) every point is then measured again in eval mode, in
    execution order, and corrected once more; each such pass stops right after its point, so
    this costs about half a pass per point. Afterwards, on ``batches``, every channel's mean and
    std equal the goal up to float round-off. (Correcting all points from one shared pass does
    not converge on residual streams: an upstream correction reaches every later point through
    the skip connections.) A corrected channel keeps the sign of its merged scale (a BatchNorm
    with γ < 0 stays negative), so a unit whose goal is its source's own statistics computes
    that source's function again: REPAIR leaves a side-by-side ensemble unchanged.

    Args:
        merged: the merged model, same architecture as the endpoints.
        endpoints: the N source models, with valid statistics (a BN endpoint may need
            :func:`reset_bn` first); run in eval mode. With ``maps``: as merged (same module
            names, their own unit order and widths). Without: **aligned** to ``merged`` (unit c
            of every endpoint is unit c of the merged model, e.g.
            ``spec.permuted(model_b, perms)``).
        batches: the data (re-iterable; a one-shot iterator is materialized as a list).
        maps: the merge's GroupMap per group name (``MergeResult.maps``); groups left out get
            the identity map with ``weights``, as in :func:`~symmerge.groupmap.build_state_dict`.
        weights: endpoint weights, e.g. ``(1 - λ, λ)`` on an interpolation path (default: the
            maps' weights, or uniform).
        goal_std: ``"mean_of_stds"`` (default) or ``"mean_of_vars"``.
        exact: add the per-point eval-mode passes (see above).
        spec: a :class:`~symmerge.spec.SymmetrySpec` of the architecture, the group names of
            ``maps`` (traced from ``merged`` if None; any widths: only modules, unit dims and
            group names are read).
        device: where to run (default: the merged model's device).
        progress: show progress bars.
        eps: channels whose std is below this are treated as constant (shifted, not scaled).

    Returns:
        ``merged``, repaired, in its original modes.

    Reference:
        Jordan, Sedghi, Saukh, Entezari, Neyshabur, "REPAIR: REnormalizing Permuted Activations
        for Interpolation Repair", ICLR 2023, https://arxiv.org/abs/2211.08403
    """
    endpoints = list(endpoints)
    if not endpoints:
        raise ValueError("repair needs at least one endpoint model")
    if goal_std not in ("mean_of_stds", "mean_of_vars"):
        raise ValueError(
            "The 'goal_std' parameter of repair must be 'mean_of_stds' or 'mean_of_vars'. "
            f"Got {goal_std!r} instead."
        )
    w = [1.0 / len(endpoints)] * len(endpoints) if weights is None else [float(x) for x in weights]
    if len(w) != len(endpoints):
        raise ValueError(f"got {len(w)} weights for {len(endpoints)} endpoints")
    if maps is not None and weights is None:
        w = list(_model_weights(maps, None, len(endpoints)))
    shapes = {k: v.shape for k, v in merged.state_dict().items()}
    for i, e in enumerate(endpoints):
        own = {k: v.shape for k, v in e.state_dict().items()}
        if set(own) != set(shapes) or (maps is None and own != shapes):
            raise ValueError(
                f"endpoint {i} does not have the merged model's parameter names and shapes; "
                "without maps= REPAIR needs endpoints aligned to the merged model's units "
                "(same widths)"
            )
    batches = _reiterable(batches)
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("repair got no batches")
    dev = torch.device(device) if device is not None else _first_device(merged)
    points = _find_points(merged, first, dev, spec)
    if not points:
        return merged
    given = {} if maps is None else maps

    def map_of(p: _Point) -> GroupMap:
        return given.get(p.group) or GroupMap.identity(p.size, len(endpoints), w)

    goals = _goal_statistics(endpoints, points, batches, dev, map_of, goal_std, progress)

    bns = [m for m in merged.modules() if isinstance(m, _BN) and m.track_running_stats]
    with _eval_on([merged], dev):
        # REPAIR's train-mode pass: reset BatchNorms, normalize points by batch statistics
        momenta = [bn.momentum for bn in bns]
        with torch.no_grad():
            for p in points:
                mod = merged.get_submodule(p.module)
                if isinstance(mod, _BN):  # the correction carries the affine, but not its sign
                    mod.weight.copy_(torch.where(mod.weight < 0, -1.0, 1.0))
                    mod.bias.zero_()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        seen = {p.module: _Moments(p.dim) for p in points}
        try:
            hooks = {
                p.module: _batch_norm_hook(seen[p.module], *goals[p.module], eps) for p in points
            }
            _run(merged, batches, dev, hooks, progress, "REPAIR train-mode pass")
        finally:
            for bn, mom in zip(bns, momenta, strict=True):
                bn.momentum = mom
                bn.eval()
        for p in points:
            _fold(merged, p, *_correction(seen[p.module], *goals[p.module], eps))

        # exact: measure and correct each point in eval mode, upstream points already final
        for p in points if exact else []:
            mom = _Moments(p.dim)
            _run(merged, batches, dev, {p.module: _measure_hook(mom, stop=True)})
            _fold(merged, p, *_correction(mom, *goals[p.module], eps))
    return merged
