"""Solvers: turn similarity matrices into alignments (permutations, later zips and clusters)."""

from symmerge.solvers.coordinate import (
    MatchResult,
    coordinate_descent,
    coordinates,
    merge_many,
    relative_to_first,
    solve_coordinate,
    weight_matching,
)
from symmerge.solvers.frank_wolfe import frank_wolfe_matching, universe_objective
from symmerge.solvers.lap import (
    BACKENDS,
    centre_prices,
    lap_objective,
    solve_kronecker,
    solve_lap,
    solve_shared_blocks,
    warm_lap,
)

__all__ = [
    "BACKENDS",
    "MatchResult",
    "centre_prices",
    "coordinate_descent",
    "coordinates",
    "frank_wolfe_matching",
    "lap_objective",
    "merge_many",
    "relative_to_first",
    "solve_coordinate",
    "solve_kronecker",
    "solve_lap",
    "solve_shared_blocks",
    "universe_objective",
    "warm_lap",
    "weight_matching",
]
