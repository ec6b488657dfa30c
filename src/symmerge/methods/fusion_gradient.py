"""Neuron-interpolation fusion, gradient variant (``kf-gradient``): group the parents' neurons as
``kf-linear`` does, then train the fused model level by level, with Adam, to the groups' mean
outputs, each level on the fused model's *own* inputs (algorithms.md §5(b), "ALF").

The levels come from the traced spec (:mod:`symmerge.refine.levels`): a Linear / Conv with its
norm, or a whole residual block, the head last; a level's output is its pre-activation. For
level l the target of fused unit k is ``T_k = sum_{j in k} s_j z_j / S_k``, the
importance-weighted mean of its members' outputs at the level's output (the parents run on the
fusion inputs, mapped by the grouping's GroupMaps), and the level's parameters minimise
``sum_k S_k mean (f_l(X_l)_k - T_k)^2`` (``loss="weighted"``) or the plain mean squared error
(``loss="mse"``, the paper's experiment default), where ``X_l`` is what the fused model, its
levels before l already fitted, feeds level l. The head's target is the parents' logits
averaged, weighted per class by each parent's share of the class's data (``class-share``), or
the KL divergence to their softened combination (``head="kl"``).

Training: an 80/20 split of the fusion set (seeded), Adam, at most ``epochs`` epochs per level,
early stopping when the held-out loss has not improved for ``patience`` epochs; the level keeps
its parameters of lowest held-out loss (the start included, so a level already on its targets
is left unchanged). The model runs in eval mode: BatchNorm running statistics stay the
clusters' means, and its affine parameters are trained with the level.

Differences from the official code: the fused model starts from the clusters' weighted means
(the grouping's GroupMaps through the builder), not from parent 1 re-initialised (its default
``weight_perturbation = 1``); neurons are grouped once, up front, on every group's producing
layer, as for ``kf-linear``; the KL head softens the combined logits (one teacher), not each
parent's.

Reference: "Model Fusion via Neuron Interpolation", arXiv 2507.00037 (algorithms.md §5).
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

from symmerge.groupmap import build_state_dict, merge_values
from symmerge.methods import MergeResult, register_method
from symmerge.methods.fusion import _PAPER, _URL, _head_targets, group_neurons
from symmerge.methods.rebasin import Models, _state_dicts
from symmerge.refine.levels import Level, levels, run_until
from symmerge.spec import Member, SymmetrySpec

__all__ = ["GRADIENT_HEADS", "GRADIENT_LOSSES", "LevelFit", "fit_level", "kf_gradient"]

#: The ``loss`` choices of kf-gradient.
GRADIENT_LOSSES = ("mse", "weighted")
#: The ``head`` choices of kf-gradient.
GRADIENT_HEADS = ("auto", "mean", "class-share", "kl")
_NAME = "kf-gradient"


@dataclass
class LevelFit:
    """How one level's training went.

    Attributes:
        level: the level's index.
        epochs: epochs run.
        best_epoch: the epoch whose parameters were kept (0: the start was never beaten).
        train_loss: mean training loss of every epoch.
        val_loss: held-out loss at the start, then after every epoch.
        stopped_early: the held-out loss stopped improving before ``epochs`` ran out.
    """

    level: int
    epochs: int = 0
    best_epoch: int = 0
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no per-epoch curves)."""
        return {"level": self.level, "epochs": self.epochs, "best_epoch": self.best_epoch,
                "start_loss": self.val_loss[0], "best_loss": min(self.val_loss),
                "stopped_early": self.stopped_early}  # fmt: skip


@register_method(_NAME, paper=_PAPER, url=_URL, needs_data=True, max_models=None,
                 unequal_widths=True, target_width=True)  # fmt: skip
