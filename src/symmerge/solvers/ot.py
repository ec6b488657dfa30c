"""Exact optimal transport between two sets of units: OT fusion's alignment step.

``transport(C, a, b)`` solves the earth mover's problem

    T = argmin_T <T, C>   subject to   T 1 = a,  T^T 1 = b,  T >= 0

with POT's network simplex (``ot.emd``): ``T[i, j]`` is the mass of unit ``i`` of the first
set (rows) sent to unit ``j`` of the second (columns). With equally many units and uniform
marginals the optimum is a vertex of the Birkhoff polytope, a permutation matrix divided by
``n``, so exact OT then solves the linear assignment problem (:func:`as_permutation` reads the
permutation back). Unlike a LAP, a plan can split a unit over several others, which is how OT
fusion aligns layers of different widths or weighs units by importance.

POT is an optional dependency (``pip install symmerge[ot]``); it is imported on first use, so
the rest of the library works without it.

Reference: Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020,
https://arxiv.org/abs/1910.05653; POT: Flamary et al., JMLR 2021, https://pythonot.github.io
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Any

import numpy as np
import torch

__all__ = ["as_permutation", "transport"]

# POT's network simplex status for an optimal solution (its ``log["result_code"]``).
_OPTIMAL = 1


def _pot() -> ModuleType:
    """The ``ot`` module, or an ImportError saying how to install it."""
    try:
        import ot
    except ImportError as e:
        raise ImportError(
            "optimal transport (OT fusion, symmerge.solvers.ot) needs the POT package, which "
            "is an optional dependency: pip install 'symmerge[ot]' (or pip install pot)"
        ) from e
    return ot


def transport(
    cost: torch.Tensor | np.ndarray,
    a: torch.Tensor | np.ndarray | None = None,
    b: torch.Tensor | np.ndarray | None = None,
    *,
    max_iter: int | None = None,
) -> torch.Tensor:
    """The exact optimal transport plan between the rows and the columns of ``cost``.

    Args:
        cost: ``(n, m)`` ground cost, ``cost[i, j]`` of sending row unit i to column unit j
            (any float dtype or device; solved on the CPU in float64).
        a: ``(n,)`` row marginal (unit masses, e.g. importances); default uniform. Any
            non-negative weights with a positive sum: they are normalised to sum to one.
        b: ``(m,)`` column marginal, as ``a``.
        max_iter: bound on network simplex iterations; default ``max(100000, 50 n m)``.

    Returns:
        ``(n, m)`` float64 CPU tensor ``T`` with row sums ``a`` and column sums ``b``
        (normalised) minimising ``<T, cost>``.

    Raises:
        ImportError: POT is not installed.
        RuntimeError: the solver stopped before optimality (raise ``max_iter``).

    Example:
        >>> C = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        >>> transport(C) * 2
        tensor([[1., 0.],
                [0., 1.]], dtype=torch.float64)
    """
    ot = _pot()
    C = torch.as_tensor(cost).detach().to("cpu", torch.float64)
    if C.dim() != 2 or 0 in C.shape:
        raise ValueError(
            f"The 'cost' parameter of transport must be a non-empty 2-D matrix. Got shape "
            f"{tuple(C.shape)} instead."
        )
    if not bool(torch.isfinite(C).all()):
        raise ValueError("The 'cost' parameter of transport must be finite. Got NaN or inf.")
    n, m = C.shape
    p = _marginal(a, n, "a")
    q = _marginal(b, m, "b")
    iters = max(100_000, 50 * n * m) if max_iter is None else int(max_iter)
    with warnings.catch_warnings():  # a non-optimal stop is raised below, with the fix
        warnings.simplefilter("ignore", UserWarning)
        plan, log = ot.emd(p, q, C.numpy(), numItermax=iters, log=True)
    if log["result_code"] != _OPTIMAL:
        raise RuntimeError(
            f"ot.emd stopped before optimality on a {n} x {m} cost ({log['warning']}); pass a "
            f"larger max_iter (was {iters})"
        )
    return torch.from_numpy(np.ascontiguousarray(plan, dtype=np.float64))


def _marginal(x: Any, size: int, name: str) -> np.ndarray:
    """A probability vector of length ``size`` (uniform for None)."""
    if x is None:
        return np.full(size, 1.0 / size)
    v = torch.as_tensor(x).detach().to("cpu", torch.float64).reshape(-1)
    total = float(v.sum()) if v.numel() else 0.0
    if v.numel() != size or not bool(torch.isfinite(v).all()) or bool((v < 0).any()) or total <= 0:
        raise ValueError(
            f"The '{name}' parameter of transport must hold {size} finite non-negative weights "
            f"with a positive sum. Got {v.numel()} values summing to {total} instead."
        )
    return (v / total).numpy()


def as_permutation(plan: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor | None:
    """The permutation a square plan is supported on, else None.

    An entry counts when it carries more than ``rtol`` of its row's mass (smaller ones are
    round-off of marginals that agree only to float precision, e.g. the importances of a
    permuted copy). A plan with exactly one such entry in every row and every column sends
    each row unit whole to one column unit: ``perm[i]`` is row i's column (the convention of
    :func:`symmerge.solvers.solve_lap`).
    """
    plan = torch.as_tensor(plan)
    if plan.dim() != 2 or plan.shape[0] != plan.shape[1] or plan.numel() == 0:
        return None
    support = plan > rtol * plan.sum(1, keepdim=True)
    if not (bool((support.sum(1) == 1).all()) and bool((support.sum(0) == 1).all())):
        return None
    return support.to(torch.int8).argmax(1).to(torch.long)
