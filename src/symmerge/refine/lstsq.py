"""Layer-wise least squares: refit every Linear / Conv2d layer (and Hugging Face ``Conv1D``,
a Linear stored ``(in, out)``) of a merged model so that it maps the merged inputs to the
merged targets (PLeaS step 3, algorithms.md §2).

Teacher forcing: every layer is fitted on the *source* models run side by side on the same
batch. With the maps of the merge, the layer's inputs and targets in merged coordinates are
``X~ = sum_m M_m x_m`` and ``Y~ = sum_m M_m y_m`` (:func:`symmerge.groupmap.merge_values`:
matched units averaged, private units kept, image channels and logits averaged), where ``y``
is the layer's own output, before any normalisation. The layers are then independent.

Structural zeros stay zero: every weight keeps the support the weight builder gives it
(:func:`~symmerge.groupmap.merged_support`; a partial merge's ``W[S_A, S_B]`` and
``W[S_B, S_A]`` blocks are empty), and a row is fitted on the columns of its support only.

* ``"closed"``: normal equations ``(X^T X + lambda I) theta = X^T Y + lambda theta_0`` per
  group of rows sharing a support, from the float64 sums of
  :func:`symmerge.stats.collect_layer_products` (im2col for convs; memory independent of the
  number of samples); ``lambda = ridge`` times the mean of the diagonal, so the ridge is
  scale-free. The ridge pulls toward the start ``theta_0`` (the merged weights), not toward
  zero, and at ``ridge=0`` a rank-deficient fit takes the solution nearest the start: where the
  data leave a direction free (fewer samples than inputs) the merge keeps it, as Adam from the
  merged start does, and weights that already fit (a permuted copy, identical models) stay.
* ``"adam"``: the official code's optimiser, all layers at once on the summed per-layer mean
  squared error, Adam with cosine-annealed learning rate, one batch a step; gradients are
  masked by the support, so zero blocks stay exactly zero for any input and output widths.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symmerge.flops import is_transposed_linear
from symmerge.groupmap import GroupMap, merge_values, merged_support
from symmerge.spec import Member, SymmetrySpec

__all__ = ["LSQ_SOLVERS", "LeastSquaresResult", "fit_layers"]

#: Solvers of :func:`fit_layers`.
LSQ_SOLVERS = ("closed", "adam")
#: Where the regressors of :func:`fit_layers` come from.
LSQ_INPUTS = ("ensemble", "merged")


@dataclass
class LeastSquaresResult:
    """Refitted weights and what was (not) fitted.

    Attributes:
        state_dict: the merged state dict with every fitted layer's weight and bias replaced.
        layers: the layers fitted, in model order.
        skipped: layers left as they were, with the reason.
        loss: per layer, the mean squared error on the last pass (Adam) or ``None``.
        seconds: wall time.
    """

    state_dict: dict[str, Tensor]
    layers: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    loss: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _layers(model: nn.Module, spec: SymmetrySpec) -> tuple[list[str], dict[str, str]]:
    """Linear and Conv2d layers a least-squares fit can take, and the reasons for the rest."""
    tied = {t for k, v in spec.aliases.items() for t in (k, *v)}
    fitted, skipped = [], {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)) and not is_transposed_linear(mod):
            continue
        if f"{name}.weight" not in spec.shapes:
            skipped[name] = "the forward does not call it (an auxiliary head in eval mode)"
        elif f"{name}.weight" in tied:
            skipped[name] = "its weight is tied to another tensor"
        elif isinstance(mod, nn.Conv2d) and mod.groups != 1:
            skipped[name] = f"grouped conv (groups={mod.groups})"
        elif isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
            skipped[name] = f"padding_mode={mod.padding_mode!r}"
        else:
            fitted.append(name)
    return fitted, skipped


def _teacher(
    spec: SymmetrySpec | Sequence[SymmetrySpec],
    maps: Mapping[str, GroupMap],
    weights: Sequence[float],
    model: nn.Module,
    layers: Sequence[str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per layer, the functions mapping the models' inputs / outputs to merged coordinates
    (``spec``: one per model when their widths differ)."""
    specs = [spec] * len(weights) if isinstance(spec, SymmetrySpec) else list(spec)
    layouts: list[dict[str, dict[int, Member]]] = []
    for sp in specs:
        layouts.append({})
        for mem in sp.members():
            layouts[-1].setdefault(mem.tensor, {})[mem.axis] = mem
    inputs, targets = {}, {}
    for name in layers:
        axes = [layout.get(f"{name}.weight", {}) for layout in layouts]
        mod = model.get_submodule(name)
        out = int(is_transposed_linear(mod))  # the weight's output axis
        dim = -1 if out or isinstance(mod, nn.Linear) else 1
        inputs[name] = _merger([a.get(1 - out) for a in axes], maps, dim, weights)
        targets[name] = _merger([a.get(out) for a in axes], maps, dim, weights)
    return inputs, targets