def kf_gradient(
    spec: SymmetrySpec,
    models: Models,
    *,
    data: Iterable[Any] | None = None,
    lam: float = 0.5,
    seed: int = 0,
    width: int | Mapping[str, int] | None = None,
    importance: str = "uniform",
    restarts: int = 1,
    tol: float = 0.0,
    kmeans_init: str = "first",
    samples: int = 4096,
    loss: str = "mse",
    lr: float = 1e-3,
    epochs: int = 100,
    patience: int = 15,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    head: str = "auto",
    tau: float = 2.0,
    class_counts: Sequence[Sequence[float]] | None = None,
    weights: Sequence[float] | None = None,
    specs: Sequence[SymmetrySpec] | None = None,
    collect: Callable[..., Any] | None = None,
    device: str | torch.device | None = None,
) -> MergeResult:
    """KF-Gradient: weighted K-means of all parents' neurons into the fused width, then every
    level trained in order with Adam on the fused model's own inputs, to its clusters' means.

    Args:
        data: the fusion set (batches of one input tensor, or ``(inputs, labels)``); 80 % trains
            each level, 20 % decides early stopping.
        lam, weights, width, importance, samples, class_counts, specs: as for kf-linear.
        restarts, tol, kmeans_init: the K-means (the paper's gradient variant: one start from
            parent 1's neurons, ``"first"``, stopping when the cost stops dropping, ``tol=0``;
            ``"farthest"`` is kf-linear's seeded farthest-point start).
        loss: ``"mse"`` (plain mean squared error) or ``"weighted"`` (every fused unit weighted
            by its cluster's importance ``S_k``; the head's logits stay unweighted).
        lr, weight_decay: Adam's learning rate (> 0) and weight decay (>= 0).
        epochs: most epochs per level (>= 1); patience: epochs without a better held-out loss
            before a level stops (>= 1); batch_size: samples a step (>= 1).
        head: the head's target: ``"mean"``, ``"class-share"``, ``"auto"`` (as for kf-linear)
            or ``"kl"``: the KL divergence to the softmax at temperature ``tau`` (> 0) of the
            parents' logits combined as ``"auto"`` does, times ``tau**2``.
        device: where the models run (default: model 0's device).
    """
    t0 = time.perf_counter()
    _check_options(loss, lr, epochs, patience, batch_size, weight_decay, head, tau, kmeans_init)
    if data is None:
        raise ValueError(f"the '{_NAME}' method needs data= (the fusion set)")
    if not all(isinstance(m, nn.Module) for m in models):
        raise ValueError(f"the '{_NAME}' method runs the models: pass nn.Modules")
    models = list(models)
    x = _fusion_inputs(data)
    if x.shape[0] < 2:
        raise ValueError(f"{_NAME} splits the fusion set 80/20: it needs at least 2 samples")
    grouped = group_neurons(_NAME, spec, models, data, lam=lam, seed=seed, width=width,
                            importance=importance, restarts=restarts, samples=samples,
                            weights=weights, specs=specs, collect=collect, device=device,
                            init=kmeans_init, tol=tol)  # fmt: skip
    goals, head_used = _head_targets(spec, models[0], "auto" if head == "kl" else head,
                                     class_counts, len(models), _NAME)  # fmt: skip
    t1 = time.perf_counter()
    from symmerge.merging import build_model
    from symmerge.stats import _eval_on, _first_device, float_dtype, model_inputs

    home = _first_device(models[0])
    dev = torch.device(device) if device is not None else home
    start = build_state_dict(grouped.specs if specs is not None else spec, _state_dicts(models),
                             grouped.maps)  # fmt: skip
    fused = build_model(models[0], spec, grouped.maps, {k: v.clone() for k, v in start.items()})
    fused = fused.to(dev).eval()
    x = model_inputs(x, dev, float_dtype(models[0]))[0][0]
    with _eval_on(models, dev):
        found = levels(models[0], spec, (x[:2],))
    fits: list[LevelFit] = []
    for level in found:
        with _eval_on(models, dev):
            target = _level_targets(level, models, grouped.specs, grouped.maps, grouped.weights,
                                    goals, x)  # fmt: skip
        is_head = level.index == len(found) - 1
        unit_w = None
        if loss == "weighted" and level.group is not None and not is_head:
            s = grouped.mass[level.group]
            unit_w = (s / s.mean()).to(dev, torch.float32)
        fits.append(fit_level(fused, level, x, target, unit_weights=unit_w,
                              tau=tau if is_head and head == "kl" else None, lr=lr,
                              epochs=epochs, patience=patience, batch_size=batch_size,
                              weight_decay=weight_decay, seed=seed))  # fmt: skip
    t_fit = time.perf_counter() - t1
    head_used = f"kl (tau {tau:g}, teacher {head_used})" if head == "kl" else head_used
    log = [f"{_NAME}: {len(found)} levels trained on the fused model's own inputs ({loss} loss), "
           f"head target {head_used}"]  # fmt: skip
    log += [f"level {f.level} {found[f.level].modules[0]}..: {f.epochs} epochs, held-out loss "
            f"{f.val_loss[0]:.4g} -> {min(f.val_loss):.4g}" for f in fits]  # fmt: skip
    state = {k: v.detach().to(home).clone() for k, v in fused.state_dict().items()}
    details = {"levels": [{**f.to_dict(), "modules": list(found[f.level].modules)} for f in fits],
               "head": head_used, "bn_statistics": "fitted"}  # fmt: skip
    return MergeResult(state, grouped.maps, grouped.objective, sum(f.epochs for f in fits), 0.0,
                       time.perf_counter() - t0, log, _NAME,
                       {**grouped.timings, "gradient": t_fit}, details)  # fmt: skip


