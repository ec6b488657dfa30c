"""Solvers: turn similarity matrices into alignments (permutations, later zips and clusters)."""

from symmerge.solvers.coordinate import (
    MatchResult,
    coordinate_descent,
    coordinates,
    merge_many,
    solve_coordinate,
    weight_matching,
)
from symmerge.solvers.lap import BACKENDS, lap_objective, solve_lap, solve_shared_blocks

__all__ = [
    "BACKENDS",
    "MatchResult",
    "coordinate_descent",
    "coordinates",
    "lap_objective",
    "merge_many",
    "solve_coordinate",
    "solve_lap",
    "solve_shared_blocks",
    "weight_matching",
]