def _merger(
    mem: Sequence[Member | None], maps: Mapping[str, GroupMap], dim: int, weights: Sequence[float]
) -> Any:
    def merged(values: list[Tensor]) -> Tensor:
        return merge_values(values, mem, maps, dim, weights)

    return merged


def fit_layers(
    spec: SymmetrySpec | Sequence[SymmetrySpec],
    models: Sequence[nn.Module],
    maps: Mapping[str, GroupMap],
    state_dict: Mapping[str, Tensor],
    data: Iterable[Any],
    *,
    solver: str = "closed",
    inputs_from: str = "ensemble",
    only: Sequence[str] | None = None,
    targets: Mapping[str, Callable[[list[Tensor]], Tensor]] | None = None,
    ridge: float = 1e-4,
    dtype: torch.dtype | None = None,
    steps: int = 400,
    lr: float = 5e-4,
    device: str | torch.device | None = None,
    progress: bool = False,
    dense: bool = False,
) -> LeastSquaresResult:
    """Refit the Linear / Conv2d layers of the merged ``state_dict`` on teacher-forced inputs.

    Args:
        spec: the models' symmetry (one spec per model when their widths differ); ``maps``
            the merge's GroupMap of every group (their ``weights`` average what no group
            holds).
        models: the source models (run on ``data``).
        state_dict: the merged weights: Adam's start, and what the closed form's ridge pulls
            toward.
        data: batches (tensors or ``(inputs, labels)``), iterated once (closed form) or
            cycled for ``steps`` batches (Adam).
        solver: ``"closed"`` or ``"adam"``.
        inputs_from: ``"ensemble"`` (teacher forcing, the paper) or ``"merged"``: layer by
            layer in module order, each fitted (closed form) on the merged model's own inputs,
            its earlier layers already refitted, so it tracks its own drift; BatchNorm
            statistics are reset on ``data`` before each layer (one or two passes per layer).
        only: fit these layers alone (module names; the rest keep their weights).
        targets: per layer, a function of the N models' outputs of that layer giving its
            target in merged coordinates, instead of ``sum_m M_m y_m`` (e.g. a head whose
            logits are weighted per class by each parent's share of the class's data).
        ridge: relative ridge of the closed form, toward the weights of ``state_dict``.
        dtype: precision of each chunk of the normal-equation products (their sums are
            float64); default float32 (twice as fast; the ridge bounds the conditioning), or
            float64 when ``ridge == 0`` (an exact fit).
        steps, lr: Adam's steps (batches) and peak learning rate (cosine to 0).
        dense: fit every weight; by default a weight the maps leave structurally zero (a
            partial merge's blocks between two models' private units) stays zero, which
            PLeaS's compute budget needs; neuron-interpolation fusion fits dense layers.
    """
    if solver not in LSQ_SOLVERS:
        raise ValueError(
            f"The 'solver' parameter must be one of {LSQ_SOLVERS}. Got {solver!r} instead."
        )
    if inputs_from not in LSQ_INPUTS:
        raise ValueError(
            f"The 'inputs_from' parameter must be one of {LSQ_INPUTS}. Got {inputs_from!r} instead."
        )
    if inputs_from == "merged" and solver != "closed":
        raise ValueError("inputs_from='merged' fits layer by layer in closed form: solver='closed'")
    if not (isinstance(ridge, (int, float)) and ridge >= 0 and math.isfinite(ridge)):
        raise ValueError(f"The 'ridge' parameter must be a float >= 0. Got {ridge!r} instead.")
    t0 = time.perf_counter()
    if dtype is None:
        dtype = torch.float64 if ridge == 0 else torch.float32
    models = list(models)
    spec0 = spec if isinstance(spec, SymmetrySpec) else spec[0]
    layers, skipped = _layers(models[0], spec0)
    if only is not None:
        unknown = sorted(set(only) - set(layers))
        if unknown:
            raise ValueError(f"only= names layers that cannot be fitted: {unknown}")
        layers = [n for n in layers if n in set(only)]
    weights = next(iter(maps.values())).weights if maps else [1.0 / len(models)] * len(models)
    sds = [{k: v.detach() for k, v in m.state_dict().items()} for m in models]
    masks = merged_support(spec, sds, maps, [f"{n}.weight" for n in layers])
    flipped = {n for n in layers if is_transposed_linear(models[0].get_submodule(n))}
    masks = {k: v.T if k.removesuffix(".weight") in flipped else v for k, v in masks.items()}
    if dense:
        masks = {k: torch.ones_like(v) for k, v in masks.items()}
    unknown = sorted(set(targets or {}) - set(layers))
    if unknown:
        raise ValueError(f"targets name layers that are not fitted: {unknown}")
    inputs, goals = _teacher(spec, maps, weights, models[0], layers)
    goals.update(targets or {})
    out = {k: v.clone() for k, v in state_dict.items()}
    loss: dict[str, float] = {}
    if inputs_from == "merged":
        out = _sequential(spec, models, maps, out, data, layers, goals, masks, ridge, dtype,
                          device)  # fmt: skip
    elif solver == "closed":
        from symmerge.stats import collect_layer_products

        start = {n: (_supported(_oriented(out[f"{n}.weight"], n in flipped), masks[f"{n}.weight"]),
                     out.get(f"{n}.bias")) for n in layers}  # fmt: skip
        products = collect_layer_products(models, data, layers, inputs=inputs, targets=goals,
                                          start=start, device=device, dtype=dtype,
                                          progress=progress)  # fmt: skip
        for name in layers:
            weight, bias = _solve(products, name, masks[f"{name}.weight"], ridge)
            _store(out, name, weight, bias, name in flipped)
    else:
        loss = _adam(models, layers, flipped, inputs, goals, masks, out, data, steps, lr,
                     device, progress)  # fmt: skip
    return LeastSquaresResult(out, layers, skipped, loss, time.perf_counter() - t0)