def fit_level(
    model: nn.Module,
    level: Level,
    inputs: Tensor,
    targets: Tensor,
    *,
    unit_weights: Tensor | None = None,
    tau: float | None = None,
    lr: float = 1e-3,
    epochs: int = 100,
    patience: int = 15,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> LevelFit:
    """Train ``level``'s parameters of ``model`` (in place; the rest stay fixed) so that its
    output on ``inputs`` (the model's own, through its earlier levels) approaches ``targets``.

    Args:
        inputs, targets: the model's inputs and the level's target outputs, sample-major,
            on the model's device.
        unit_weights: a weight per output unit (on the level's unit axis) for a weighted mean
            squared error; ``None``: plain.
        tau: instead of a squared error, ``tau**2`` times the KL divergence from the softmax
            of ``targets / tau`` to that of the outputs (a head).
        val_fraction: the held-out share (at least one sample) deciding early stopping.
        seed: the split and the order of the batches.

    Returns:
        :class:`LevelFit`; the model keeps the parameters of lowest held-out loss.
    """
    mods = dict(model.named_modules())
    params = [p for n in level.modules for p in mods[n].parameters(recurse=False)]
    n = inputs.shape[0]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    val, train = order[:n_val], order[n_val:]
    dim = -1 if isinstance(mods[level.layers[-1]], nn.Linear) else 1

    def loss_of(idx: Tensor) -> Tensor:
        out = run_until(model, level, inputs[idx.to(inputs.device)])[1]
        goal = targets[idx.to(targets.device)]
        if tau is not None:
            return F.kl_div(F.log_softmax(out.float() / tau, -1),
                            F.log_softmax(goal.float() / tau, -1), log_target=True,
                            reduction="batchmean") * tau**2  # fmt: skip
        err = (out.float() - goal.float()).square()
        if unit_weights is not None:
            shape = [1] * err.dim()
            shape[dim] = -1
            err = err * unit_weights.view(shape)
        return err.mean()

    def held_out() -> float:
        with torch.no_grad():
            total = sum(float(loss_of(b)) * len(b) for b in val.split(max(batch_size, 256)))
        return total / len(val)

    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    fit = LevelFit(level.index)
    best = [p.detach().clone() for p in params]
    try:
        fit.val_loss.append(held_out())
        if not params:
            return fit
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        wait = 0
        for epoch in range(1, epochs + 1):
            perm = train[torch.randperm(len(train), generator=gen)]
            total = 0.0
            with torch.enable_grad():
                for b in perm.split(batch_size):
                    opt.zero_grad(set_to_none=True)
                    value = loss_of(b)
                    value.backward()
                    opt.step()
                    total += float(value.detach()) * len(b)
            fit.train_loss.append(total / len(train))
            fit.val_loss.append(held_out())
            fit.epochs = epoch
            if fit.val_loss[-1] < fit.val_loss[fit.best_epoch]:
                fit.best_epoch, wait = epoch, 0
                best = [p.detach().clone() for p in params]
            else:
                wait += 1
                if wait >= patience:
                    fit.stopped_early = epoch < epochs
                    break
    finally:
        with torch.no_grad():
            for p, b in zip(params, best, strict=True):
                p.copy_(b)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return fit


def _level_targets(
    level: Level,
    models: Sequence[nn.Module],
    specs: Sequence[SymmetrySpec],
    maps: Mapping[str, Any],
    weights: Sequence[float],
    goals: Mapping[str, Callable[[list[Tensor]], Tensor]],
    x: Tensor,
    chunk: int = 256,
) -> Tensor:
    """The level's target on every fusion sample: the parents' outputs at the level's output,
    in fused coordinates (``sum_m M_m y_m``), or the head's goal."""
    last = level.layers[-1]
    members: list[Member | None] = []
    for sp in specs:
        members.append(next((m for m in sp.members()
                             if m.tensor == f"{last}.weight" and m.axis == 0), None))  # fmt: skip
    dim = -1 if isinstance(models[0].get_submodule(last), nn.Linear) else 1
    parts = []
    with torch.no_grad():
        for xb in x.split(chunk):
            ys = [run_until(m, level, xb)[1] for m in models]
            goal = goals.get(last)
            y = goal(ys) if goal is not None else merge_values(ys, members, maps, dim, weights)
            parts.append(y.to(torch.float32))
    return torch.cat(parts)


def _fusion_inputs(data: Iterable[Any]) -> Tensor:
    """Every input of the fusion set, concatenated sample-major (one tensor per batch)."""
    from symmerge.stats import model_inputs

    xs = []
    for batch in data:
        args, kwargs = model_inputs(batch)
        if kwargs or len(args) != 1 or not torch.is_tensor(args[0]):
            raise ValueError(
                f"{_NAME} needs batches of one input tensor (or (inputs, labels)); got "
                f"{type(batch).__name__} batches"
            )
        xs.append(args[0].detach().cpu())
    if not xs:
        raise ValueError(f"the fusion set of {_NAME} is empty")
    return torch.cat(xs)


def _check_options(
    loss: str,
    lr: float,
    epochs: int,
    patience: int,
    batch_size: int,
    weight_decay: float,
    head: str,
    tau: float,
    kmeans_init: str,
) -> None:
    """One message shape for every bad option, before any work."""

    def real(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    checks = [
        ("loss", loss in GRADIENT_LOSSES, f"one of {GRADIENT_LOSSES}", loss),
        ("head", head in GRADIENT_HEADS, f"one of {GRADIENT_HEADS}", head),
        ("kmeans_init", kmeans_init in ("first", "farthest"), "'first' or 'farthest'",
         kmeans_init),
        ("lr", real(lr) and lr > 0, "a float > 0", lr),
        ("weight_decay", real(weight_decay) and weight_decay >= 0, "a float >= 0", weight_decay),
        ("tau", real(tau) and tau > 0, "a float > 0", tau),
        ("epochs", count(epochs), "an int >= 1", epochs),
        ("patience", count(patience), "an int >= 1", patience),
        ("batch_size", count(batch_size), "an int >= 1", batch_size),
    ]  # fmt: skip
    for param, ok, want, got in checks:
        if not ok:
            raise ValueError(
                f"The '{param}' parameter of {_NAME} must be {want}. Got {got!r} instead."
            )
