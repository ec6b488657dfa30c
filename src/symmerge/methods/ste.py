"""Straight-through estimator (STE) matching: weight matching refined on data.

Yamada et al. show that merging models trained on different datasets needs data, and that a
small condensed or coreset dataset is enough. Their merge is Git Re-Basin's STE: weight
matching initialises the permutations, then a proxy of model A is trained so that matching
model B to it lowers the loss of the midpoint model on the data (:func:`symmerge.refine.
ste_refine`). The merged weights are ``(1 - lam) theta_A + lam pi(theta_B)``.

Reference: Yamada, Yamashita, Yamaguchi, Chijiwa, "Revisiting Permutation Symmetry for Merging
Models between Different Datasets", arXiv:2306.05641 (STE from Ainsworth et al., Git Re-Basin,
arXiv:2209.04836).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from symmerge.groupmap import GroupMap, build_state_dict
from symmerge.methods import MergeResult, register_method
from symmerge.refine import ste_refine
from symmerge.solvers.coordinate import weight_matching
from symmerge.spec import SymmetrySpec

__all__ = ["ste"]


@register_method(
    "ste",
    paper="Yamada et al., Revisiting Permutation Symmetry for Merging Models between "
    "Different Datasets, 2023 (STE of Ainsworth et al., Git Re-Basin)",
    url="https://arxiv.org/abs/2306.05641",
    needs_data=True,
    max_models=2,
)
def ste(
    spec: SymmetrySpec,
    models: Sequence[nn.Module | Mapping[str, Tensor]],
    *,
    data: Any = None,
    lam: float = 0.5,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    lr: float = 0.05,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    batch_size: int = 500,
    keep: str = "best",
    proxy: str = "a",
    matcher: str = "fast",
    max_sweeps: int = 3,
    kind: str = "inner",
    bn: str = "reset",
    init: Mapping[str, Tensor] | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    backend: str = "scipy",
) -> MergeResult:
    """STE matching on data (Yamada et al.): weight matching refined by training a proxy.

    Args:
        models: model A (an ``nn.Module``: it runs the midpoint) and model B (module or
            state dict).
        data: required: ``(inputs, labels)`` batches (re-iterable), a zero-argument factory of
            them, or a ``TensorDataset`` (batched by ``batch_size``, reshuffled every epoch).
            Yamada et al. use the union of both models' training sets, or of small condensed
            or coreset sets.
        lam, weights: interpolation weight of B (``weights=(w_A, w_B)`` gives
            ``lam = w_B / (w_A + w_B)``), for the STE midpoint and the merged weights.
        epochs, steps: STE length (default 1 epoch; ``steps`` overrides).
        lr, optimizer, momentum, weight_decay: the proxy's optimizer (SGD with momentum 0.9 and
            weight decay 1e-4 as the authors; ``"adam"``). The authors use lr 0.05 on full data
            and 0.5 on condensed data (batch 500).
        keep: ``"best"`` (lowest minibatch loss, as the authors) or ``"last"`` permutations.
        proxy, matcher, max_sweeps, kind, bn, loss_fn, backend: see
            :func:`symmerge.refine.ste_refine`.
        init: starting permutations of B (default: weight matching, 100 sweeps).

    Returns:
        A :class:`MergeResult`; ``log`` has the STE progress, ``timings`` the initial matching
        (``init_match``), the STE totals (``ste_match``, ``ste_rest``) and the mean seconds per
        step (``match_per_step``, ``rest_per_step``), ``iterations`` the STE steps.
    """
    if data is None:
        raise ValueError(
            "the 'ste' method needs data=: (inputs, labels) batches, a factory returning them, "
            "or a TensorDataset (e.g. a few hundred samples of each model's training set)"
        )
    if len(models) != 2:
        raise ValueError(f"the 'ste' method merges 2 models, got {len(models)}")
    model_a, model_b = models
    if not isinstance(model_a, nn.Module):
        raise TypeError(
            "the 'ste' method runs model A on data: pass it as an nn.Module, not a state dict"
        )
    lam = _lam(lam, weights)
    state_b = (
        {k: v.detach() for k, v in model_b.state_dict().items()}
        if isinstance(model_b, nn.Module)
        else dict(model_b)
    )
    state_a = {k: v.detach() for k, v in model_a.state_dict().items()}
    t0 = time.perf_counter()
    log: list[str] = []
    if init is None:
        wm = weight_matching(spec, state_a, state_b, kind=kind, seed=seed, backend=backend)
        init = wm.perms
        log.append(f"weight matching: {wm.iterations} sweeps")
    t_init = time.perf_counter() - t0
    res = ste_refine(
        spec, model_a, state_b, data, init=init, epochs=epochs, steps=steps, lr=lr,
        optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, lam=lam, keep=keep,
        proxy=proxy, matcher=matcher, max_sweeps=max_sweeps, kind=kind, bn=bn,
        batch_size=batch_size, loss_fn=loss_fn, seed=seed, backend=backend,
    )  # fmt: skip
    t1 = time.perf_counter()
    ident = spec.identity_permutations()
    maps = {
        g: GroupMap.permutations([ident[g], res.perms[g]], (1.0 - lam, lam)) for g in spec.groups
    }
    merged = build_state_dict(spec, [state_a, state_b], maps)
    t_build = time.perf_counter() - t1
    summary = res.summary()
    match_s, rest_s = sum(res.match_seconds), sum(res.train_seconds)
    return MergeResult(
        merged,
        maps,
        iterations=res.steps,
        lap_seconds=0.0,  # the assignments are inside the STE matching time
        other_seconds=t_init + match_s + rest_s + t_build,
        log=log + res.log,
        method="ste",
        timings={
            "init_match": t_init,
            "ste_match": match_s,
            "ste_rest": rest_s,
            "match_per_step": summary["match_per_step"],
            "rest_per_step": summary["train_per_step"],
            "build": t_build,
        },
    )


def _lam(lam: float, weights: Sequence[float] | None) -> float:
    if weights is not None:
        w = [float(x) for x in weights]
        if len(w) != 2 or min(w) < 0 or sum(w) <= 0:
            raise ValueError(
                f"The 'weights' parameter of ste must be 2 non-negative floats, not both 0. "
                f"Got {weights!r} instead."
            )
        return w[1] / (w[0] + w[1])
    if not (isinstance(lam, (int, float)) and 0.0 <= lam <= 1.0):
        raise ValueError(f"The 'lam' parameter of ste must be a float in [0, 1]. Got {lam!r}.")
    return float(lam)