def _sequential(
    spec: SymmetrySpec | Sequence[SymmetrySpec],
    models: list[nn.Module],
    maps: Mapping[str, GroupMap],
    state: dict[str, Tensor],
    data: Iterable[Any],
    layers: list[str],
    targets: Mapping[str, Any],
    masks: Mapping[str, Tensor],
    ridge: float,
    dtype: torch.dtype,
    device: str | torch.device | None,
) -> dict[str, Tensor]:
    """Each layer in turn fitted on the merged model's own inputs (its earlier layers done).

    The parents' targets do not change from layer to layer, so they are computed in one pass
    and kept when they fit in :data:`TARGET_CACHE_BYTES` (then each layer runs only the merged
    model); otherwise every layer runs the parents again. ``data`` is read into a list once,
    so every pass sees the same batches in the same order.
    """
    from symmerge.merging import build_model, has_bn_statistics
    from symmerge.renorm import reset_bn
    from symmerge.stats import collect_layer_products

    spec0 = spec if isinstance(spec, SymmetrySpec) else spec[0]
    merged = build_model(models[0], spec0, maps, state)
    batches = list(data)
    n = len(models)
    cache = _cached_targets(models, batches, layers, targets, device)

    def own(xs: list[Tensor]) -> Tensor:
        return xs[-1]

    for name in layers:
        if has_bn_statistics(merged):
            reset_bn(merged, batches)
        if cache is not None:
            run, target = [merged], _replay(cache[name], name)
        else:
            run, target = [*models, merged], _on_parents(targets[name], n)
        layer = merged.get_submodule(name)
        flip = is_transposed_linear(layer)
        weight = _supported(_oriented(layer.weight.detach(), flip), masks[f"{name}.weight"])
        start = {name: (weight, layer.bias)}
        products = collect_layer_products(run, batches, [name], inputs={name: own},
                                          targets={name: target}, start=start, device=device,
                                          dtype=dtype)  # fmt: skip
        weight, bias = _solve(products, name, masks[f"{name}.weight"], ridge)
        with torch.no_grad():
            layer.weight.copy_(_oriented(weight, flip).reshape(layer.weight.shape))
            if bias is not None and layer.bias is not None:
                layer.bias.copy_(bias)
    if has_bn_statistics(merged):
        reset_bn(merged, batches)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


