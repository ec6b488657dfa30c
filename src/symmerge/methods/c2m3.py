"""C2M3: cycle-consistent merging of N models through a shared universe (Frank-Wolfe).

Every model gets one permutation per group into a common "universe" order, found by
:func:`symmerge.solvers.frank_wolfe.frank_wolfe_matching` over all layers at once; the merged
model is the average of the models mapped into the universe. Pairwise maps ``P_i P_j^T``
compose to the identity around every cycle. Follow with N-model REPAIR (``renorm="repair"``
in :func:`symmerge.merge`), as the paper does.

Reference: Crisostomi, Fumero, Baieri, Bernard, Rodola, "C2M3: Cycle-Consistent Multi-Model
Merging", NeurIPS 2024, https://arxiv.org/abs/2405.17897
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from symmerge.groupmap import GroupMap
from symmerge.methods import MergeResult, register_method
from symmerge.methods.rebasin import Models, _finish, _model_weights, _state_dicts
from symmerge.solvers.frank_wolfe import frank_wolfe_matching
from symmerge.spec import SymmetrySpec

__all__ = ["c2m3"]


@register_method(
    "c2m3",
    paper="Crisostomi et al., C2M3, NeurIPS 2024",
    url="https://arxiv.org/abs/2405.17897",
    max_models=None,
)
def c2m3(
    spec: SymmetrySpec,
    models: Models,
    *,
    data: Any = None,
    lam: float = 0.5,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    init: str = "weight",
    max_iter: int = 200,
    tol: float = 1e-4,
    patience: int = 5,
    backend: str = "scipy",
    device: str | torch.device | None = None,
) -> MergeResult:
    """C2M3 (data-free, N >= 2 models): Frank-Wolfe matching of every model to a universe,
    then the average in the universe (expressed in model 0's unit order).

    Args:
        init, max_iter, tol, patience, backend, device: see
            :func:`symmerge.solvers.frank_wolfe.frank_wolfe_matching`.
    """
    sds = _state_dicts(models)
    w = _model_weights(len(sds), lam, weights, "c2m3")
    res = frank_wolfe_matching(
        spec, sds, max_iter=max_iter, tol=tol, patience=patience, init=init, seed=seed,
        backend=backend, device=device,
    )  # fmt: skip
    maps = {g: GroupMap.permutations([p[g] for p in res.model_perms], w) for g in spec.groups}
    out = _finish(
        "c2m3", spec, sds, maps, res.objective, res.iterations, res.lap_seconds,
        res.other_seconds, res.log,
    )  # fmt: skip
    out.timings.update({f"match_{k}": v for k, v in res.timings.items()})
    return out
