"""The ensemble as one model: every unit of every model kept side by side.

The upper end of every partial merge (PLeaS at 2x, ZipIt! with no zip): each group of the
merged model holds all N models' units, model after model, so each hidden layer computes every
model's units exactly and the head averages the models' logits (or, with
``merge(..., heads="per-task")``, keeps each model's head). Exact wherever no layer mixes units
across the joined width (BatchNorm, GroupNorm with its group count scaled, no norm); a
LayerNorm over the joined width (ViTs, LN ResNets) normalises all models' units together, so
there it is not the ensemble.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from symmerge.groupmap import GroupMap
from symmerge.methods import MergeResult, register_method
from symmerge.methods.rebasin import Models, _finish, _model_weights, _state_dicts
from symmerge.spec import SymmetrySpec

__all__ = ["ensemble"]


@register_method("ensemble", paper="side-by-side ensemble (the 2x reference)")
def ensemble(
    spec: SymmetrySpec,
    models: Models,
    *,
    data: Any = None,
    lam: float = 0.5,
    seed: int = 0,
    weights: Sequence[float] | None = None,
) -> MergeResult:
    """All models side by side in one network (width N x n): their logits averaged (exactly
    unless a LayerNorm spans the joined width).

    Args:
        weights: each model's share of the averaged logits (default uniform, or
            ``(1 - lam, lam)`` for two models).
    """
    t0 = time.perf_counter()
    sds = _state_dicts(models)
    w = _model_weights(len(sds), lam, weights, "ensemble")
    maps = {}
    for name, g in spec.groups.items():
        own = g.blocks if g.blocks and g.block_group is None else None  # GroupNorm groups
        blocks = None if own is None else [own] * len(sds)
        maps[name] = GroupMap.side_by_side([g.size] * len(sds), w, blocks=blocks)
    return _finish("ensemble", spec, sds, maps, {}, 0, 0.0, time.perf_counter() - t0, [])