#: Most bytes of parents' layer targets :func:`fit_layers` keeps between layers.
TARGET_CACHE_BYTES = 1 << 30


def _on_parents(goal: Any, n: int) -> Callable[[list[Tensor]], Tensor]:
    def target(ys: list[Tensor]) -> Tensor:
        return goal(ys[:n])

    return target


def _cached_targets(
    models: list[nn.Module],
    batches: list[Any],
    layers: list[str],
    targets: Mapping[str, Any],
    device: str | torch.device | None,
) -> dict[str, list[Tensor]] | None:
    """Every layer's target on every batch from one pass of the parents, or ``None`` once
    they pass :data:`TARGET_CACHE_BYTES`."""
    from symmerge.stats import layer_io

    cache: dict[str, list[Tensor]] = {name: [] for name in layers}
    size = 0
    stream = layer_io(models, batches, layers, inputs={name: _first for name in layers},
                      targets=targets, device=device)  # fmt: skip
    for name, _, y in stream:
        cache[name].append(y)
        size += y.numel() * y.element_size()
        if size > TARGET_CACHE_BYTES:
            stream.close()
            return None
    return cache


def _first(xs: list[Tensor]) -> Tensor:
    return xs[0]


def _replay(saved: list[Tensor], name: str) -> Callable[[list[Tensor]], Tensor]:
    """The cached targets of ``name``, batch after batch (the merged model's outputs only
    check the shape)."""
    it = iter(saved)

    def target(ys: list[Tensor]) -> Tensor:
        y = next(it)
        if y.shape != ys[0].shape:
            raise RuntimeError(f"layer '{name}': cached target {tuple(y.shape)} does not match "
                               f"the output {tuple(ys[0].shape)}")  # fmt: skip
        return y

    return target


def _store(
    out: dict[str, Tensor], name: str, weight: Tensor, bias: Tensor | None, flip: bool
) -> None:
    """Write a fitted ``(out, in)`` weight (``flip``: a Conv1D's, stored ``(in, out)``)."""
    key = f"{name}.weight"
    out[key] = _oriented(weight, flip).reshape(out[key].shape).to(out[key].dtype)
    if bias is not None:
        out[f"{name}.bias"] = bias.to(out[f"{name}.bias"].dtype)


def _supported(weight: Tensor, mask: Tensor) -> Tensor:
    """``weight`` with the entries outside its support zeroed (the start of a fit)."""
    return weight * mask.to(weight.device)


def _oriented(weight: Tensor, flip: bool) -> Tensor:
    """A Conv1D's ``(in, out)`` weight as ``(out, in)`` and back; other weights as they are."""
    return weight.T if flip else weight


def _solve(products: Any, name: str, mask: Tensor, ridge: float) -> tuple[Tensor, Tensor | None]:
    """Each group of rows sharing a support solved on the columns of that support: the start
    (``products.start``) plus the correction of least norm (ridge: shrunk toward the start)."""
    if name not in products.xtx:
        raise ValueError(f"layer '{name}' saw no data; least squares needs at least one batch")
    xtx, xty = products.xtx[name].cpu(), products.xty[name].cpu()  # summed on any device
    theta0 = products.start[name].to(xty) if name in products.start else torch.zeros_like(xty)
    has_bias = products.bias[name]
    cols = mask.reshape(mask.shape[0], -1).cpu()
    if has_bias:
        cols = torch.cat([cols, torch.ones(cols.shape[0], 1, dtype=torch.bool)], 1)
    theta = torch.zeros(xtx.shape[0], cols.shape[0], dtype=xtx.dtype)
    patterns, which = torch.unique(cols, dim=0, return_inverse=True)
    for p, pattern in enumerate(patterns):
        rows = torch.nonzero(which == p).squeeze(1)
        keep = torch.nonzero(pattern).squeeze(1)
        a = xtx[keep][:, keep]
        scale = float(torch.diagonal(a).mean()) if a.numel() else 0.0
        lam = ridge * (scale if scale > 0 else 1.0)
        t0 = theta0[keep][:, rows]
        # xty is Xᵀ(Y − Xθ₀) over all columns: the start's columns outside this support
        # (structural zeros, 0 in θ₀) add nothing, so this block is the support's residual
        rhs = xty[keep][:, rows]
        if lam == 0:  # no ridge: the correction of least norm, also when X is rank deficient
            sol = torch.linalg.lstsq(a, rhs, driver="gelsd").solution
        else:
            sol = torch.linalg.solve(a + lam * torch.eye(keep.numel(), dtype=a.dtype), rhs)
        theta[keep[:, None], rows[None, :]] = t0 + sol
    weight, bias = (theta[:-1], theta[-1]) if has_bias else (theta, None)
    return weight.T.contiguous(), bias


def _apply(mod: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if isinstance(mod, nn.Linear) or is_transposed_linear(mod):  # weight (out, in) here
        return F.linear(x, weight, bias)
    assert isinstance(mod, nn.Conv2d)
    return F.conv2d(x, weight, bias, mod.stride, mod.padding, mod.dilation, mod.groups)


def _cycle(data: Iterable[Any], steps: int) -> Iterable[Any]:
    done = 0
    while done < steps:
        empty = True
        for batch in data:
            empty = False
            yield batch
            done += 1
            if done >= steps:
                return
        if empty or iter(data) is data:  # an exhausted one-shot iterator: stop early
            return


def _adam(
    models: list[nn.Module],
    layers: list[str],
    flipped: set[str],
    inputs: Mapping[str, Any],
    targets: Mapping[str, Any],
    masks: Mapping[str, Tensor],
    out: dict[str, Tensor],
    data: Iterable[Any],
    steps: int,
    lr: float,
    device: str | torch.device | None,
    progress: bool,
) -> dict[str, float]:
    """Adam on the summed per-layer MSE; weights start from ``out`` and are written back."""
    from symmerge.stats import layer_io

    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"The 'steps' parameter must be an int >= 1. Got {steps!r} instead.")
    dev = torch.device(device) if device is not None else next(models[0].parameters()).device
    mods = {n: models[0].get_submodule(n) for n in layers}
    params: dict[str, list[Tensor]] = {}
    for n in layers:
        w = out[f"{n}.weight"].detach().to(dev, torch.float32)
        w = _oriented(w, n in flipped).clone().requires_grad_(True)
        b = out.get(f"{n}.bias")
        params[n] = [w] + ([b.detach().to(dev, torch.float32).clone().requires_grad_(True)]
                           if b is not None and mods[n].bias is not None else [])  # fmt: skip
    mask = {n: masks[f"{n}.weight"].to(dev) for n in layers}
    opt = torch.optim.Adam([p for ps in params.values() for p in ps], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    last: dict[str, float] = {}
    batch_losses: list[Tensor] = []
    for step, batch in enumerate(_cycle(data, steps)):
        batch_losses.clear()
        for name, x, y in layer_io(models, [batch], layers, inputs=inputs, targets=targets,
                                   device=dev):  # fmt: skip
            w, *b = params[name]
            with torch.enable_grad():
                pred = _apply(mods[name], x.float(), w * mask[name], b[0] if b else None)
                err = F.mse_loss(pred, y.float())
            batch_losses.append(err)
            last[name] = float(err)
        opt.zero_grad(set_to_none=True)
        torch.stack(batch_losses).sum().backward()
        for n in layers:
            params[n][0].grad.mul_(mask[n])  # zero blocks get no update, so they stay zero
        opt.step()
        sched.step()
        if progress and step % 50 == 0:
            print(f"least squares (adam) step {step}: loss {sum(last.values()):.4g}")
    for n in layers:
        w, *b = params[n]
        _store(out, n, (w * mask[n]).detach().cpu(), b[0].detach().cpu() if b else None,
               n in flipped)  # fmt: skip
    return last
